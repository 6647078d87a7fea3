"""End to end, through the same `make` targets as the GitHub workflows: the real benchmark
suite's small workload over a temporary history whose middle commit injects a slowdown into
qwen_lora's sampler (`make backfill`, as a backfill chunk runs it), `make bench-pr` flagging it
as a pull request's comparison would, `make dashboard` publishing the site, and headless
Chromium looking at it: a graph draws its points, the regressions page lists the injected
regression, the summary judges the sampling-overhead target failed. Screenshots go to
test-artifacts/.

The history is this working tree committed three times (baseline; `Sampler.__call__` sleeps
2 ms; an unrelated change), built and installed by asv into a virtualenv of this test's own
(created once in .asv/dash-test-env and reused; the developers' .asv/env and
tests/test_asv_e2e.py's environment are left alone), under a private HOME. To keep it short,
the targets' asv selection (`asv_for`: the machine and the small workload's environment) is
narrowed to the sampling and forward-pass benchmarks, the two that the injected slowdown and
the sampling-overhead target involve.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from dash_helpers import REPO, git, serve

from qwen_lora_dash import summary
from qwen_lora_dash.headless import Browser, find_chromium

pytestmark = pytest.mark.slow

ARTIFACTS = REPO / "test-artifacts"
# Not tests/test_asv_e2e.py's environment: asv installs each commit into the environment it
# measures, so two test runs sharing one would measure each other's code.
ENV_DIR = Path(os.environ.get("QWEN_LORA_DASH_TEST_ASV_ENV",
                              REPO / ".asv" / "dash-test-env"))
MACHINE = "dash-e2e"
BENCH = ["--bench", "inference.Sampling.time_sample",
         "--bench", "inference.ForwardPass.time_forward"]
SLOWDOWN = '        __import__("time").sleep(0.002)  # injected slowdown (dashboard e2e test)\n'


def snapshot_tree(dest: Path) -> None:
    """Copy the working tree's tracked and untracked-but-not-ignored files (not results/)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, check=True, capture_output=True).stdout.split(b"\0")
    for raw in files:
        rel = raw.decode()
        if not rel or rel.startswith(("results/", "html/")) or not (REPO / rel).is_file():
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)


def inject_slowdown(repo: Path) -> None:
    path = repo / "src" / "qwen_lora" / "sampling.py"
    text = path.read_text()
    m = re.search(r"    def __call__\(self, logits[^\n]*\n", text)
    assert m, "Sampler.__call__ not found in src/qwen_lora/sampling.py: update the e2e test"
    path.write_text(text[:m.end()] + SLOWDOWN + text[m.end():])


def make(repo: Path, home: Path, *args: str, check: bool = True,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A target of this repository's Makefile in the temporary repository, with the
    developers' virtualenv (not rebuilt) and a private HOME."""
    venv = REPO / ".venv"
    proc = subprocess.run(["make", "--no-print-directory", f"VENV={venv}",
                           "-o", str(venv / ".installed"), *args],
                          cwd=repo, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "HOME": str(home), "ASV_MACHINE": MACHINE,
                               **(env or {})})
    if check and proc.returncode != 0:
        # the first failure's traceback (--show-stderr) first: the tail is mostly tables
        first = max(proc.stdout.find(" failed"), 0)
        raise AssertionError(f"make {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout[first:first + 4000]}\n...\n"
                             f"{proc.stdout[-5000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def history(tmp_path_factory) -> dict:
    if not (REPO / "asv.conf.json").exists():
        pytest.fail("asv.conf.json is missing: the benchmark suite is part of the repository")
    root = tmp_path_factory.mktemp("dash-e2e")
    repo, home = root / "repo", root / "home"
    repo.mkdir()
    home.mkdir()
    snapshot_tree(repo)
    rep = summary.report()
    conf = rep.load_json_with_comments(repo / "asv.conf.json")
    conf["env_dir"] = str(ENV_DIR)
    (repo / "asv.conf.json").write_text(json.dumps(conf, indent=2))
    git(repo, "init", "-q", "-b", "main")
    commits = []
    for message, change in (("baseline", None), ("slow sampler", inject_slowdown),
                            ("unrelated change", lambda r: (r / "NOTES").write_text("x\n"))):
        if change:
            change(repo)
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", message)
        commits.append(git(repo, "rev-parse", "HEAD").strip())
    env = rep.environment_name(repo / "asv.conf.json", "small")
    select = " ".join(["--machine", MACHINE, "-E", env, *BENCH])
    hashfile = root / "commits.txt"
    hashfile.write_text("\n".join(commits) + "\n")
    make(repo, home, "backfill", f"RANGE=HASHFILE:{hashfile}", f"asv_for={select}")
    summary_file = root / "step-summary.md"
    compare = make(repo, home, "bench-pr", f"BASE={commits[0]}", f"HEAD={commits[1]}",
                   f"asv_for={select}", check=False,
                   env={"GITHUB_STEP_SUMMARY": str(summary_file)})
    return {"repo": repo, "home": home, "commits": commits, "compare": compare,
            "step_summary": summary_file}


@pytest.fixture(scope="module")
def published(history) -> dict:
    make(history["repo"], history["home"], "dashboard")
    return history


def test_bench_pr_fails_on_the_injected_slowdown_and_reports_it(history):
    repo, compare = history["repo"], history["compare"]
    assert compare.returncode != 0, compare.stdout[-5000:]
    report_md = (repo / "bench-compare.md").read_text()
    assert "**Regression: the job fails.**" in report_md
    flagged = [line for line in report_md.splitlines() if line.startswith("| +")]
    assert any("inference.Sampling.time_sample('qwen_lora'" in line for line in flagged), \
        report_md
    assert "PERFORMANCE DECREASED" in (repo / "bench-compare.log").read_text()
    assert history["step_summary"].read_text() == report_md  # the job summary


def test_published_regressions_hold_the_injected_slowdown(published):
    repo = published["repo"]
    regressions = json.loads((repo / "html" / "regressions.json").read_text())["regressions"]
    names = [r[0] for r in regressions]
    assert any(n.startswith("inference.Sampling.time_sample('qwen_lora'") for n in names), names


GRAPH_POINTS = """(() => {
  const plot = $('#main-graph').data('plot');
  if (!plot) return null;
  const counts = plot.getData().map(s => (s.data || []).filter(p => p && p[1] !== null).length);
  return counts.some(c => c > 0) ? counts : null;
})()"""


@pytest.mark.skipif(find_chromium() is None,
                    reason="chromium is not installed (apt-get install chromium; .ci/run does)")
def test_dashboard_in_headless_chromium(published):
    repo, commits = published["repo"], published["commits"]
    ARTIFACTS.mkdir(exist_ok=True)
    with serve(repo / "html") as url, Browser(width=1400, height=900) as browser:
        browser.navigate(f"{url}/index.html#inference.Sampling.time_sample"
                         "?p-implementation='qwen_lora'&p-implementation='mlx_lm'")
        counts = browser.wait_for(GRAPH_POINTS, timeout=60)
        assert max(counts) == len(commits), counts  # a point per commit on a line
        browser.screenshot(ARTIFACTS / "e2e-graph.png")

        browser.navigate(f"{url}/index.html#regressions")
        rows = browser.wait_for("""(() => { const r = [...document.querySelectorAll(
            '#regressions-body tbody tr')].map(tr => tr.innerText); return r.length ? r : null;
            })()""", timeout=60)
        assert any("inference.Sampling.time_sample" in r and commits[1][:8] in r
                   for r in rows), rows
        browser.screenshot(ARTIFACTS / "e2e-regressions.png")

        browser.navigate(f"{url}/summary.html")
        verdicts = browser.evaluate("""Object.fromEntries([...document.querySelectorAll(
            'table.targets tbody tr')].map(tr => [tr.cells[0].innerText,
                                                  tr.cells[3].innerText]))""")
        assert verdicts["Sampling Overhead"] == "FAIL", verdicts
        browser.screenshot(ARTIFACTS / "e2e-summary.png", full_page=True)
        assert browser.console_errors() == []
