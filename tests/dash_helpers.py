"""Helpers of the dashboard tests: a static server on loopback, asv with a private HOME (so
that no test touches the developer's ~/.asv-machine.json), and a small asv project whose
benchmarks carry the real suite's names but report exact, chosen numbers.

The small project is a real git repository measured by a real `asv run` (an `existing`
environment: the test's own Python) and published by a real `asv publish`; only the numbers
are fixed, through an asv `timer` that advances by what each benchmark says it took.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASV = Path(sys.executable).with_name("asv")
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True,
                          env={**os.environ, **GIT_ENV}).stdout


def asv(repo: Path, home: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run asv in `repo` with HOME=`home` (asv keeps its machine file in $HOME)."""
    proc = subprocess.run([str(ASV), *args], cwd=repo, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HOME": str(home)})
    if proc.returncode != 0:
        raise AssertionError(f"asv {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[str]:
    """A static HTTP server over `directory` on 127.0.0.1 (a free port); yields its URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


# -- a small asv project with the real suite's benchmark names ------------------------------

TOY_CONF = {
    "version": 1, "project": "toy-qwen-lora", "project_url": "https://example.invalid/toy",
    "show_commit_url": "https://example.invalid/toy/commit/", "repo": ".",
    "branches": ["main"], "environment_type": "existing", "benchmark_dir": "benchmarks",
    "results_dir": "results", "html_dir": "html", "hash_length": 8,
    "build_command": [], "install_command": [], "uninstall_command": [],
    "plugins": [".src.qwen_lora_dash.asv_plugin"],
    "regressions_thresholds": {"^(?!memory\\.).*": 0.1, "memory\\..*": 0.01},
}

TOY_COMMON = '''
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from toydata import NUMBERS

IMPLS = ["qwen_lora", "mlx_lm"]


class Clock:
    """An asv timer that advances only by what a benchmark reports."""
    def __init__(self):
        self.now = 0.0
    def __call__(self):
        return self.now


CLOCK = Clock()


def spend(*key):
    CLOCK.now += NUMBERS["/".join(map(str, key))]


class Exact:
    timer = CLOCK
    number = 1
    repeat = 3
    warmup_time = 0
'''

TOY_TRAINING = '''
from .common import IMPLS, Exact, spend


class LoRATraining(Exact):
    params = [IMPLS]
    param_names = ["implementation"]

    def time_step(self, impl):
        spend("train", impl)
'''

TOY_INFERENCE = '''
from .common import IMPLS, Exact, spend


class Generation(Exact):
    params = [IMPLS]
    param_names = ["implementation"]

    def time_per_token(self, impl):
        spend("token", impl)


class KVCacheVsRecompute(Exact):
    params = [IMPLS, ["kv_cache", "recompute"]]
    param_names = ["implementation", "mode"]

    def time_token(self, impl, mode):
        spend(mode, impl)


class Sampling(Exact):
    params = [IMPLS, ["greedy", "top_p"], [32000, 151936]]
    param_names = ["implementation", "strategy", "vocabulary"]

    def time_sample(self, impl, strategy, vocab):
        spend("sample", strategy, vocab)


class ForwardPass(Exact):
    params = [IMPLS]
    param_names = ["implementation"]

    def time_forward(self, impl):
        spend("forward", impl)
'''

TOY_MEMORY = '''
from .common import IMPLS, NUMBERS


class PeakMemory:
    params = [IMPLS]
    param_names = ["implementation"]
    unit = "bytes"

    def track_forward(self, impl):
        return NUMBERS["mem/" + impl]
'''

BASE_NUMBERS = {
    "train/qwen_lora": 0.0100, "train/mlx_lm": 0.0100,
    "token/qwen_lora": 0.0100, "token/mlx_lm": 0.0100,
    "kv_cache/qwen_lora": 0.0100, "kv_cache/mlx_lm": 0.0100,
    "recompute/qwen_lora": 0.0500, "recompute/mlx_lm": 0.0500,
    "sample/greedy/32000": 0.00002, "sample/top_p/32000": 0.00005,
    "sample/greedy/151936": 0.0001, "sample/top_p/151936": 0.0004,
    "forward/qwen_lora": 0.0100, "forward/mlx_lm": 0.0100,
    "mem/qwen_lora": 100 * 2**20, "mem/mlx_lm": 110 * 2**20,
}


def make_toy_project(root: Path, versions: list[dict[str, float]],
                     docs: str | None = "# Benchmarks\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
                     ) -> list[str]:
    """A git repository with one commit per entry of `versions` (overrides of BASE_NUMBERS);
    returns the commits, oldest first."""
    root.mkdir(parents=True)
    git(root, "init", "-q", "-b", "main")
    (root / "asv.conf.json").write_text(json.dumps(TOY_CONF, indent=2))
    bench = root / "benchmarks"
    bench.mkdir()
    (bench / "__init__.py").write_text("")
    for name, text in (("common", TOY_COMMON), ("training", TOY_TRAINING),
                       ("inference", TOY_INFERENCE), ("memory", TOY_MEMORY)):
        (bench / f"{name}.py").write_text(text)
    (root / "src").symlink_to(REPO / "src")  # the plugin: ".src.qwen_lora_dash.asv_plugin"
    (root / ".gitignore").write_text("src\nresults/\nhtml/\n.asv/\n")
    if docs is not None:
        (root / "docs").mkdir()
        (root / "docs" / "BENCHMARKS.md").write_text(docs)
    commits = []
    for i, overrides in enumerate(versions):
        numbers = {**BASE_NUMBERS, **overrides}
        (root / "toydata.py").write_text(f"NUMBERS = {numbers!r}\n")
        git(root, "add", "-A")
        git(root, "commit", "-q", "-m", f"version {i}")
        commits.append(git(root, "rev-parse", "HEAD").strip())
    return commits


def measure_toy_project(root: Path, home: Path, commits: list[str],
                        machine: str = "toybox") -> None:
    """`asv run` each commit (checked out, as asv's own environments would build it)."""
    asv(root, home, "machine", "--machine", machine, "--yes")
    for commit in commits:
        git(root, "checkout", "-q", commit)
        asv(root, home, "run", "--environment", f"existing:{sys.executable}",
            "--set-commit-hash", commit, "--machine", machine, "--show-stderr")
    git(root, "checkout", "-q", "main")
