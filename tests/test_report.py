"""`qwen-lora report`: docs/BENCHMARKS.md from asv result files, with chosen numbers."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
from pathlib import Path

import pytest

from qwen_lora.cli import main as cli_main
from qwen_lora.report import (
    SEED_MAP,
    Measurement,
    ReportError,
    ResultSet,
    _across_runs,
    find_results,
    load_json_with_comments,
    main,
)

REPO = Path(__file__).resolve().parents[1]
CONFIG = ["--config", str(REPO / "asv.conf.json")]
SEED_TABLES = ["### LoRA Training Throughput", "### Gradient Computation",
               "### Token Generation Latency", "### KV-Cache Performance",
               "### Sampling Overhead", "### Peak Memory Usage", "### Tensor Operations",
               "### Model Components", "## Performance Targets"]

# (benchmark, param names, unit, {params tuple: (median, q25, q75)}) with chosen numbers.
IMPLS = ("qwen_lora", "mlx_lm", "torch")


def _spec() -> dict[str, tuple[list[str], list[list], str, dict[tuple, float]]]:
    two, three = ["qwen_lora", "mlx_lm"], list(IMPLS)
    ops = ["matmul", "softmax", "layer_norm", "rms_norm", "attention"]
    comps = ["embedding", "rope", "attention", "mlp", "layer"]
    strategies = ["greedy", "top_k", "top_p", "temperature"]
    spec = {
        # qwen_lora 0.2 s/step, mlx-lm 0.25: 125% of mlx-lm's throughput.
        "training.LoRATraining.time_step": (["implementation"], [three], "seconds",
                                            {("qwen_lora",): 0.2, ("mlx_lm",): 0.25,
                                             ("torch",): 0.1}),
        "training.LoRATraining.time_token": (["implementation"], [three], "seconds",
                                             {("qwen_lora",): 0.2 / 128, ("mlx_lm",): 0.25 / 128,
                                              ("torch",): 0.1 / 128}),
        "training.LoRATraining.time_step_cpu": (["implementation"], [three], "seconds",
                                                {("qwen_lora",): 0.3, ("mlx_lm",): 0.5,
                                                 ("torch",): 0.2}),
        # decoding: qwen_lora 5 ms, mlx-lm 5.1 ms: 102% of mlx-lm.
        "inference.Generation.time_per_token": (["implementation"], [three], "seconds",
                                                {("qwen_lora",): 0.005, ("mlx_lm",): 0.0051,
                                                 ("torch",): 0.01}),
        "inference.Generation.time_first_token": (["implementation"], [three], "seconds",
                                                  {(i,): 0.01 for i in IMPLS}),
        "inference.Generation.time_total": (["implementation"], [three], "seconds",
                                            {(i,): 0.2 for i in IMPLS}),
        "inference.KVCacheVsRecompute.time_token": (
            ["implementation", "mode"], [two, ["kv_cache", "recompute"]], "seconds",
            {("qwen_lora", "kv_cache"): 0.004, ("qwen_lora", "recompute"): 0.03,
             ("mlx_lm", "kv_cache"): 0.004, ("mlx_lm", "recompute"): 0.03}),
        # one forward pass: 4 ms; top-p at the small model's vocabulary: 60 us = 1.5%.
        "inference.ForwardPass.time_forward": (["implementation"], [two], "seconds",
                                               {(i,): 0.004 for i in two}),
        "inference.Sampling.time_sample": (
            ["implementation", "strategy", "vocabulary"], [two, strategies, [32000, 151936]],
            "seconds", {(i, s, v): (6e-5 if s == "top_p" else 1e-5) * (v / 32000)
                        for i in two for s in strategies for v in (32000, 151936)}),
        "training.GradientComputation.time_forward": (["implementation"], [two], "seconds",
                                                      {(i,): 0.1 for i in two}),
        "training.GradientComputation.time_backward": (["implementation"], [two], "seconds",
                                                       {(i,): 0.1 for i in two}),
        "training.GradientComputation.time_total": (["implementation"], [two], "seconds",
                                                    {(i,): 0.2 for i in two}),
        # prefill: qwen_lora 20 and 80 ms, mlx-lm 1.5x that, PyTorch 1.25x
        "inference.Prefill.time_first_token": (
            ["implementation", "tokens"], [three, [128, 512]], "seconds",
            {(i, t): f * t / 6400 for i, f in zip(IMPLS, (1.0, 1.5, 1.25), strict=True)
             for t in (128, 512)}),
        # the machine: 100 GFLOP/s; 20 GB/s over the small head (32,000 x 448 float32)
        "micro.MatmulRate.time_matmul": (["dtype", "size"], [["float32"], [2048]], "seconds",
                                         {("float32", 2048): 2 * 2048**3 / 1e11}),
        "micro.HeadMatvec.time_matvec": (["dtype"], [["float32"]], "seconds",
                                         {("float32",): 32000 * 448 * 4 / 2e10}),
        "memory.PeakMemory.track_model_load": (["implementation"], [two], "bytes",
                                               {(i,): 9e7 for i in two}),
        "memory.PeakMemory.track_forward": (["implementation"], [two], "bytes",
                                            {(i,): 1.1e8 for i in two}),
        # qwen_lora 5% more than mlx-lm: the memory target fails.
        "memory.PeakMemory.track_train_step": (["implementation"], [two], "bytes",
                                               {("qwen_lora",): 2.1e8, ("mlx_lm",): 2e8}),
        "memory.PeakMemory.track_kv_cache": (["implementation"], [two], "bytes",
                                             {(i,): 524288 for i in two}),
        # batched: qwen_lora 2 ms/token at batch 1 and 0.5 at batch 4, mlx-lm twice that.
        "inference.BatchGeneration.time_per_token": (
            ["implementation", "batch"], [two, [1, 4]], "seconds",
            {("qwen_lora", 1): 0.002, ("qwen_lora", 4): 0.0005, ("mlx_lm", 1): 0.004,
             ("mlx_lm", 4): 0.001}),
        "inference.QuantizedGeneration.time_per_token": (
            ["implementation", "bits"], [two, [8, 4]], "seconds",
            {(i, b): 0.001 * b for i in two for b in (8, 4)}),
        "memory.QuantizedWeights.track_weights": (
            ["implementation", "bits"], [two, [8, 4]], "bytes",
            {(i, b): 1e6 * b for i in two for b in (8, 4)}),
        "micro.TensorOps.time_op": (["implementation", "op"], [two, ops], "seconds",
                                    {(i, o): 1e-4 for i in two for o in ops}),
        "micro.ModelComponents.time_forward": (["implementation", "component"], [two, comps],
                                               "seconds",
                                               {(i, c): 0.005 for i in two for c in comps}),
    }
    return spec


def write_results(root: Path, commit: str, workload: str = "small",
                  machine: str = "box", extra: dict | None = None) -> Path:
    """A results directory in asv's format (version 2): benchmarks.json, machine.json and
    one result file of `commit`, the spread 10% either side of each median; `extra`:
    benchmarks beside `_spec`'s, in its form."""
    spec = {**_spec(), **(extra or {})}
    (root / machine).mkdir(parents=True, exist_ok=True)
    benchmarks = {"version": 2}
    results = {}
    for name, (names, params, unit, values) in spec.items():
        kind = "track" if unit == "bytes" else "time"
        benchmarks[name] = {"name": name, "param_names": names, "unit": unit, "type": kind,
                            "params": [[repr(v) for v in p] for p in params], "version": "1"}
        combos = [tuple(c) for c in itertools.product(*params)]
        medians = [values.get(c) for c in combos]
        row = [medians, [[repr(v) for v in p] for p in params], "1", 1795642100762, 1.0]
        if kind == "time":
            row += [[m * 0.8 for m in medians], [m * 1.2 for m in medians],
                    [m * 0.9 for m in medians], [m * 1.1 for m in medians],
                    [1] * len(combos), [10] * len(combos)]
        results[name] = row
    (root / "benchmarks.json").write_text(json.dumps(benchmarks))
    (root / machine / "machine.json").write_text(json.dumps(
        {"arch": "x86_64", "cpu": "Test CPU", "machine": machine, "num_cpu": "2",
         "os": "Linux", "ram": str(16 * 2**30), "version": 1}))
    data = {"commit_hash": commit, "env_name": f"virtualenv-py3.11-QWEN_LORA_WORKLOAD{workload}",
            "date": 1795642082000,
            "params": {"machine": machine, "python": "3.11", "mlx": "0.32.4",
                       "mlx-lm": "0.32.2"},
            "python": "3.11", "requirements": {}, "env_vars": {"QWEN_LORA_WORKLOAD": workload},
            "result_columns": ["result", "params", "version", "started_at", "duration",
                               "stats_ci_99_a", "stats_ci_99_b", "stats_q_25", "stats_q_75",
                               "stats_number", "stats_repeat", "samples", "profile"],
            "results": results, "durations": {}, "version": 2}
    path = root / machine / f"{commit[:8]}-env-{workload}.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture()
def head() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout.strip()


@pytest.fixture()
def report(tmp_path, head) -> str:
    results = tmp_path / "results"
    write_results(results, head)
    out = tmp_path / "BENCHMARKS.md"
    assert main([*CONFIG, "--results", str(results),
                 "--workload", "small", "--output", str(out)]) == 0
    return out.read_text()


def row(text: str, first_cell: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row {first_cell!r}")


def test_every_table_of_the_plan_is_filled(report, head):
    for heading in SEED_TABLES:
        assert heading in report, heading
    assert "TBD" not in report
    assert head[:8] in report and "Test CPU" in report and "mlx-lm**: 0.32.2" in report
    for _, spec in SEED_MAP:  # every row has its measurements
        assert f"`{spec}`" in report
    assert "**no result**" not in report


def test_numbers_medians_spreads_and_ratios(report):
    # 1 / (0.2/128) = 640 tokens/s, spread 10% of it; mlx-lm 512; ratio 640/512.
    assert row(report, "Tokens/sec")[1:5] == ["640 ± 64", "512 ± 51", "1,280 ± 128", "1.25x"]
    assert row(report, "Time/step (ms)")[1:5] == ["200 ± 20", "250 ± 25", "100 ± 10", "0.80x"]
    # CPU seconds over wall seconds times 2 cores.
    assert row(report, "CPU Utilization (2 cores)")[1:4] == ["75%", "100%", "100%"]
    assert row(report, "Memory (GB)")[1:3] == ["0.21", "0.20"]
    assert row(report, "With Cache")[3] == "7.50x"
    assert row(report, "Training Step")[1:4] == ["210.0", "200.0", "+10.0 MB (1.05x)"]


def test_batched_and_quantized_tables(report):
    assert row(report, "4")[1:6] == ["0.500 ± 0.050", "2,000 ± 200", "1.00 ± 0.10",
                                     "1,000 ± 100", "2.00x"]
    assert row(report, "8")[1:] == ["8.00 ± 0.80", "125 ± 12", "8.00 ± 0.80", "125 ± 12",
                                    "1.00x", "8.0", "8.0"]


def test_targets_are_judged_from_the_numbers(report):
    assert row(report, "Training Throughput")[2:4] == ["125% of mlx-lm", "**PASS**"]
    assert row(report, "Inference Speed")[2:4] == ["102% of mlx-lm (decoding)", "**PASS**"]
    assert row(report, "Memory Usage")[2:4] == ["worst 1.05x of mlx-lm (track_train_step)",
                                                "**FAIL**"]
    assert row(report, "KV-Cache Speedup")[2:4] == ["7.5x", "**PASS**"]
    # The small workload's model has the 32,000-token vocabulary: top-p 60 us / 4 ms.
    assert row(report, "Sampling Overhead")[2:4] == [
        "1.50% (worst: Top-p (p=0.9), vocabulary 32,000)", "**FAIL**"]


def test_sampling_overhead_is_judged_on_draws_that_share_an_evaluation(tmp_path, head):
    """With `time_overhead` measured, the verdict and the % columns take it; the draws
    evaluated alone stay in their columns."""
    two, strategies = ["qwen_lora", "mlx_lm"], ["greedy", "top_k", "top_p", "temperature"]
    shared = {"inference.Sampling.time_overhead": (
        ["implementation", "strategy", "vocabulary"], [two, strategies, [32000, 151936]],
        "seconds", {(i, s, v): (3e-5 if s == "top_k" else 1e-5) * (v / 32000)
                    for i in two for s in strategies for v in (32000, 151936)})}
    write_results(tmp_path / "results", head, extra=shared)
    out = tmp_path / "B.md"
    assert main([*CONFIG, "--results", str(tmp_path / "results"), "--workload", "small",
                 "-o", str(out)]) == 0
    text = out.read_text()
    assert row(text, "Sampling Overhead")[2:5] == [
        "0.75% (worst: Top-k (k=50), vocabulary 32,000)", "**PASS**",
        "`inference.Sampling.time_overhead` / `inference.ForwardPass.time_forward`"]
    # alone at both vocabularies, shared at the model's, its share of the 4 ms forward pass
    assert row(text, "Top-p (p=0.9)")[1:5] == ["60.0 ± 6.0", "285 ± 28", "10.0 ± 1.0", "0.25%"]
    assert "- Shared: the time a draw adds to an evaluation it shares" in text
    assert row(text, "Sampling: Top-p (p=0.9), shared")[2] == "4 results"


def test_sampling_alone_where_no_shared_draws_were_measured(report):
    assert "- One draw evaluated alone (`inference.Sampling.time_sample`" in report
    assert row(report, "Top-p (p=0.9)")[1:4] == ["60.0 ± 6.0", "285 ± 28", "1.50%"]
    assert row(report, "Sampling: Top-p (p=0.9), shared")[2] == \
        "none (older results: `inference.Sampling.time_sample` stands in)"


def test_kv_cache_formula_beside_the_measured_bytes(report):
    assert "4 × 2 × 1 × 1 × 256 × 64 × 4 bytes = 524,288 bytes" in report
    assert "qwen_lora: 524,288 bytes, equal to the formula at 4 bytes (float32, the CPU)" \
        in report
    assert "4 × 2 × 1 × 1 × 256 × 64 × 2 bytes = 262,144 bytes" in report
    assert "24 × 2 × 1 × 2 × 2048 × 64 × 2 bytes = 25,165,824 bytes" in report


def test_kv_cache_in_half_precision_matches_the_two_byte_formula(tmp_path, head):
    """A GPU run computes in float16: its cache holds half the float32 formula's bytes."""
    results = tmp_path / "results"
    path = write_results(results, head)
    data = json.loads(path.read_text())
    data["results"]["memory.PeakMemory.track_kv_cache"][0] = [262144, 262144 * 7]
    path.write_text(json.dumps(data))
    out = tmp_path / "B.md"
    assert main([*CONFIG, "--results", str(results), "--workload", "small", "-o", str(out)]) == 0
    text = out.read_text()
    assert "qwen_lora: 262,144 bytes, equal to the formula at 2 bytes (float16, a GPU)" in text
    assert "mlx-lm: 1,835,008 bytes, 3.500x the formula at 4 bytes" in text  # 14 heads


def test_prefill_beside_mlx_lm_and_pytorch(report):
    assert row(report, "128")[1:] == ["20.0 ± 2.0", "30.0 ± 3.0", "25.0 ± 2.5", "1.50x",
                                      "1.25x"]
    assert row(report, "512")[1] == "80.0 ± 8.0"


def test_distance_to_the_physical_limit(report):
    """The small model (4 layers of 448, 7 heads, 1 KV head, intermediate 1216, vocabulary
    32,000) on a machine of 100 GFLOP/s and 20 GB/s: decoding reads 22,708,224 float32
    weights (90.8 MB: 4.54 ms); a 128-token prefill computes 2.23 GFLOP (22.3 ms), a 64-token
    LoRA step 5.86 GFLOP (58.6 ms: twice the forward's 2.91 GFLOP of weights, three times its
    14.9 MFLOP of attention)."""
    assert "Matmul rate: 100.0 GFLOP/s (float32, one 2,048 x 2,048 product" in report
    assert "Memory bandwidth: 20.0 GB/s" in report
    assert row(report, "Decode, a token")[1:4] == ["0.09 GB of weights read", "4.54",
                                                   "5.00 ± 0.50"]
    assert row(report, "Decode, a token")[4] == "1.10x"  # 5 ms over 4.54
    assert row(report, "Prefill, 128 tokens")[1:3] == ["2.2 GFLOP", "22.3"]
    assert row(report, "Prefill, 128 tokens")[4] == "0.90x"  # 20 ms over 22.3
    assert row(report, "LoRA step, 64 tokens")[1:3] == ["5.9 GFLOP", "58.6"]
    assert row(report, "LoRA step, 64 tokens")[4:7] == ["3.41x", "250 ± 25", "4.27x"]


def test_missing_measurements_say_so(tmp_path, head):
    results = tmp_path / "results"
    path = write_results(results, head)
    data = json.loads(path.read_text())
    del data["results"]["training.LoRATraining.time_step"]
    path.write_text(json.dumps(data))
    out = tmp_path / "B.md"
    assert main([*CONFIG, "--results", str(results), "--workload", "small", "-o", str(out)]) == 0
    text = out.read_text()
    assert row(text, "Training Throughput")[2:4] == ["n/a", "**not measured**"]
    assert "| `training.LoRATraining.time_step` | **no result** |" in text


def test_rows_not_rerun_come_from_an_earlier_commit_and_say_so(tmp_path, head):
    """Several commits fill in order: the first where it has the benchmark, then the next."""
    results = tmp_path / "results"
    base, older = (subprocess.run(["git", "rev-parse", ref], cwd=REPO, capture_output=True,
                                  text=True, check=True).stdout.strip()
                   for ref in ("HEAD~1", "HEAD~2"))
    write_results(results, older)
    base_path = write_results(results, base)
    data = json.loads(base_path.read_text())
    del data["results"]["inference.KVCacheVsRecompute.time_token"]
    base_path.write_text(json.dumps(data))
    path = write_results(results, head)
    data = json.loads(path.read_text())
    del data["results"]["training.LoRATraining.time_step"]
    del data["results"]["inference.KVCacheVsRecompute.time_token"]
    del data["results"]["inference.Sampling.time_sample"]
    data["results"]["memory.PeakMemory.track_train_step"][0] = [1.0, 2.0]  # this run's
    path.write_text(json.dumps(data))
    out = tmp_path / "B.md"
    assert main([*CONFIG, "--results", str(results), "--workload", "small",
                 "--fill-from", base[:8], "--fill-from", older[:8], "-o", str(out)]) == 0
    text = out.read_text()
    assert row(text, "Time/step (ms)")[1:5] == ["200 ± 20", "250 ± 25", "100 ± 10", "0.80x"]
    assert (f"**From commit `{base[:8]}`** (not rerun at this one): "
            "`inference.Sampling.time_sample`, `training.LoRATraining.time_step`  ") in text
    assert (f"**From commit `{older[:8]}`** (not rerun at this one): "
            "`inference.KVCacheVsRecompute.time_token`  ") in text
    assert row(text, "Training Step")[1:3] == ["0.0", "0.0"]  # not filled: this run has it
    # a ratio of two benchmarks from two runs says so
    across = (f"across runs: `{base[:8]}` measured `inference.Sampling.time_sample`; "
              f"`{head[:8]}` measured `inference.ForwardPass.time_forward`")
    assert across in row(text, "Sampling Overhead")[2]
    assert f"- The % columns are {across}" in text
    # only the training row's ratio crosses runs: its rate and its time are named
    assert (f"- Ratios across runs: `{head[:8]}` measured `micro.MatmulRate.time_matmul`; "
            f"`{base[:8]}` measured `training.LoRATraining.time_step`\n") in text


def test_a_ratio_across_runs_names_only_measured_benchmarks():
    rs = ResultSet(path=Path("r.json"), commit="a" * 40, env_name="", env_vars={}, params={},
                   started=None)
    rs.values[("x.X.time_a", ())] = Measurement(1.0, "seconds")
    rs.values[("x.X.time_b", ())] = Measurement(2.0, "seconds")
    assert _across_runs(rs, "x.X.time_a", "x.X.time_b") == ""
    rs.filled["x.X.time_b"] = "b" * 40
    assert _across_runs(rs, "x.X.time_a", "x.X.time_b", "x.X.time_none") == (
        "across runs: `aaaaaaaa` measured `x.X.time_a`; `bbbbbbbb` measured `x.X.time_b`")
    assert _across_runs(rs, "x.X.time_b", "x.X.time_none") == ""  # one run measured them


def test_results_are_chosen_by_machine_commit_and_workload(tmp_path, head, capsys):
    results = tmp_path / "results"
    write_results(results, head, workload="small", machine="a")
    write_results(results, head, workload="default", machine="a")
    write_results(results, head, workload="small", machine="b")
    rs, info, machine = find_results(results, "a", None, "default", REPO)
    assert (rs.workload, machine, info["machine"]) == ("default", "a", "a")
    with pytest.raises(ReportError, match="several machines"):
        find_results(results, None, None, "small", REPO)
    with pytest.raises(ReportError, match="no 'small'-workload results of commit"):
        find_results(results, "a", "HEAD~1", "small", REPO)
    assert main([*CONFIG, "--results", str(results), "--machine", "c", "-o", "-"]) == 2
    assert "no results of machine 'c'" in capsys.readouterr().err


def test_qwen_lora_report_subcommand(tmp_path, head, capsys):
    results = tmp_path / "results"
    write_results(results, head)
    out = tmp_path / "docs" / "BENCHMARKS.md"
    assert cli_main(["report", *CONFIG, "--results", str(results), "--workload", "small",
                     "--output", str(out)]) == 0
    assert out.read_text().startswith("# qwen-lora Benchmarks")
    assert cli_main(["report", *CONFIG, "--results", str(tmp_path / "none")]) == 2
    assert "no asv results directory" in capsys.readouterr().err


def test_ratios_near_one_keep_their_difference():
    from qwen_lora.report import _times

    assert [_times(r) for r in (0.909, 1.0, 1.0042, 0.9961, 1.05)] == [
        "0.91x", "1.00x", "1.004x", "0.996x", "1.05x"]


def test_json_comments_are_stripped_outside_strings(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{\n  // a comment\n  "url": "https://x//y", // trailing\n  "a": "\\"//"\n}')
    assert load_json_with_comments(path) == {"url": "https://x//y", "a": '"//'}


def test_committed_report_is_complete():
    """docs/BENCHMARKS.md, generated from a real run on this project's machine."""
    text = (REPO / "docs" / "BENCHMARKS.md").read_text()
    assert "TBD" not in text and "**no result**" not in text
    for heading in SEED_TABLES:
        assert heading in text, heading
    assert re.search(r"qwen_lora: [\d,]+ bytes, equal to the formula", text)
    assert "**Workload**: `default`" in text
