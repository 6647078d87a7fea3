"""End to end through asv itself, with the small workload: a temporary git history of this
project measured by `asv run` and published by `asv publish`; `asv continuous` flags an
injected slowdown of decoding and an injected memory regression, and passes a change that
does nothing.

The history is this working tree committed three times: a baseline; a comment added to
generate.py (a change that does nothing); then decoding slowed down (a sleep after every
streamed token) and the KV cache grown in blocks twice as large (twice the bytes at the
workload's 256 tokens). asv builds and installs each commit into its own virtualenv, created
once in .asv/test-env and reused (the developers' .asv/env is left alone), under a private
HOME so that the developer's ~/.asv-machine.json is untouched.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ASV = Path(sys.executable).with_name("asv")
ENV_DIR = Path(os.environ.get("QWEN_LORA_TEST_ASV_ENV", REPO / ".asv" / "test-env"))
MACHINE = "asv-e2e"
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
# The benchmarks the injected regressions touch, and one they must leave alone.
BENCH = r"^(inference\.Generation\.time_per_token|memory\.PeakMemory\.track_kv_cache)\b"
DECODE_SLEEP = 0.002  # seconds per token: about +30% on the small workload's ~6 ms tokens

SLOW_DECODING = f'''

# Injected by tests/test_asv_e2e.py: decoding {DECODE_SLEEP * 1e3:g} ms slower per token.
_stream_generate_before_injection = stream_generate


def stream_generate(*args, **kwargs):
    for step in _stream_generate_before_injection(*args, **kwargs):
        yield step
        __import__("time").sleep({DECODE_SLEEP})
'''

BIGGER_CACHE = '''

# Injected by tests/test_asv_e2e.py: the KV cache grows in blocks twice as large.
_kv_cache_init_before_injection = KVCache.__init__


def _kv_cache_init_doubled(self, *args, **kwargs):
    _kv_cache_init_before_injection(self, *args, **kwargs)
    self.step *= 2


KVCache.__init__ = _kv_cache_init_doubled
'''


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True,
                          env={**os.environ, **GIT_ENV}).stdout.strip()


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


def asv_env(home: Path) -> dict[str, str]:
    """The environment for asv: a private HOME, but the user's pip configuration and caches."""
    env = {**os.environ, "HOME": str(home),
           "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))}
    for candidate in (Path.home() / ".config" / "pip" / "pip.conf", Path.home() / ".pip" /
                      "pip.conf"):
        if candidate.exists() and "PIP_CONFIG_FILE" not in env:
            env["PIP_CONFIG_FILE"] = str(candidate)
    return env


def asv(repo: Path, home: Path, *args: str, check: bool = True, timeout: float = 1800
        ) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(ASV), *args], cwd=repo, capture_output=True, text=True,
                          timeout=timeout, env=asv_env(home))
    if check and proc.returncode != 0:
        raise AssertionError(f"asv {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout[-5000:]}\n{proc.stderr[-3000:]}")
    return proc


def append(path: Path, code: str, anchor: str) -> None:
    text = path.read_text()
    assert anchor in text, f"{anchor!r} not in {path}: update tests/test_asv_e2e.py"
    path.write_text(text + code)


def add_comment(repo: Path) -> None:
    path = repo / "src" / "qwen_lora" / "generate.py"
    path.write_text(path.read_text() + "\n# A comment: this commit changes nothing.\n")


def inject_regressions(repo: Path) -> None:
    src = repo / "src" / "qwen_lora"
    append(src / "generate.py", SLOW_DECODING, "def stream_generate(")
    append(src / "cache.py", BIGGER_CACHE, "class KVCache")


@pytest.fixture(scope="module")
def env_lock() -> Iterator[None]:
    """One test session at a time in the shared environment: asv installs each commit into
    it in turn, and two sessions would swap each other's installs (and share the cores)."""
    ENV_DIR.mkdir(parents=True, exist_ok=True)
    with open(ENV_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def project(tmp_path_factory, env_lock) -> dict:
    """The temporary history, its asv configuration and the small workload's environment."""
    root = tmp_path_factory.mktemp("asv-e2e")
    repo, home = root / "repo", root / "home"
    repo.mkdir()
    home.mkdir()
    snapshot_tree(repo)
    from qwen_lora.report import environment_name, load_json_with_comments

    conf = load_json_with_comments(repo / "asv.conf.json")
    conf["env_dir"] = str(ENV_DIR)
    conf.pop("plugins", None)  # the dashboard's publisher has tests of its own
    (repo / "asv.conf.json").write_text(json.dumps(conf, indent=2))
    git(repo, "init", "-q", "-b", "main")
    commits = {}
    for name, change in (("baseline", None), ("noop", add_comment),
                         ("regressed", inject_regressions)):
        if change:
            change(repo)
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", name)
        commits[name] = git(repo, "rev-parse", "HEAD")
    asv(repo, home, "machine", "--machine", MACHINE, "--yes")
    env = environment_name(repo / "asv.conf.json", "small")
    return {"repo": repo, "home": home, "commits": commits, "env": env,
            "select": ["--machine", MACHINE, "-E", env, "--bench", BENCH]}


@pytest.fixture(scope="module")
def published(project) -> dict:
    repo, home, commits = project["repo"], project["home"], project["commits"]
    hashfile = repo.parent / "commits.txt"
    hashfile.write_text("\n".join(commits.values()) + "\n")
    asv(repo, home, "run", f"HASHFILE:{hashfile}", *project["select"], "--show-stderr")
    asv(repo, home, "publish")
    return project


def test_every_commit_gets_its_own_wheel(published):
    """asv built each commit from its own checkout: three wheels, each with its commit's
    code (the build cache keeps the last four)."""
    c = published["commits"]
    for name, commit in c.items():
        wheels = list(ENV_DIR.glob(f"*/asv-build-cache/{commit}/*.whl"))
        assert len(wheels) == 1, (name, wheels)
        with zipfile.ZipFile(wheels[0]) as wheel:
            generate = wheel.read("qwen_lora/generate.py").decode()
            cache = wheel.read("qwen_lora/cache.py").decode()
        assert ("this commit changes nothing" in generate) == (name != "baseline"), name
        injected = "Injected by tests/test_asv_e2e.py"
        assert (injected in generate) == (injected in cache) == (name == "regressed"), name


def test_published_json_holds_every_commit(published):
    html = published["repo"] / "html"
    index = json.loads((html / "index.json").read_text())
    published_hashes = set(index["revision_to_hash"].values())
    assert set(published["commits"].values()) <= published_hashes
    revisions = {h: int(r) for r, h in index["revision_to_hash"].items()}
    graphs = [p for p in html.glob("graphs/**/inference.Generation.time_per_token.json")
              if "summary" not in p.parts]
    assert graphs, "asv publish wrote no graph of the decoding benchmark"
    points = json.loads(graphs[0].read_text())
    assert {p[0] for p in points} >= {revisions[h] for h in published["commits"].values()}
    # Every line of the graph (qwen_lora, mlx-lm, PyTorch) has a value at every commit.
    assert all(len(p[1]) == 3 and all(v is not None for v in p[1]) for p in points), points


def test_memory_track_changes_exactly_where_the_code_does(published):
    """The KV-cache bytes are the formula at the first two commits and twice it at the
    third: each commit was built and installed anew, and memory is deterministic."""
    results = published["repo"] / "results" / MACHINE
    formula = 4 * 2 * 1 * 256 * 64 * 4
    by_commit = {}
    for path in results.glob("*.json"):
        if path.name == "machine.json":
            continue
        data = json.loads(path.read_text())
        row = data["results"]["memory.PeakMemory.track_kv_cache"]
        by_commit[data["commit_hash"]] = row[0]  # [qwen_lora, mlx_lm]
    c = published["commits"]
    assert by_commit[c["baseline"]] == [formula, formula]
    assert by_commit[c["noop"]] == [formula, formula]
    assert by_commit[c["regressed"]] == [2 * formula, formula]


def test_report_reads_real_asv_results(published, tmp_path):
    out = tmp_path / "B.md"
    proc = subprocess.run(
        [sys.executable, "-m", "qwen_lora.report", "--config",
         str(published["repo"] / "asv.conf.json"), "--machine", MACHINE, "--workload", "small",
         "--commit", published["commits"]["baseline"], "-o", str(out)],
        capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert f"qwen_lora: {4 * 2 * 256 * 64 * 4:,} bytes, equal to the formula" in text
    assert re.search(r"\| Per token \(ms\) \| [\d.]+ ± [\d.]+ \| [\d.]+ ± [\d.]+ \|", text)


def test_continuous_flags_slower_decoding_and_more_memory(project):
    c = project["commits"]
    proc = asv(project["repo"], project["home"], "continuous", *project["select"],
               c["baseline"], c["regressed"], check=False)
    out = proc.stdout
    assert proc.returncode == 1, out[-5000:] + proc.stderr[-3000:]
    assert "PERFORMANCE DECREASED" in out
    flagged = [line for line in out.splitlines() if re.match(r"\|?\s*\+\s", line)]
    assert any("inference.Generation.time_per_token('qwen_lora')" in line
               for line in flagged), out[-5000:]
    assert any("memory.PeakMemory.track_kv_cache('qwen_lora')" in line
               for line in flagged), out[-5000:]
    # The comparators' lines share the machine, not the code: nothing to flag there.
    assert not any("mlx_lm" in line or "torch" in line for line in flagged), out[-5000:]


def test_continuous_passes_a_change_that_does_nothing(project):
    c = project["commits"]
    proc = asv(project["repo"], project["home"], "continuous", *project["select"],
               c["baseline"], c["noop"], check=False)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert "PERFORMANCE DECREASED" not in proc.stdout
    assert not [line for line in proc.stdout.splitlines() if re.match(r"\|?\s*\+\s", line)]
