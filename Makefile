# Everything runs from a project-local virtual environment that the targets build themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# A CPU-only torch wheel for the parity tests, where the machine provides one locally.
TORCH_WHEEL ?= $(firstword $(wildcard /opt/wheels/torch-*+cpu-*.whl))

.PHONY: venv test test-slow lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[dev,parity]" $(TORCH_WHEEL)
	touch $@

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

test: lint
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache

# =============================================================================================
# Benchmarks: the asv suite in benchmarks/ (README "Benchmarks", docs/BENCHMARKS.md). asv.conf.json
# has two workloads, `default` (the benchmark plan's sizes) and `small` (long histories, pull
# requests, tests); each target picks one workload's environment with -E. One benchmark run at
# a time per machine: they measure wall-clock time.
# =============================================================================================
ASV := $(BIN)/asv
ASV_MACHINE ?= $(shell hostname)
BASE ?= main
HEAD ?= HEAD
RANGE ?= ALL
COMPARE_WORKLOAD ?= small
COMPARE_ROUNDS ?= 2
FACTOR ?= 1.1
PORT ?= 8080
# asv's name of a workload's environment, computed by asv from asv.conf.json, and the asv
# options that select it on this machine.
asv_env = $(shell $(BIN)/python -m qwen_lora.report --environment-name $(1))
asv_for = --machine "$(ASV_MACHINE)" -E "$(call asv_env,$(1))"
ASV_DEFAULT = $(call asv_for,default)
ASV_SMALL = $(call asv_for,small)

.PHONY: asv-machine bench bench-small bench-compare backfill publish preview report

# Register this machine with asv without questions (~/.asv-machine.json), with what asv
# detects of it: `asv machine --machine NAME --yes` alone records the name only.
asv-machine: $(STAMP)
	$(BIN)/python scripts/asv_machine.py "$(ASV_MACHINE)"

# The main job's environment: OpenBLAS picks the kernels of the processor it runs on. Some
# machines set OPENBLAS_CORETYPE (and OPENBLAS_L2_SIZE) for older OpenBLAS builds that fail on
# their processor; the scipy-openblas32 that qwen_lora installs is current (on an AVX-512 EPYC
# it picks SkylakeX kernels: 413 GFLOP/s sgemm against 239 with the Haswell ones a machine
# forces). Unset for this target's asv run alone; `make bench BENCH_ENV=` keeps them.
# `qwen-lora info` shows the kernels in use (blas_core).
BENCH_ENV ?= env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE

# The default workload on HEAD, then html/ and docs/BENCHMARKS.md (published even when a
# benchmark failed; the exit status is asv's).
bench: asv-machine
	$(BENCH_ENV) $(ASV) run $(ASV_DEFAULT) --show-stderr HEAD^!; status=$$?; \
	$(MAKE) --no-print-directory publish report && exit $$status

# The small workload on HEAD, then html/.
bench-small: asv-machine
	$(ASV) run $(ASV_SMALL) --show-stderr HEAD^!; status=$$?; \
	$(MAKE) --no-print-directory publish && exit $$status

# asv continuous: BASE against HEAD (COMPARE_WORKLOAD, small by default), COMPARE_ROUNDS
# rounds interleaved between the two commits; exits 1 when a benchmark got slower (or bigger)
# by more than FACTOR with statistical significance, 2 when a benchmark failed.
bench-compare: asv-machine
	$(ASV) continuous $(call asv_for,$(COMPARE_WORKLOAD)) -a rounds=$(COMPARE_ROUNDS) \
	  --factor $(FACTOR) --show-stderr "$(BASE)" "$(HEAD)"

# The small workload over RANGE (an asv range: A..B, ALL, HASHFILE:path), skipping commits
# already measured on this machine. --show-stderr: a failed setup says why in the log.
backfill: asv-machine
	$(ASV) run $(ASV_SMALL) --skip-existing --show-stderr "$(RANGE)"

publish: $(STAMP)
	$(ASV) publish

# asv preview listens on every interface; this serves html/ on the loopback only.
preview:
	@test -f html/index.html || { echo "html/ is empty: run make publish first" >&2; exit 1; }
	$(PYTHON) -m http.server $(PORT) --bind 127.0.0.1 --directory html

# docs/BENCHMARKS.md from the default workload's results of HEAD on this machine.
report: $(STAMP)
	$(BIN)/qwen-lora report --machine "$(ASV_MACHINE)" --workload default

# =============================================================================================
# Hosted dashboard and CI glue (issue 5): the targets .github/workflows/*.yml call, besides
# test, test-slow, bench-compare, backfill and asv-machine above; docs/DASHBOARD.md describes
# the flow. The results-* and backfill-plan targets need only git and a bare Python.
# =============================================================================================
RESULTS_BRANCH ?= asv-results
RESULTS_REMOTE ?= origin
CHUNKS ?= 4
STEPS ?= 8
SRC ?= chunks
DASH := PYTHONPATH=src $(PYTHON) -m qwen_lora_dash
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: ci-deps results-pull results-push results-merge backfill-plan backfill-steps \
	bench-new bench-pr pr-comment dashboard history

# Debian/Ubuntu packages of the slow tests: headless Chromium (the browser test) and shellcheck
# (actionlint checks the workflows' run: lines with it). Installed only where missing.
ci-deps:
	@if command -v chromium || command -v chromium-browser || command -v google-chrome; then :; \
	else $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; fi
	@command -v shellcheck || { $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q shellcheck; }

# results/ <-> the results branch; both merge, neither overwrites what the other side has.
results-pull:
	$(DASH).ci pull --results results --remote "$(RESULTS_REMOTE)" --branch "$(RESULTS_BRANCH)"

results-push:
	$(DASH).ci push --results results --remote "$(RESULTS_REMOTE)" --branch "$(RESULTS_BRANCH)" \
	  --message "asv results: $$(git rev-parse --short HEAD) on $(ASV_MACHINE)"

# Join result directories (SRC: a directory of downloaded chunk artifacts) into results/.
results-merge:
	$(DASH).ci merge "$(SRC)" --into results

# The job matrix of a fanned-out backfill: CHUNKS contiguous sub-ranges of RANGE as JSON.
backfill-plan:
	$(DASH).ci plan --range "$(RANGE)" --chunks "$(CHUNKS)"

# Nightly: the small workload on STEPS commits spread over the whole history, skipping those
# already measured on this machine (CI names it by runner class: ASV_MACHINE).
backfill-steps: asv-machine
	$(ASV) run $(ASV_SMALL) --skip-existing --steps "$(STEPS)" ALL

# Pushes to main: the small workload on every commit of the configured branches newer than
# the measured ones.
bench-new: asv-machine
	$(ASV) run $(ASV_SMALL) --skip-existing NEW

# Pull requests: bench-compare, with its table written to bench-compare.md (and the job summary).
bench-pr:
	$(DASH).ci run-compare --title "Benchmarks: $(BASE) -> $(HEAD)" -- \
	  $(MAKE) --no-print-directory bench-compare BASE="$(BASE)" HEAD="$(HEAD)"

# Post (or update) the comparison as a comment on pull request PR; needs gh and GH_TOKEN.
pr-comment:
	gh pr comment "$(PR)" --body-file bench-compare.md --edit-last --create-if-none

# The site: asv publish (with docs/BENCHMARKS.md), then the landing summary on top of html/.
dashboard: publish
	$(BIN)/python -m qwen_lora_dash.summary --results results --html html

# Real history on this machine: the small workload over every commit that has the package,
# then the default workload on HEAD, then the site (also when a benchmark failed on some
# commit: asv records the failure and the site shows it). Re-running skips what is measured.
history: $(STAMP)
	$(DASH).ci package-commits --out .asv/history-commits.txt
	-$(MAKE) --no-print-directory backfill RANGE=HASHFILE:.asv/history-commits.txt
	-$(MAKE) --no-print-directory bench
	$(MAKE) --no-print-directory dashboard
