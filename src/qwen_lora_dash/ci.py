"""Glue between asv and CI: commit lists, backfill chunks, result merging and the results branch.

asv keeps one JSON file per commit and machine under `results/<machine>/`, plus
`results/<machine>/machine.json` and `results/benchmarks.json`. Every command here works on
that layout and on plain git, so that the GitHub workflows stay thin `make` calls and the same
commands run on a laptop:

- `package-commits`: the first-parent commits that contain the package (the history to measure);
- `plan`: split a commit range into contiguous chunks, as a JSON job matrix for a fan-out;
- `merge`: join result directories (the chunks of a fan-out) into one;
- `pull` / `push`: keep `results/` on a branch of its own, so that history survives ephemeral
  runners; both merge rather than overwrite, and `push` retries when another job pushed first;
- `run-compare` / `compare-report`: run `make bench-compare`, keep its log, and turn it into
  Markdown for the job summary and the PR comment, exiting with the comparison's status.

Run `python -m qwen_lora_dash.ci --help`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

PACKAGE_MARKER = "src/qwen_lora/__init__.py"
RESULTS_BRANCH = "asv-results"
BOT_IDENTITY = {"GIT_AUTHOR_NAME": "asv results", "GIT_AUTHOR_EMAIL": "asv-results@users.noreply",
                "GIT_COMMITTER_NAME": "asv results",
                "GIT_COMMITTER_EMAIL": "asv-results@users.noreply"}


class CIError(RuntimeError):
    """A git command failed or the inputs are inconsistent."""


def git(*args: str, cwd: Path | str = ".", env: dict[str, str] | None = None,
        check: bool = True, input: bytes | None = None) -> str:
    """Run git and return its stdout as text; raise CIError with stderr on failure."""
    proc = subprocess.run(["git", *args], cwd=cwd, input=input, capture_output=True,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise CIError(f"git {' '.join(args)}: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode()


# -- commit lists ---------------------------------------------------------------------------

def first_parent_commits(rev_range: str = "HEAD", cwd: Path | str = ".") -> list[str]:
    """The commits of `rev_range` along first parents, oldest first (asv's own order is
    `git rev-list --first-parent`, newest first)."""
    out = git("rev-list", "--first-parent", "--reverse", *rev_range.split(), "--", cwd=cwd)
    return out.split()


def commits_with_path(commits: Sequence[str], path: str = PACKAGE_MARKER,
                      cwd: Path | str = ".") -> list[str]:
    """The subset of `commits` whose tree contains `path` (one `git cat-file` for all)."""
    if not commits:
        return []
    query = "".join(f"{c}:{path}\n" for c in commits).encode()
    out = git("cat-file", "--batch-check", cwd=cwd, input=query)
    return [c for c, line in zip(commits, out.splitlines(), strict=True)
            if not line.endswith(" missing")]


def package_commits(rev_range: str = "HEAD", cwd: Path | str = ".") -> list[str]:
    """Every first-parent commit of `rev_range` that has the package, oldest first."""
    return commits_with_path(first_parent_commits(rev_range, cwd), PACKAGE_MARKER, cwd)


def has_parent(commit: str, cwd: Path | str = ".") -> bool:
    return git("rev-parse", "--verify", "--quiet", f"{commit}^", cwd=cwd, check=False) != ""


def plan_chunks(commits: Sequence[str], chunks: int, cwd: Path | str = ".") -> list[dict[str, Any]]:
    """Split `commits` (oldest first, along first parents) into at most `chunks` contiguous
    pieces. Each piece's `range` is a git range that `asv run RANGE` expands (with
    `rev-list --first-parent`) to exactly that piece: `FIRST^..LAST`, or `LAST` alone when
    FIRST is a root commit."""
    if chunks < 1:
        raise CIError("chunks must be at least 1")
    commits = list(commits)
    count = min(chunks, len(commits))
    plan: list[dict[str, Any]] = []
    for i in range(count):
        piece = commits[len(commits) * i // count: len(commits) * (i + 1) // count]
        first, last = piece[0], piece[-1]
        rev = f"{first}^..{last}" if has_parent(first, cwd) else last
        plan.append({"chunk": i + 1, "range": rev, "commits": len(piece),
                     "name": f"{i + 1}/{count} {first[:8]}..{last[:8]} ({len(piece)})"})
    return plan


# -- merging result directories -------------------------------------------------------------

def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=4, sort_keys=True) + "\n")


def merge_result_file(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """One commit's results measured twice on one machine and environment: the union of the
    benchmarks, `new`'s measurement winning where both have one."""
    if old.get("result_columns") != new.get("result_columns"):
        return new
    merged = {**old, **new}
    for key in ("results", "durations"):
        if isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
            merged[key] = {**old[key], **new[key]}
    return merged


def merge_dirs(sources: Iterable[Path], dest: Path) -> dict[str, int]:
    """Merge asv result directories into `dest`: result files are copied, or merged per
    benchmark where `dest` already has a different file for the same commit, machine and
    environment; `benchmarks.json` becomes the union of the benchmark definitions (later
    sources win); `machine.json` is kept where present. Returns counts for a log line."""
    counts = {"added": 0, "merged": 0, "same": 0}
    dest.mkdir(parents=True, exist_ok=True)
    for src in sources:
        src = Path(src)
        for path in sorted(src.rglob("*.json")):
            rel = path.relative_to(src)
            target = dest / rel
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
                counts["added"] += 1
            elif target.read_bytes() == path.read_bytes() or rel.name == "machine.json":
                counts["same"] += 1  # machine.json: one name per runner class, first one wins
            else:
                have, incoming = _read_json(target), _read_json(path)
                if rel.name == "benchmarks.json" and len(rel.parts) == 1:
                    merged = {**have, **incoming}
                else:
                    merged = merge_result_file(have, incoming)
                if merged == have:
                    counts["same"] += 1
                else:
                    _write_json(target, merged)
                    counts["merged"] += 1
    return counts


# -- the results branch ---------------------------------------------------------------------

def remote_branch_exists(remote: str, branch: str, cwd: Path | str = ".") -> bool:
    out = git("ls-remote", "--heads", remote, f"refs/heads/{branch}", cwd=cwd)
    return out.strip() != ""


def fetch_branch(remote: str, branch: str, cwd: Path | str = ".") -> str | None:
    """Fetch `branch` from `remote` and return its commit, or None if it does not exist."""
    if not remote_branch_exists(remote, branch, cwd):
        return None
    git("fetch", "--quiet", "--no-tags", remote,
        f"+refs/heads/{branch}:refs/remotes/{remote}/{branch}", cwd=cwd)
    return git("rev-parse", f"refs/remotes/{remote}/{branch}", cwd=cwd).strip()


def extract_tree(commit: str, subdir: str, into: Path, cwd: Path | str = ".") -> Path:
    """Write `subdir` of `commit` under `into` (so `into/subdir/...`) and return that path."""
    proc = subprocess.run(["git", "archive", "--format=tar", commit, subdir], cwd=cwd,
                          capture_output=True)
    if proc.returncode != 0:  # the branch has no such directory yet
        return into / subdir
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into / subdir


def pull_results(results: Path, remote: str = "origin", branch: str = RESULTS_BRANCH,
                 cwd: Path | str = ".") -> dict[str, int] | None:
    """Merge the results kept on `remote`'s `branch` into the local `results` directory."""
    tip = fetch_branch(remote, branch, cwd)
    if tip is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        tree = extract_tree(tip, results.name, Path(tmp), cwd)
        return merge_dirs([tree], results) if tree.exists() else {}


def _results_tree(results: Path, cwd: Path | str) -> str:
    """The git tree of a commit whose only content is the `results` directory."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        git("read-tree", "--empty", cwd=cwd, env=env)
        git("add", "--force", "--", str(results), cwd=cwd, env=env)
        return git("write-tree", cwd=cwd, env=env).strip()


def push_results(results: Path, remote: str = "origin", branch: str = RESULTS_BRANCH,
                 message: str = "asv results", cwd: Path | str = ".",
                 attempts: int = 3) -> str | None:
    """Commit `results` (and nothing else) on top of `remote`'s `branch` and push it.

    The local directory is first merged with what the branch holds, so nothing measured
    elsewhere is lost; if another job pushed in between, fetch, merge and try again.
    Returns the pushed commit, or None when the branch already held exactly these files."""
    cwd = Path(cwd)
    results = Path(os.path.relpath(Path(results).resolve(), cwd.resolve()))
    for attempt in range(1, attempts + 1):
        pull_results(cwd / results, remote, branch, cwd)
        tip = fetch_branch(remote, branch, cwd)
        tree = _results_tree(results, cwd)
        if tip is not None and git("rev-parse", f"{tip}^{{tree}}", cwd=cwd).strip() == tree:
            return None
        env = {k: v for k, v in BOT_IDENTITY.items() if k not in os.environ}
        parents = ["-p", tip] if tip else []
        commit = git("commit-tree", tree, *parents, "-m", message, cwd=cwd, env=env).strip()
        proc = subprocess.run(["git", "push", "--quiet", remote, f"{commit}:refs/heads/{branch}"],
                              cwd=cwd, capture_output=True, text=True)
        if proc.returncode == 0:
            return commit
        print(f"push attempt {attempt} failed: {proc.stderr.strip()}", file=sys.stderr)
    raise CIError(f"could not push {results} to {remote} {branch} in {attempts} attempts")


# -- asv continuous output ------------------------------------------------------------------

def compare_report(log: str, title: str = "Benchmark comparison",
                   failed: bool | None = None) -> str:
    """Markdown for a job summary or PR comment from the output of `asv continuous`:
    its verdict lines, its comparison tables (already Markdown) and the full log folded."""
    lines = log.splitlines()
    tables = [ln for ln in lines if ln.startswith("|")]
    verdicts = [ln.strip() for ln in lines
                if "BENCHMARKS HAVE CHANGED SIGNIFICANTLY" in ln or "PERFORMANCE" in ln
                or "BENCHMARKS NOT SIGNIFICANTLY CHANGED" in ln]
    regressed = any("PERFORMANCE DECREASED" in v for v in verdicts)
    if failed is None:
        failed = regressed
    status = ("Regression: the job fails" if regressed
              else "The comparison failed: see the log" if failed
              else "No significant regression")
    out = [f"## {title}", "", f"**{status}.**", ""]
    out += [f"- {v}" for v in dict.fromkeys(verdicts)]
    if tables:
        out += ["", *tables]
    tail = "\n".join(lines[-400:])
    out += ["", "<details><summary>asv continuous log</summary>", "", "```text", tail, "```",
            "", "</details>", ""]
    return "\n".join(out)


def run_compare(command: Sequence[str], log: Path, markdown: Path,
                title: str = "Benchmark comparison") -> int:
    """Run a comparison command (`make bench-compare ...`), echoing and logging its output;
    write the Markdown report to `markdown` and append it to `$GITHUB_STEP_SUMMARY` when
    set. Returns the command's exit status, so that a flagged regression fails the job."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as sink:
        proc = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
            sink.write(line)
        status = proc.wait()
    report = compare_report(log.read_text(errors="replace"), title, failed=status != 0)
    markdown.write_text(report)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a") as out:
            out.write(report)
    return status


def github_output(name: str, value: str) -> None:
    """Set a step output when running in GitHub Actions (`$GITHUB_OUTPUT`)."""
    target = os.environ.get("GITHUB_OUTPUT")
    if target:
        with open(target, "a") as out:
            out.write(f"{name}={value}\n")


# -- command line ---------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen_lora_dash.ci",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("package-commits", help="first-parent commits that have the package")
    p.add_argument("--range", default="HEAD", dest="rev_range")
    p.add_argument("--out", type=Path, help="write a HASHFILE for `asv run HASHFILE:PATH`")

    p = sub.add_parser("plan", help="JSON job matrix of contiguous commit ranges")
    p.add_argument("--range", default="HEAD", dest="rev_range",
                   help="a git range or revision; ALL (asv's word) means HEAD's history")
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--all-commits", action="store_true",
                   help="include commits without the package")

    p = sub.add_parser("merge", help="merge asv result directories into one")
    p.add_argument("sources", nargs="+", type=Path,
                   help="result directories, or directories of them (e.g. downloaded artifacts)")
    p.add_argument("--into", type=Path, default=Path("results"))

    for name in ("pull", "push"):
        p = sub.add_parser(name, help=f"{name} results/ from/to the results branch")
        p.add_argument("--results", type=Path, default=Path("results"))
        p.add_argument("--remote", default="origin")
        p.add_argument("--branch", default=RESULTS_BRANCH)
        if name == "push":
            p.add_argument("--message", default="asv results")

    p = sub.add_parser("run-compare", help="run a comparison command, log it, report it")
    p.add_argument("--log", type=Path, default=Path("bench-compare.log"))
    p.add_argument("--markdown", type=Path, default=Path("bench-compare.md"))
    p.add_argument("--title", default="Benchmark comparison")
    p.add_argument("command", nargs=argparse.REMAINDER)

    p = sub.add_parser("compare-report", help="Markdown from an `asv continuous` log")
    p.add_argument("log", type=Path)
    p.add_argument("--title", default="Benchmark comparison")
    p.add_argument("--status", type=int, help="exit status of the comparison")

    args = parser.parse_args(argv)
    try:
        if args.cmd == "package-commits":
            commits = package_commits(args.rev_range)
            text = "".join(f"{c}\n" for c in commits)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(text)
                print(f"{len(commits)} commits with the package -> {args.out}", file=sys.stderr)
            else:
                sys.stdout.write(text)
        elif args.cmd == "plan":
            rev_range = "HEAD" if args.rev_range == "ALL" else args.rev_range  # asv's ALL
            commits = first_parent_commits(rev_range)
            if not args.all_commits:
                commits = commits_with_path(commits)
            if not commits:
                raise CIError(f"no commits to measure in {rev_range!r}")
            matrix = json.dumps({"include": plan_chunks(commits, args.chunks)})
            github_output("matrix", matrix)
            print(matrix)
        elif args.cmd == "merge":
            sources: list[Path] = []
            for src in args.sources:  # an artifact directory holds one result tree per chunk
                nested = [d for d in sorted(src.iterdir()) if (d / "benchmarks.json").exists()]
                sources += [src] if (src / "benchmarks.json").exists() or not nested else nested
            print(json.dumps(merge_dirs(sources, args.into)))
        elif args.cmd == "pull":
            counts = pull_results(args.results, args.remote, args.branch)
            print("no results branch yet" if counts is None else json.dumps(counts))
        elif args.cmd == "push":
            commit = push_results(args.results, args.remote, args.branch, args.message)
            print(f"pushed {commit}" if commit else "results branch already up to date")
        elif args.cmd == "run-compare":
            command = args.command[1:] if args.command[:1] == ["--"] else args.command
            if not command:
                raise CIError("run-compare needs a command after --")
            return run_compare(command, args.log, args.markdown, args.title)
        elif args.cmd == "compare-report":
            failed = None if args.status is None else args.status != 0
            print(compare_report(args.log.read_text(errors="replace"), args.title, failed))
    except CIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
