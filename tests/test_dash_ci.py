"""CI glue of the dashboard on real git repositories the tests make: commit lists, backfill
plans that asv's own range expansion turns back into the same commits, result merging, and
the results branch pushed to and pulled from a bare remote."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from qwen_lora_dash import ci

ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
       "GIT_COMMITTER_EMAIL": "t@t"}


def run_git(repo: Path, *args: str) -> str:
    return ci.git(*args, cwd=repo, env=ENV)


def make_repo(path: Path, n_before: int = 2, n_after: int = 5) -> list[str]:
    """A repository with `n_before` commits without the package, then `n_after` with it,
    plus a merged side branch; returns the first-parent commits, oldest first."""
    path.mkdir(parents=True)
    run_git(path, "init", "-q", "-b", "main")
    for i in range(n_before):
        (path / "notes.txt").write_text(f"{i}\n")
        run_git(path, "add", "notes.txt")
        run_git(path, "commit", "-q", "-m", f"before {i}")
    pkg = path / "src" / "qwen_lora"
    pkg.mkdir(parents=True)
    for i in range(n_after):
        (pkg / "__init__.py").write_text(f"X = {i}\n")
        run_git(path, "add", "src")
        run_git(path, "commit", "-q", "-m", f"after {i}")
        if i == 1:  # a merge: its side commit is not on the first-parent chain
            run_git(path, "checkout", "-q", "-b", "side")
            (path / "side.txt").write_text("side\n")
            run_git(path, "add", "side.txt")
            run_git(path, "commit", "-q", "-m", "side")
            run_git(path, "checkout", "-q", "main")
            run_git(path, "merge", "-q", "--no-ff", "-m", "merge side", "side")
    return run_git(path, "rev-list", "--first-parent", "--reverse", "HEAD").split()


def asv_expand(repo: Path, rev_range: str) -> list[str]:
    """What `asv run RANGE` measures: asv's git plugin runs exactly this command."""
    out = run_git(repo, "rev-list", "--first-parent", *rev_range.split(), "--")
    return out.split()[::-1]


def test_package_commits_skip_history_before_the_package(tmp_path):
    commits = make_repo(tmp_path / "repo")
    got = ci.package_commits("HEAD", cwd=tmp_path / "repo")
    assert got == commits[2:]
    assert len(got) == 6  # five commits with the package and the merge


@pytest.mark.parametrize("chunks", [1, 2, 3, 4, 50])
def test_plan_chunks_cover_the_range_exactly_once(tmp_path, chunks):
    repo = tmp_path / "repo"
    commits = make_repo(repo)
    for wanted in (commits, commits[2:]):  # from the root commit, and from the middle
        plan = ci.plan_chunks(wanted, chunks, cwd=repo)
        assert len(plan) == min(chunks, len(wanted))
        expanded = [asv_expand(repo, item["range"]) for item in plan]
        assert [c for piece in expanded for c in piece] == wanted
        assert [len(p) for p in expanded] == [item["commits"] for item in plan]
        assert max(map(len, expanded)) - min(map(len, expanded)) <= 1


def test_plan_command_prints_a_job_matrix(tmp_path, capsys, monkeypatch):
    repo = tmp_path / "repo"
    commits = make_repo(repo)
    monkeypatch.chdir(repo)
    assert ci.main(["plan", "--chunks", "2"]) == 0
    matrix = json.loads(capsys.readouterr().out)
    assert [i["chunk"] for i in matrix["include"]] == [1, 2]
    assert sum(i["commits"] for i in matrix["include"]) == len(commits) - 2
    assert ci.main(["plan", "--range", f"{commits[0]}..{commits[1]}"]) == 1  # no package there


def result_file(commit: str, **results: float) -> dict:
    return {"commit_hash": commit, "env_name": "virtualenv-py3.11", "version": 2,
            "result_columns": ["result", "params", "version", "started_at", "duration"],
            "results": {k: [[v], [], "v1", 0, 1.0] for k, v in results.items()},
            "durations": {"<build>": 1.0}}


def write_results(root: Path, machine: str, files: dict[str, dict], benchmarks: dict) -> Path:
    (root / machine).mkdir(parents=True, exist_ok=True)
    (root / "benchmarks.json").write_text(json.dumps(benchmarks))
    (root / machine / "machine.json").write_text(json.dumps({"machine": machine}))
    for commit, data in files.items():
        (root / machine / f"{commit[:8]}-virtualenv-py3.11.json").write_text(json.dumps(data))
    return root


def test_merge_joins_chunks_and_merges_the_same_commit_per_benchmark(tmp_path):
    a, b, c = "a" * 40, "b" * 40, "c" * 40
    one = write_results(tmp_path / "chunk1", "gha", {a: result_file(a, t_x=1.0),
                                                     b: result_file(b, t_x=2.0)},
                        {"t_x": {"version": "v1"}, "version": 2})
    two = write_results(tmp_path / "chunk2", "gha", {c: result_file(c, t_x=3.0),
                                                     b: result_file(b, t_y=5.0)},
                        {"t_y": {"version": "v1"}, "version": 2})
    dest = tmp_path / "results"
    counts = ci.merge_dirs([one, two], dest)
    assert counts == {"added": 5, "merged": 2, "same": 1}
    names = sorted(p.name for p in (dest / "gha").iterdir())
    assert names == ["aaaaaaaa-virtualenv-py3.11.json", "bbbbbbbb-virtualenv-py3.11.json",
                     "cccccccc-virtualenv-py3.11.json", "machine.json"]
    merged_b = json.loads((dest / "gha" / "bbbbbbbb-virtualenv-py3.11.json").read_text())
    assert set(merged_b["results"]) == {"t_x", "t_y"}
    assert set(json.loads((dest / "benchmarks.json").read_text())) == {"t_x", "t_y", "version"}
    assert ci.merge_dirs([one, two], dest) == {"added": 0, "merged": 0, "same": 8}


def test_merge_command_accepts_a_directory_of_downloaded_artifacts(tmp_path, capsys):
    a, b = "a" * 40, "b" * 40
    write_results(tmp_path / "chunks" / "results-1", "gha", {a: result_file(a, t=1.0)}, {})
    write_results(tmp_path / "chunks" / "results-2", "gha", {b: result_file(b, t=1.0)}, {})
    assert ci.main(["merge", str(tmp_path / "chunks"), "--into", str(tmp_path / "out")]) == 0
    assert len(list((tmp_path / "out" / "gha").glob("*-virtualenv-py3.11.json"))) == 2


def test_results_branch_round_trip_through_a_bare_remote(tmp_path):
    remote = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", str(remote)], check=True)
    clones = []
    for name in ("runner1", "runner2"):
        repo = tmp_path / name
        make_repo(repo, n_before=0, n_after=1)
        run_git(repo, "remote", "add", "origin", str(remote))
        clones.append(repo)
    r1, r2 = clones
    a, b = "a" * 40, "b" * 40
    write_results(r1 / "results", "gha", {a: result_file(a, t=1.0)}, {"t": {}})
    first = ci.push_results(r1 / "results", cwd=r1)
    assert first is not None
    assert ci.push_results(r1 / "results", cwd=r1) is None  # nothing new
    # Another runner measured another commit from a stale start: push merges, not overwrites.
    write_results(r2 / "results", "gha", {b: result_file(b, t=2.0)}, {"t": {}})
    second = ci.push_results(r2 / "results", cwd=r2)
    files = run_git(r2, "ls-tree", "-r", "--name-only", second).split()
    assert files == ["results/benchmarks.json", "results/gha/aaaaaaaa-virtualenv-py3.11.json",
                     "results/gha/bbbbbbbb-virtualenv-py3.11.json", "results/gha/machine.json"]
    assert run_git(r2, "rev-parse", f"{second}^").strip() == first
    # The branch holds results only; main's own files are untouched and nothing was staged.
    assert run_git(r2, "status", "--porcelain", "--untracked-files=no").strip() == ""
    # A fresh runner pulls both commits' results.
    fresh = tmp_path / "fresh"
    make_repo(fresh, n_before=0, n_after=1)
    run_git(fresh, "remote", "add", "origin", str(remote))
    assert ci.pull_results(fresh / "results", cwd=fresh) == {"added": 4, "merged": 0, "same": 0}
    assert len(list((fresh / "results" / "gha").glob("*-virtualenv-py3.11.json"))) == 2


def test_pull_without_a_results_branch_is_a_no_op(tmp_path):
    remote = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", str(remote)], check=True)
    repo = tmp_path / "repo"
    make_repo(repo, n_before=0, n_after=1)
    run_git(repo, "remote", "add", "origin", str(remote))
    assert ci.pull_results(repo / "results", cwd=repo) is None
    assert not (repo / "results").exists()


REGRESSED_LOG = """\
· Creating environments
| Change   | Before [0a1b2c3d]   | After [4e5f6a7b]   |   Ratio | Benchmark (Parameter)        |
|----------|---------------------|--------------------|---------|------------------------------|
| +        | 10.0±0.1ms          | 25.0±0.2ms         |    2.50 | bench.TimeDecode.time_decode |

SOME BENCHMARKS HAVE CHANGED SIGNIFICANTLY.
PERFORMANCE DECREASED.
"""


def test_compare_report_flags_a_regression_and_keeps_the_table():
    md = ci.compare_report(REGRESSED_LOG, title="PR 7")
    assert md.startswith("## PR 7")
    assert "**Regression: the job fails.**" in md
    assert "| +        | 10.0±0.1ms" in md
    assert "- PERFORMANCE DECREASED." in md
    clean = ci.compare_report("BENCHMARKS NOT SIGNIFICANTLY CHANGED.\n", failed=False)
    assert "**No significant regression.**" in clean
    broken = ci.compare_report("Traceback: boom\n", failed=True)
    assert "The comparison failed" in broken and "boom" in broken
