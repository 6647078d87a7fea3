"""`qwen-lora report`: docs/BENCHMARKS.md from the results of the asv suite (benchmarks/).

Every table of the benchmark plan (the seed), filled from one commit's results on one machine
and workload: medians with their spread (half the interquartile range of asv's samples),
qwen_lora beside mlx-lm (and PyTorch where measured) and the ratio, the machine, commit and
versions, the KV-cache formula beside the measured bytes, and the plan's performance targets
judged from the numbers. It reads asv's JSON files directly, so it needs neither asv nor MLX:
it imports the standard library only (the dashboard, qwen_lora_dash.summary, loads this file
by path inside `asv publish` and shares its reader and its judgements).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import socket
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

WORKLOAD_VAR = "QWEN_LORA_WORKLOAD"
QWEN_LORA, MLX_LM, TORCH = "qwen_lora", "mlx_lm", "torch"
IMPL = "implementation"
NAMES = {QWEN_LORA: "qwen_lora", MLX_LM: "mlx-lm", TORCH: "PyTorch"}

# The workloads of benchmarks/common.py, for the text (the numbers come from the results).
WORKLOADS = {
    "default": dict(model="Qwen2.5-Coder-0.5B architecture (494M parameters, 24 layers, 14 "
                    "query and 2 key/value heads of 64, vocabulary 151,936), random weights",
                    layers=24, kv_heads=2, head_dim=64, vocab=151936, train_seq=512,
                    hidden=896, intermediate=4864, heads=14,
                    prompt=128, new_tokens=100, context=512, kv_tokens=2048, op_size=1024,
                    component_seq=512, batch_prompt=32, batch_tokens=8),
    "small": dict(model="the same architecture scaled down (23M parameters, 4 layers, 7 query "
                  "heads and 1 key/value head of 64, vocabulary 32,000), random weights, "
                  "one thread", layers=4, kv_heads=1, head_dim=64, vocab=32000, train_seq=64,
                  hidden=448, intermediate=1216, heads=7,
                  prompt=32, new_tokens=32, context=128, kv_tokens=256, op_size=256,
                  component_seq=128, batch_prompt=32, batch_tokens=8),
}


class ReportError(ValueError):
    """Results that cannot make a report; the message says what is missing."""


# -- reading asv's results ------------------------------------------------------------------

def load_json_with_comments(path: Path) -> dict[str, Any]:
    """asv.conf.json: JSON with // line comments (outside strings)."""
    out, in_string, escaped, i = [], False, False, 0
    text = path.read_text()
    while i < len(text):
        ch = text[i]
        if in_string:
            out.append(ch)
            if ch == '"' and not escaped:
                in_string = False
            escaped = ch == "\\" and not escaped
        elif ch == '"':
            in_string = True
            out.append(ch)
        elif text.startswith("//", i):
            while i < len(text) and text[i] != "\n":
                i += 1
            continue
        else:
            out.append(ch)
        i += 1
    return json.loads("".join(out))


def _param_value(text: str) -> Any:
    """asv keeps parameter values as their repr: "'qwen_lora'" -> 'qwen_lora', '512' -> 512."""
    try:
        return json.loads(text)
    except ValueError:
        return text.strip("'")


@dataclass(frozen=True)
class Measurement:
    """One benchmark result: the median, asv's quartiles of the samples, the sample count."""

    value: float
    unit: str
    q25: float | None = None
    q75: float | None = None
    repeat: int | None = None

    @property
    def spread(self) -> float | None:
        """Half the interquartile range."""
        if self.q25 is None or self.q75 is None:
            return None
        return (self.q75 - self.q25) / 2


@dataclass
class ResultSet:
    """The results of one commit, machine and environment (one asv result file)."""

    path: Path
    commit: str
    env_name: str
    env_vars: dict[str, str]
    params: dict[str, str]
    started: float | None
    values: dict[tuple[str, tuple[tuple[str, Any], ...]], Measurement] = field(
        default_factory=dict)
    filled: dict[str, str] = field(default_factory=dict)  # benchmark -> commit it came from

    @property
    def workload(self) -> str:
        return self.env_vars.get(WORKLOAD_VAR, "default")

    def get(self, benchmark: str, **params: Any) -> Measurement | None:
        """The measurement of `benchmark` at exactly the given parameter values."""
        return self.values.get((benchmark, tuple(sorted(params.items()))))

    def series(self, benchmark: str) -> list[tuple[dict[str, Any], Measurement]]:
        return [(dict(p), m) for (name, p), m in self.values.items() if name == benchmark]

    def commit_of(self, benchmark: str) -> str:
        """The commit whose run measured `benchmark` (an earlier one where it was filled)."""
        return self.filled.get(benchmark, self.commit)

    def fill_from(self, base: ResultSet) -> None:
        """Take the benchmarks this set lacks whole from `base` (an earlier run on the same
        machine), noting which: each benchmark's lines still come from one run."""
        present = {name for name, _ in self.values}
        for (name, key), m in base.values.items():
            if name not in present:
                self.values[(name, key)] = m
                self.filled[name] = base.commit


def read_result_file(path: Path, benchmarks: dict[str, Any]) -> ResultSet:
    """Parse one asv result file (format version 2) into measurements by parameters."""
    data = json.loads(path.read_text())
    columns = data["result_columns"]
    rs = ResultSet(path=path, commit=data["commit_hash"], env_name=data.get("env_name", ""),
                   env_vars=data.get("env_vars") or {}, params=data.get("params") or {},
                   started=None)
    starts = []
    for name, row in data["results"].items():
        row = list(row) + [None] * (len(columns) - len(row))
        col = dict(zip(columns, row, strict=True))
        info = benchmarks.get(name, {})
        names = info.get("param_names", [])
        unit = info.get("unit", "")
        if col.get("started_at"):
            starts.append(col["started_at"] / 1000)
        combos = list(itertools.product(*col["params"])) if col["params"] else [()]
        results = col["result"] if isinstance(col["result"], list) else [col["result"]]

        for j, (combo, value) in enumerate(zip(combos, results, strict=False)):
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            key = tuple(sorted(zip(names, map(_param_value, combo), strict=False)))
            rs.values[(name, key)] = Measurement(
                float(value), unit, _column(col, "stats_q_25", j), _column(col, "stats_q_75", j),
                _column(col, "stats_repeat", j))
    rs.started = max(starts) if starts else None
    return rs


def _column(col: dict[str, Any], key: str, j: int) -> Any:
    """Entry `j` of a per-parameter column of asv's result row, None where absent."""
    values = col.get(key)
    return values[j] if isinstance(values, list) and j < len(values) else None


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                          check=True).stdout.strip()


def find_results(results_dir: Path, machine: str | None, commit: str | None, workload: str,
                 repo: Path) -> tuple[ResultSet, dict[str, str], str]:
    """The result set of `commit` (default HEAD) for `workload` on `machine` (default: the
    only machine with results, else this host's name), its machine.json and the machine."""
    if not results_dir.is_dir():
        raise ReportError(f"{results_dir}: no asv results directory (run `make bench`)")
    machines = sorted(p.name for p in results_dir.iterdir() if (p / "machine.json").exists())
    if machine is None:
        host = socket.gethostname()
        machine = machines[0] if len(machines) == 1 else host if host in machines else None
        if machine is None:
            raise ReportError(f"{results_dir}: results of several machines "
                              f"({', '.join(machines) or 'none'}); choose one with --machine")
    if machine not in machines:
        raise ReportError(f"{results_dir}: no results of machine {machine!r} "
                          f"(found: {', '.join(machines) or 'none'})")
    bench_file = results_dir / "benchmarks.json"
    benchmarks = json.loads(bench_file.read_text()) if bench_file.exists() else {}
    benchmarks = {k: v for k, v in benchmarks.items() if isinstance(v, dict)}
    try:
        wanted = _git(repo, "rev-parse", "--verify", f"{commit or 'HEAD'}^{{commit}}")
    except (subprocess.CalledProcessError, FileNotFoundError):
        if commit is None:
            raise ReportError(f"{repo}: not a git repository; name the commit with --commit") \
                from None
        wanted = commit  # a hash of results from elsewhere: match it as a prefix
    candidates = []
    for path in sorted((results_dir / machine).glob("*.json")):
        if path.name == "machine.json":
            continue
        rs = read_result_file(path, benchmarks)
        if rs.workload == workload and rs.commit.startswith(wanted):
            candidates.append(rs)
    if not candidates:
        raise ReportError(f"no {workload!r}-workload results of commit {wanted[:12]} on machine "
                          f"{machine!r} in {results_dir} (run `make bench`)")
    candidates.sort(key=lambda rs: (len(rs.values), rs.started or 0))
    machine_info = json.loads((results_dir / machine / "machine.json").read_text())
    return candidates[-1], machine_info, machine


# -- formatting ------------------------------------------------------------------------------

TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


def fmt_time(m: Measurement | None, unit: str = "ms", digits: int = 3) -> str:
    """'12.3 ± 0.4' in `unit` (s, ms or us); 'n/a' when not measured."""
    if m is None:
        return "n/a"
    scale = TIME_UNITS[unit]
    text = _num(m.value / scale, digits)
    if m.spread is not None:
        text += f" ± {_num(m.spread / scale, 2)}"
    return text


def fmt_rate(m: Measurement | None, per: float = 1.0) -> str:
    """`per` divided by a time (tokens per second from seconds per token), with the spread
    carried over as a relative one."""
    if m is None or m.value <= 0:
        return "n/a"
    rate = per / m.value
    text = _num(rate, 3)
    if m.spread is not None:
        text += f" ± {_num(rate * m.spread / m.value, 2)}"
    return text


def fmt_mb(m: Measurement | None) -> str:
    return "n/a" if m is None else f"{m.value / 1e6:,.1f}"


def fmt_ratio(a: float | None, b: float | None, suffix: str = "x") -> str:
    return "n/a" if a is None or not b else f"{a / b:.2f}{suffix}"


def _num(x: float, digits: int) -> str:
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    magnitude = int(math.floor(math.log10(abs(x))))
    decimals = max(0, digits - 1 - magnitude)
    return f"{x:,.{decimals}f}"


def _times(ratio: float) -> str:
    """'0.91x'; three decimals where two would round a difference away ('1.004x', not '1.00x')."""
    return f"{ratio:.2f}x" if ratio == 1.0 or round(ratio, 2) != 1.0 else f"{ratio:.3f}x"


def _v(m: Measurement | None) -> float | None:
    return None if m is None else m.value


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out + [""]


# -- the seed's targets ----------------------------------------------------------------------

@dataclass
class Verdict:
    metric: str
    target: str
    measured: str
    passed: bool | None
    source: str


def judge(rs: ResultSet, vocab: int) -> list[Verdict]:
    """The plan's five performance targets, judged like the dashboard's summary does."""
    def ours_theirs(bench: str, **p: Any) -> tuple[float | None, float | None]:
        return (_v(rs.get(bench, implementation=QWEN_LORA, **p)),
                _v(rs.get(bench, implementation=MLX_LM, **p)))

    out = []
    ours, theirs = ours_theirs("training.LoRATraining.time_step")
    share = theirs / ours if ours and theirs else None
    out.append(Verdict("Training Throughput", "90-100% of MLX (mlx-lm): pass at >= 90%",
                       "n/a" if share is None else f"{share:.0%} of mlx-lm",
                       None if share is None else share >= 0.90,
                       "`training.LoRATraining.time_step`"))
    ours, theirs = ours_theirs("inference.Generation.time_per_token")
    share = theirs / ours if ours and theirs else None
    out.append(Verdict("Inference Speed", "95-100% of MLX (mlx-lm): pass at >= 95%",
                       "n/a" if share is None else f"{share:.0%} of mlx-lm (decoding)",
                       None if share is None else share >= 0.95,
                       "`inference.Generation.time_per_token`"))
    ratios = {}
    for name in MEMORY_ROWS.values():
        ours, theirs = ours_theirs(name)
        if ours is not None and theirs:
            ratios[name.rsplit(".", 1)[-1]] = ours / theirs
    worst = max(ratios, key=ratios.get) if ratios else None
    out.append(Verdict("Memory Usage", "<= MLX (mlx-lm) on every measure",
                       "n/a" if worst is None else
                       f"worst {_times(ratios[worst])} of mlx-lm ({worst})",
                       None if worst is None else all(r <= 1.0 for r in ratios.values()),
                       "`memory.PeakMemory.*`"))
    bench = "inference.KVCacheVsRecompute.time_token"
    cached = _v(rs.get(bench, implementation=QWEN_LORA, mode="kv_cache"))
    recompute = _v(rs.get(bench, implementation=QWEN_LORA, mode="recompute"))
    speedup = recompute / cached if cached and recompute else None
    out.append(Verdict("KV-Cache Speedup", ">= 2x vs recompute",
                       "n/a" if speedup is None else f"{speedup:.1f}x",
                       None if speedup is None else speedup >= 2.0, f"`{bench}`"))
    sampling = sampling_overhead_benchmark(rs)
    shares = sampling_shares(rs, sampling, QWEN_LORA, vocab)
    worst = max(shares, key=shares.get) if shares else None
    runs = _across_runs(rs, sampling, FORWARD)
    out.append(Verdict("Sampling Overhead", "< 1% of forward",
                       "n/a" if worst is None else
                       f"{shares[worst]:.2%} (worst: {STRATEGY_NAMES[worst]}, vocabulary "
                       f"{vocab:,}{'; ' + runs if runs else ''})",
                       None if worst is None else shares[worst] < 0.01,
                       f"`{sampling}` / `{FORWARD}`"))
    return out


SAMPLE_ALONE = "inference.Sampling.time_sample"
SAMPLE_SHARED = "inference.Sampling.time_overhead"
FORWARD = "inference.ForwardPass.time_forward"  # the decoding forward pass sampling shares


def sampling_shares(rs: ResultSet, sampling: str, impl: str, vocab: int) -> dict[str, float]:
    """Each strategy's draw over `vocab` logits (benchmark `sampling`, see
    `sampling_overhead_benchmark`) as a share of the implementation's decoding forward pass
    (the strategies both were measured for)."""
    forward = _v(rs.get(FORWARD, implementation=impl))
    draws = {s: _v(rs.get(sampling, implementation=impl, strategy=s, vocabulary=vocab))
             for s in STRATEGIES}
    return {s: v / forward for s, v in draws.items() if v is not None and forward}


def sampling_overhead_benchmark(rs: ResultSet) -> str:
    """What a draw adds to a decoding step: a draw in an evaluation shared with others
    (`time_overhead`), as the step shares its one; for results from before that benchmark,
    one draw evaluated alone (`time_sample`, which on a GPU includes the evaluation's own
    synchronization, tens of microseconds)."""
    return SAMPLE_SHARED if rs.series(SAMPLE_SHARED) else SAMPLE_ALONE


def _status(passed: bool | None) -> str:
    return "not measured" if passed is None else "PASS" if passed else "FAIL"


# -- the document ----------------------------------------------------------------------------

STRATEGIES = ["greedy", "top_k", "top_p", "temperature"]
STRATEGY_NAMES = {"greedy": "Greedy", "top_k": "Top-k (k=50)", "top_p": "Top-p (p=0.9)",
                  "temperature": "Temperature (T=0.7)"}
MEMORY_ROWS = {"Model Load": "memory.PeakMemory.track_model_load",
               "Forward Pass": "memory.PeakMemory.track_forward",
               "Training Step": "memory.PeakMemory.track_train_step",
               "KV-Cache ({kv_tokens} tokens)": "memory.PeakMemory.track_kv_cache"}
OPS = [("MatMul", "matmul"), ("Softmax", "softmax"), ("Layer Norm", "layer_norm"),
       ("RMS Norm", "rms_norm"), ("Attention", "attention")]
COMPONENTS = [("Embedding", "embedding"), ("RoPE", "rope"), ("Attention Layer", "attention"),
              ("MLP Layer", "mlp"), ("Full Layer", "layer")]


@dataclass
class Context:
    rs: ResultSet
    machine: dict[str, str]
    machine_name: str
    workload: str
    repo: Path
    config: dict[str, Any]

    @property
    def w(self) -> dict[str, Any]:
        return WORKLOADS.get(self.workload, WORKLOADS["default"])

    def m(self, bench: str, impl: str, **p: Any) -> Measurement | None:
        return self.rs.get(bench, implementation=impl, **p)


def _impl_columns(ctx: Context, bench: str) -> list[str]:
    """qwen_lora and mlx-lm, and PyTorch when the benchmark measured it."""
    impls = [QWEN_LORA, MLX_LM]
    if any(p.get(IMPL) == TORCH for p, _ in ctx.rs.series(bench)):
        impls.append(TORCH)
    return impls


def _across_runs(rs: ResultSet, *benchmarks: str) -> str:
    """"" where the benchmarks come from one run; else the commit of each one's run, for a
    ratio between them that crosses runs (on a GPU, runs hours apart can differ by 1.5x)."""
    # one without results was measured by no run
    by_commit = _by_commit((b, rs.commit_of(b)) for b in benchmarks if rs.series(b))
    if len(by_commit) < 2:
        return ""
    return "across runs: " + "; ".join(f"`{c[:8]}` measured {', '.join(names)}"
                                       for c, names in by_commit.items())


def _by_commit(measured: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """(benchmark, commit) pairs as the benchmarks' names in backticks by commit."""
    by_commit: dict[str, list[str]] = {}
    for name, commit in measured:
        by_commit.setdefault(commit, []).append(f"`{name}`")
    return by_commit


def _filled_note(ctx: Context) -> list[str]:
    """The benchmarks not run at the reported commit, and the commits they come from."""
    by_commit = _by_commit(sorted(ctx.rs.filled.items()))
    return [f"**From commit `{commit[:8]}`** (not rerun at this one): {', '.join(names)}  "
            for commit, names in by_commit.items()]


def section_header(ctx: Context) -> list[str]:
    rs, w = ctx.rs, ctx.w
    try:
        subject = _git(ctx.repo, "log", "-1", "--format=%s (%cd)", "--date=short", rs.commit)
    except (subprocess.CalledProcessError, FileNotFoundError):
        subject = ""
    when = (datetime.fromtimestamp(rs.started, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            if rs.started else "unknown")
    versions = {k: v for k, v in rs.params.items()
                if k not in ("machine", "arch", "cpu", "num_cpu", "os", "ram")}
    ram = ctx.machine.get("ram", "")
    ram_text = f"{int(ram) / 2**30:.1f} GiB" if ram.isdigit() else ram or "unknown"
    url = ctx.config.get("show_commit_url", "")
    commit = f"[`{rs.commit[:8]}`]({url}{rs.commit})" if url and url != "#" \
        else f"`{rs.commit[:8]}`"
    lines = [
        "# qwen-lora Benchmarks",
        "",
        "<!-- Generated by `qwen-lora report` (src/qwen_lora/report.py) from asv's results; "
        "edit the generator, not this file. -->",
        "",
        f"**Measured**: {when}, commit {commit} {subject}  ",
        f"**Machine**: `{ctx.machine_name}`: {ctx.machine.get('cpu', '?')}, "
        f"{ctx.machine.get('num_cpu', '?')} CPUs, {ram_text} RAM, "
        f"{ctx.machine.get('os', '?')} ({ctx.machine.get('arch', '?')})  ",
        f"**Workload**: `{ctx.workload}` ({WORKLOAD_VAR}={ctx.workload})",
        *_filled_note(ctx),
        "",
        "## Overview",
        "",
        "qwen_lora (Qwen2.5 in MLX, this repository) against mlx-lm, Apple's MLX language-model "
        "package, running side by side in the same asv environment, with PyTorch (transformers "
        "and peft, float32) where users would otherwise reach for it. Every table below follows "
        "the benchmark plan (`BENCHMARKS-seed.md`); each number is asv's median over its "
        "samples, `±` half the interquartile range. Ratios are qwen_lora over mlx-lm of the "
        "row's quantity: below 1 is faster or smaller for times and bytes, above 1 is faster "
        "for rates. Graphs over the whole history: `make publish && make preview`.",
        "",
        "## Methodology",
        "",
        "### Hardware",
        "",
        f"- **Machine**: `{ctx.machine_name}` ({ctx.machine.get('cpu', '?')})",
        f"- **Cores**: {ctx.machine.get('num_cpu', '?')}",
        f"- **RAM**: {ram_text}",
        f"- **OS**: {ctx.machine.get('os', '?')}, {ctx.machine.get('arch', '?')}",
        "- **Device**: MLX's default device: on a machine without a GPU its CPU backend, in "
        "float32 (MLX's half-precision CPU matmul is ~40x slower), with MLX's matmul sent to "
        "OpenBLAS by qwen_lora's BLAS shim for mlx-lm as for qwen_lora; on a GPU, float16",
        "- **CPU kernels**: `make bench` runs asv with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE "
        "unset, so OpenBLAS runs the processor's own kernels (`qwen-lora info`: blas_core); "
        "MLX's compiled kernels are built with `-mavx2 -mfma -mf16c` and vectorizing flags "
        "(qwen_lora's cpu_jit.py; `qwen-lora info`: cpu_jit_flags) "
        "for both MLX lines of a commit that has it; from the commit that adds heap.py, malloc "
        "keeps freed memory in every benchmark process (mlx-lm's and PyTorch's too)",
        "",
        "### Software",
        "",
        f"- **qwen_lora**: commit {commit}",
    ]
    lines += [f"- **{k}**: {v}" for k, v in sorted(versions.items())]
    lines += [
        f"- **asv environment**: `{rs.env_name}`",
        "",
        "### Test Configuration",
        "",
        "- **Precision**: float32 on the CPU (float16 on GPUs)",
        f"- **Model**: {w['model']}",
        "- **Batch Size**: 1 (single sequence)",
        f"- **Sequence Length**: training {w['train_seq']}; generation {w['prompt']} prompt + "
        f"{w['new_tokens']} new tokens; KV cache against recomputation at {w['context']}; "
        f"KV-cache memory at {w['kv_tokens']}; components at {w['component_seq']}; tensor "
        f"operations {w['op_size']}x{w['op_size']}",
        "- **Warmup**: compiled steps and generators run once in `setup`, outside the samples",
        "- **Measured**: asv's samples per benchmark (count in `results/`); median and "
        "interquartile range reported",
        "",
    ]
    return lines


def section_training(ctx: Context) -> list[str]:
    w = ctx.w
    step_bench = "training.LoRATraining.time_step"
    impls = _impl_columns(ctx, step_bench)
    cores = int(ctx.machine.get("num_cpu", "0") or 0)

    def util(impl: str) -> str:
        cpu = ctx.m("training.LoRATraining.time_step_cpu", impl)
        wall = ctx.m(step_bench, impl)
        if cpu is None or wall is None or not cores:
            return "n/a"
        return f"{cpu.value / (wall.value * cores):.0%}"

    def ratio(bench: str, inverse: bool = False) -> str:
        a, b = _v(ctx.m(bench, QWEN_LORA)), _v(ctx.m(bench, MLX_LM))
        return fmt_ratio(b, a) if inverse else fmt_ratio(a, b)

    header = ["Metric"] + [NAMES[i] for i in impls] + ["Ratio"]
    mem = "memory.PeakMemory.track_train_step"
    rows = [
        ["Tokens/sec"] + [fmt_rate(ctx.m("training.LoRATraining.time_token", i)) for i in impls]
        + [ratio("training.LoRATraining.time_token", inverse=True)],
        ["Memory (GB)"] + [("n/a" if ctx.m(mem, i) is None else
                            f"{ctx.m(mem, i).value / 1e9:.2f}") if i != TORCH else "-"
                           for i in impls] + [ratio(mem)],
        [f"CPU Utilization ({cores} cores)"] + [util(i) for i in impls] + ["-"],
        ["Time/step (ms)"] + [fmt_time(ctx.m(step_bench, i)) for i in impls]
        + [ratio(step_bench)],
    ]
    grad = "training.GradientComputation"
    grows = [[op] + [fmt_time(ctx.m(f"{grad}.time_{key}", i)) for i in (QWEN_LORA, MLX_LM)]
             + [fmt_ratio(_v(ctx.m(f"{grad}.time_{key}", MLX_LM)),
                          _v(ctx.m(f"{grad}.time_{key}", QWEN_LORA)))]
             for op, key in (("Forward", "forward"), ("Backward", "backward"),
                             ("Total", "total"))]
    return [
        "## Training Benchmarks",
        "",
        "### LoRA Training Throughput",
        "",
        "**Setup**:",
        "- LoRA rank: 8",
        "- LoRA alpha: 16.0",
        "- Target modules: Q+V projections (every layer)",
        "- Optimizer: AdamW (lr=1e-4, weight_decay=0.01)",
        f"- Sequence length: {w['train_seq']} tokens, every position a target",
        "- Training steps: the plan's 100-step run, shortened to asv's samples of consecutive "
        "steps (after one compiling step) and reported per step",
        "- qwen_lora: `TrainStep` (compiled); mlx-lm: its trainer's step, compiled the same way; "
        "PyTorch: transformers + peft LoRA, float32",
        "",
        *table(header, rows),
        "Tokens/sec is one over `time_token` (seconds per trained token); Memory is MLX's peak "
        "during a step (`memory.PeakMemory.track_train_step`, not measured for PyTorch); CPU "
        "utilization is CPU seconds per step (`time_step_cpu`, all threads) over wall seconds "
        "times cores, the CPU's counterpart of the plan's GPU utilization (PyTorch: not "
        "measured, for the time budget).",
        "",
        "### Gradient Computation",
        "",
        "**Setup**:",
        f"- Forward + backward pass over {w['train_seq']} tokens, uncompiled (the libraries' "
        "value-and-grad)",
        "- LoRA parameters only",
        "- Single batch",
        "",
        *table(["Operation", "qwen_lora (ms)", "mlx-lm (ms)", "Speedup"], grows),
        "Backward is timed inside one value-and-grad graph, from the loss computed to the "
        "gradients computed. Speedup is mlx-lm's time over qwen_lora's.",
        "",
    ]


def section_inference(ctx: Context, vocab: int) -> list[str]:
    w = ctx.w
    gen = "inference.Generation"
    impls = _impl_columns(ctx, f"{gen}.time_per_token")

    def improvement(bench: str) -> str:
        return fmt_ratio(_v(ctx.m(bench, MLX_LM)), _v(ctx.m(bench, QWEN_LORA)))

    rows = [
        ["First token (ms)"] + [fmt_time(ctx.m(f"{gen}.time_first_token", i)) for i in impls]
        + [improvement(f"{gen}.time_first_token")],
        ["Per token (ms)"] + [fmt_time(ctx.m(f"{gen}.time_per_token", i)) for i in impls]
        + [improvement(f"{gen}.time_per_token")],
        ["Tokens/sec"] + [fmt_rate(ctx.m(f"{gen}.time_per_token", i)) for i in impls]
        + [improvement(f"{gen}.time_per_token")],
        ["Total time (s)"] + [fmt_time(ctx.m(f"{gen}.time_total", i), "s") for i in impls]
        + [improvement(f"{gen}.time_total")],
    ]
    kv = "inference.KVCacheVsRecompute.time_token"
    kv_rows = []
    for label, mode in (("No Cache (recompute)", "recompute"), ("With Cache", "kv_cache")):
        row = [label]
        for impl in (QWEN_LORA, MLX_LM):
            m = ctx.m(kv, impl, mode=mode)
            base = _v(ctx.m(kv, impl, mode="recompute"))
            row += [fmt_time(m, "ms"), fmt_rate(m),
                    "1.0x" if mode == "recompute" else fmt_ratio(base, _v(m))]
        kv_rows.append(row)
    forward = {i: ctx.m(FORWARD, i) for i in (QWEN_LORA, MLX_LM)}
    sampling = sampling_overhead_benchmark(ctx.rs)
    shares = {i: sampling_shares(ctx.rs, sampling, i, vocab) for i in (QWEN_LORA, MLX_LM)}
    vocabularies = sorted({p.get("vocabulary") for p, _ in
                           ctx.rs.series(SAMPLE_ALONE)} - {None}) or [32000, 151936]
    shared = sampling == SAMPLE_SHARED
    s_header = ["Strategy"]
    for impl in (QWEN_LORA, MLX_LM):
        s_header += [f"{NAMES[impl]} (μs), vocab {v:,}" for v in vocabularies]
        s_header += [f"{NAMES[impl]} shared (μs), vocab {vocab:,}"] if shared else []
        s_header += [f"{NAMES[impl]} % of Forward Pass"]
    s_rows = []
    for strategy in STRATEGIES:
        row = [STRATEGY_NAMES[strategy]]
        for impl in (QWEN_LORA, MLX_LM):
            for v in vocabularies:
                row.append(fmt_time(ctx.m(SAMPLE_ALONE, impl, strategy=strategy,
                                          vocabulary=v), "us"))
            s = ctx.m(sampling, impl, strategy=strategy, vocabulary=vocab)
            row += [fmt_time(s, "us")] if shared else []
            share = shares[impl].get(strategy)
            row.append("n/a" if share is None else f"{share:.2%}")
        s_rows.append(row)
    fwd_text = ", ".join(f"{NAMES[i]} {fmt_time(forward[i])} ms" for i in forward)
    runs = _across_runs(ctx.rs, sampling, FORWARD)
    shared_text = (
        f"- Shared: the time a draw adds to an evaluation it shares (`{SAMPLE_SHARED}`: "
        "draws evaluated together, per draw), as a decoding step's draw shares the step's one "
        "evaluation; the (μs) columns evaluate each draw alone, which on a GPU adds the "
        "evaluation's own synchronization (tens of microseconds) that a step pays once, "
        "sampling or not" if shared else
        f"- One draw evaluated alone (`{SAMPLE_ALONE}`; these results predate "
        f"`{SAMPLE_SHARED}`, a draw in a shared evaluation)")
    return [
        "## Inference Benchmarks",
        "",
        "### Token Generation Latency",
        "",
        "**Setup**:",
        f"- Prompt: {w['prompt']} tokens",
        f"- Generate: {w['new_tokens']} new tokens (no early stop)",
        "- Temperature: 0.7",
        "- Top-p: 0.9",
        "- Each library's own streaming loop: `qwen_lora.stream_generate`, mlx-lm's "
        "`generate_step`, transformers' `generate` (with a streamer for per-token times)",
        "",
        *table(["Metric"] + [NAMES[i] for i in impls] + ["Improvement"], rows),
        "Per token is the decoding phase only: from the first new token to the last, over the "
        "tokens in between. Improvement is mlx-lm's time over qwen_lora's (above 1: qwen_lora "
        "is faster). PyTorch's total time is not measured (the time budget: its decoding is the "
        "slowest); first token plus per token times the new tokens after the first gives it.",
        "",
        "### KV-Cache Performance",
        "",
        "**Setup**:",
        "- Compare with/without KV-cache, greedy decoding",
        f"- Time per generated token once the sequence reaches {w['context']} tokens: with the "
        f"cache, averaged over the next 8 tokens; without it, the whole sequence recomputed "
        "for one token (mlx-lm has no cache-less mode: the plain loop, logits of the last "
        "position only, as qwen_lora computes them)",
        f"- Not the plan's cumulative time over {w['context']} generated tokens: without a "
        "cache that run costs the sum of a forward pass over every length up to "
        f"{w['context']} (minutes at the plan's sizes on a CPU); the per-token cost at its "
        "end is where the two differ most, and what the speedup reports",
        "",
        *table(["Configuration", "qwen_lora (ms/token)", "Tokens/sec", "Speedup vs No Cache",
                "mlx-lm (ms/token)", "Tokens/sec", "Speedup vs No Cache"], kv_rows),
        "**Expected**: ~2x speedup for long sequences (judged under Performance Targets).",
        "",
        "### Sampling Overhead",
        "",
        "**Setup**:",
        "- One token from one row of log-probabilities, asv's samples per strategy (up to "
        "thousands)",
        f"- Vocabulary size: {', '.join(f'{v:,}' for v in vocabularies)} tokens",
        "- Top-k and top-p at temperature 0.7",
        shared_text,
        f"- % of Forward Pass: the strategy at the model's vocabulary ({vocab:,}), "
        f"{'shared' if shared else 'alone'}, over one decoding forward pass with a "
        f"{w['prompt']}-token cache, as each library's generation runs it (qwen_lora's compiled "
        f"decoding step, mlx-lm's model call; `{FORWARD}`: {fwd_text})",
        *([f"- The % columns are {runs}"] if runs else []),
        "",
        *table(s_header, s_rows),
        "**Expected**: <1% of forward pass time (judged under Performance Targets).",
        "",
    ]


def section_beyond(ctx: Context) -> list[str]:
    """Prefill, the distance to the physical limit, batched generation and quantized weights:
    not in the plan, asked for by issue 6; each where it was measured."""
    w = ctx.w
    batch_bench = "inference.BatchGeneration.time_per_token"
    sizes = sorted({p.get("batch") for p, _ in ctx.rs.series(batch_bench)} - {None})
    b_rows = []
    for size in sizes:
        ours, theirs = (ctx.m(batch_bench, i, batch=size) for i in (QWEN_LORA, MLX_LM))
        b_rows.append([str(size), fmt_time(ours), fmt_rate(ours), fmt_time(theirs),
                       fmt_rate(theirs), fmt_ratio(_v(theirs), _v(ours))])
    q_bench, q_bytes = ("inference.QuantizedGeneration.time_per_token",
                        "memory.QuantizedWeights.track_weights")
    bits = sorted({p.get("bits") for p, _ in ctx.rs.series(q_bench)} - {None}, reverse=True)
    q_rows = []
    for b in bits:
        ours, theirs = (ctx.m(q_bench, i, bits=b) for i in (QWEN_LORA, MLX_LM))
        q_rows.append([str(b), fmt_time(ours), fmt_rate(ours), fmt_time(theirs),
                       fmt_rate(theirs), fmt_ratio(_v(theirs), _v(ours)),
                       fmt_mb(ctx.m(q_bytes, QWEN_LORA, bits=b)),
                       fmt_mb(ctx.m(q_bytes, MLX_LM, bits=b))])
    prefill = _prefill_rows(ctx)
    limits = section_limits(ctx)
    if not (b_rows or q_rows or prefill or limits):
        return []
    prompt, new = w.get("batch_prompt", 32), w.get("batch_tokens", 8)
    impls = _impl_columns(ctx, PREFILL)
    names = {QWEN_LORA: "qwen_lora (ms)", MLX_LM: "mlx-lm (ms)", TORCH: "PyTorch (ms)"}
    out = ["## Beyond the Plan", ""]
    if prefill:
        out += [
            "### Prefill",
            "",
            "- A prompt of each length to the first new token, greedy, with each library's "
            "own loop (as under Token Generation Latency): the prompt's forward pass, the KV "
            "cache filled, one token picked",
            f"- `{PREFILL}`; vs: the library's time over qwen_lora's (above 1: qwen_lora is "
            "faster)",
            "",
            *table(["Prompt tokens", *(names[i] for i in impls), "vs mlx-lm"]
                   + (["vs PyTorch"] if TORCH in impls else []), prefill),
        ]
    out += limits
    if b_rows:
        out += [
            "### Batched Generation",
            "",
            f"- Each sequence: a {prompt}-token prompt, then {new} new tokens at temperature "
            "0.7, top-p 0.9; all sequences of the batch decoded together, one forward pass "
            "per step",
            "- qwen_lora's `stream_generate_batch`, mlx-lm's `BatchGenerator`",
            "- Per token: a decoding step's time over the batch size",
            "",
            *table(["Batch", "qwen_lora (ms/token)", "Tokens/sec", "mlx-lm (ms/token)",
                    "Tokens/sec", "Improvement"], b_rows),
        ]
    if q_rows:
        out += [
            "### Quantized Weights",
            "",
            f"- Linear layers and the tied embedding quantized in groups of 64; a "
            f"{prompt}-token prompt, then {new} new tokens at temperature 0.7, top-p 0.9; per "
            "token of the decoding phase",
            "- Compare with the float model's per-token time under Token Generation Latency "
            "(128-token prompt there)",
            "",
            *table(["Bits", "qwen_lora (ms/token)", "Tokens/sec", "mlx-lm (ms/token)",
                    "Tokens/sec", "Improvement", "qwen_lora weights (MB)",
                    "mlx-lm weights (MB)"], q_rows),
        ]
    return out


PREFILL = "inference.Prefill.time_first_token"
MATMUL_RATE, HEAD_MATVEC = "micro.MatmulRate.time_matmul", "micro.HeadMatvec.time_matvec"
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _prefill_lengths(ctx: Context) -> list[int]:
    """The prompt lengths the prefill benchmark measured."""
    return sorted({p.get("tokens") for p, _ in ctx.rs.series(PREFILL)} - {None})


def _prefill_rows(ctx: Context) -> list[list[str]]:
    impls = _impl_columns(ctx, PREFILL)
    rows = []
    for tokens in _prefill_lengths(ctx):
        m = {i: ctx.m(PREFILL, i, tokens=tokens) for i in impls}
        rows.append([f"{tokens:,}", *(fmt_time(m[i]) for i in impls),
                     *(fmt_ratio(_v(m[i]), _v(m[QWEN_LORA])) for i in impls[1:])])
    return rows


def model_work(w: dict[str, Any]) -> dict[str, float]:
    """The workload model's matmul weights in elements: `layers` (q, k, v, o, gate, up and
    down of every layer) and `head` (the output head, the tied embedding)."""
    d, heads, kv = w["hidden"], w["heads"], w["kv_heads"]
    q_width = heads * w["head_dim"]
    layer = d * q_width * 2 + d * kv * w["head_dim"] * 2 + 3 * d * w["intermediate"]
    return {"layers": w["layers"] * layer, "head": w["vocab"] * d}


def _attention_flops(w: dict[str, Any], tokens: int) -> float:
    # QK^T and PV, 2 FLOPs a multiply-add, each query over the keys up to it
    return 2 * 2 * w["layers"] * w["heads"] * w["head_dim"] * tokens * (tokens + 1) / 2


def section_limits(ctx: Context) -> list[str]:
    """Each workload against the machine's measured limits: decoding against the bytes of
    weights it must read, prefill and training against the FLOPs they must compute."""
    matmul, matvec = ctx.rs.series(MATMUL_RATE), ctx.rs.series(HEAD_MATVEC)
    if not matmul or not matvec:
        return []
    (mm_params, mm), (mv_params, mv) = matmul[0], matvec[0]
    size, dtype = mm_params.get("size"), mv_params.get("dtype")
    element = DTYPE_BYTES.get(dtype)
    if size is None or element is None:  # results without the benchmarks' parameter names
        return []
    size = int(size)
    w = ctx.w
    work = model_work(w)
    flops_per_s = 2 * size**3 / mm.value
    bytes_per_s = work["head"] * element / mv.value
    weight_bytes = (work["layers"] + work["head"]) * element
    rows = []
    crossing: list[str] = []  # the rates and workloads of ratios that cross runs

    def add(label: str, amount: str, floor: float, bench: str, rate: str = MATMUL_RATE,
            **p: Any) -> None:
        if _across_runs(ctx.rs, rate, bench):
            crossing.extend((rate, bench))
        m = {i: ctx.m(bench, i, **p) for i in (QWEN_LORA, MLX_LM)}
        rows.append([label, amount, fmt_seconds(floor),
                     *(x for i in (QWEN_LORA, MLX_LM)
                       for x in (fmt_time(m[i]), fmt_ratio(_v(m[i]), floor)))])

    add("Decode, a token", f"{weight_bytes / 1e9:.2f} GB of weights read",
        weight_bytes / bytes_per_s, "inference.Generation.time_per_token", HEAD_MATVEC)
    for tokens in _prefill_lengths(ctx):
        flops = 2 * tokens * work["layers"] + _attention_flops(w, tokens) + 2 * work["head"]
        add(f"Prefill, {tokens:,} tokens", f"{flops / 1e9:,.1f} GFLOP", flops / flops_per_s,
            PREFILL, tokens=tokens)
    t = w["train_seq"]
    flops = 2 * (2 * t * (work["layers"] + work["head"])) + 3 * _attention_flops(w, t)
    add(f"LoRA step, {t:,} tokens", f"{flops / 1e9:,.1f} GFLOP", flops / flops_per_s,
        "training.LoRATraining.time_step")
    return [
        "### Distance to the Physical Limit",
        "",
        f"- Matmul rate: {flops_per_s / 1e9:,.1f} GFLOP/s ({dtype}, one {size:,} x {size:,} "
        f"product, `{MATMUL_RATE}`)",
        f"- Memory bandwidth: {bytes_per_s / 1e9:,.1f} GB/s (one token through a {dtype} "
        f"weight of the output head's shape, {w['vocab']:,} x {w['hidden']:,}, as decoding "
        f"computes it, `{HEAD_MATVEC}`)",
        "- Work: decoding reads every matmul weight once a token (the tied embedding once, as "
        "the head); prefill computes 2 FLOPs a weight a prompt token, attention's products "
        "over the causal prompt and the head at the last position; a LoRA step computes the "
        "forward pass over every position (head included), then the same again for the "
        "input gradients (frozen weights need no weight gradients; the rank-8 adapters' are "
        "under 0.1%), attention's backward twice its forward",
        "- Limit: the work at the measured rate; \"x the limit\" is the measured time over it "
        "(1.00x would run at the machine's measured rate)",
        *([f"- Ratios {_across_runs(ctx.rs, *dict.fromkeys(crossing))}"] if crossing else []),
        "",
        *table(["Workload", "Work", "Limit (ms)", "qwen_lora (ms)", "x the limit", "mlx-lm (ms)",
                "x the limit"], rows),
    ]


def fmt_seconds(seconds: float) -> str:
    """A time in ms, for quantities computed rather than measured (no spread)."""
    return _num(seconds * 1e3, 3)


def section_memory(ctx: Context) -> list[str]:
    w = ctx.w
    rows = []
    for label, bench in MEMORY_ROWS.items():
        ours, theirs = ctx.m(bench, QWEN_LORA), ctx.m(bench, MLX_LM)
        diff = "n/a" if ours is None or theirs is None else \
            f"{(ours.value - theirs.value) / 1e6:+,.1f} MB ({_times(ours.value / theirs.value)})"
        rows.append([label.format(kv_tokens=f"{w['kv_tokens']:,}"), fmt_mb(ours), fmt_mb(theirs),
                     diff])
    layers, kv, hd, tokens = w["layers"], w["kv_heads"], w["head_dim"], w["kv_tokens"]
    # the suite computes in float32 on CPUs and float16 on GPUs: either precision may match
    formulas = {size: layers * 2 * 1 * kv * tokens * hd * size for size in (4, 2)}
    precision = {4: "float32, the CPU", 2: "float16, a GPU"}
    measured = {i: ctx.m(MEMORY_ROWS["KV-Cache ({kv_tokens} tokens)"], i)
                for i in (QWEN_LORA, MLX_LM)}
    checks = []
    for impl, m in measured.items():
        if m is None:
            checks.append(f"- {NAMES[impl]}: not measured")
            continue
        sizes = [size for size, f in formulas.items() if int(m.value) == f]
        same = f"equal to the formula at {sizes[0]} bytes ({precision[sizes[0]]})" if sizes \
            else f"{m.value / formulas[4]:.3f}x the formula at 4 bytes"
        checks.append(f"- {NAMES[impl]}: {int(m.value):,} bytes, {same}")
    qwen = 24 * 2 * 1 * 2 * 2048 * 64 * 2
    if (layers, kv, tokens, hd) == (24, 2, 2048, 64):
        qwen_line = []  # the workload is Qwen2.5-0.5B's: its float16 line above says it
        plan = ", not the plan's ~173 MB"
    else:
        qwen_line = ["Qwen2.5-0.5B in float16 (GPU), 2048 tokens:",
                     f"24 × 2 × 1 × 2 × 2048 × 64 × 2 bytes = {qwen:,} bytes "
                     f"({qwen / 2**20:.1f} MiB), not the plan's ~173 MB"]
        plan = ""
    return [
        "## Memory Benchmarks",
        "",
        "### Peak Memory Usage",
        "",
        "**Setup**:",
        "- MLX's own counters: `mx.reset_peak_memory()` before, `mx.get_peak_memory()` after, "
        "so both MLX implementations are measured alike; weights already loaded count",
        f"- Forward pass over {w['train_seq']} tokens (all logits); a LoRA training step after a "
        "first, compiling one",
        f"- KV cache: the bytes the cache holds (active memory before and after) once a "
        f"{w['kv_tokens']:,}-token prompt went through the model",
        "- Batch size: 1",
        "",
        *table(["Operation", "qwen_lora (MB)", "mlx-lm (MB)", "Difference"], rows),
        "MB are 10^6 bytes. Allocations are deterministic: the same code gives the same bytes, "
        "so asv flags any increase.",
        "",
        "### Memory Efficiency",
        "",
        "**KV-Cache Memory Formula** (corrected: the cache holds the key/value heads, not the "
        "14 query heads the plan used):",
        "```",
        "Memory = layers × 2 (key+value) × batch × KV heads × seq_len × head_dim"
        " × bytes_per_element",
        "",
        "This workload, in float32 (the CPU) and in float16 (GPUs):",
        *(f"{layers} × 2 × 1 × {kv} × {tokens} × {hd} × {size} bytes = {f:,} bytes "
          f"({f / 2**20:.1f} MiB){plan if size == 2 else ''}" for size, f in formulas.items()),
        *qwen_line,
        "```",
        "",
        "Measured (`memory.PeakMemory.track_kv_cache`):",
        *checks,
        "",
    ]


def section_micro(ctx: Context) -> list[str]:
    w = ctx.w
    ops = "micro.TensorOps.time_op"
    comps = "micro.ModelComponents.time_forward"
    op_rows = [[label] + [fmt_time(ctx.m(ops, i, op=key), "us") for i in (QWEN_LORA, MLX_LM)]
               + [fmt_ratio(_v(ctx.m(ops, QWEN_LORA, op=key)), _v(ctx.m(ops, MLX_LM, op=key)))]
               for label, key in OPS]
    c_rows = [[label] + [fmt_time(ctx.m(comps, i, component=key), "ms")
                         for i in (QWEN_LORA, MLX_LM)]
              + [fmt_ratio(_v(ctx.m(comps, QWEN_LORA, component=key)),
                           _v(ctx.m(comps, MLX_LM, component=key)))]
              for label, key in COMPONENTS]
    n = w["op_size"]
    return [
        "## Microbenchmarks",
        "",
        "### Tensor Operations",
        "",
        "**Setup**:",
        "- Measure core tensor operations as each implementation's model code calls them",
        f"- Size: ({n}, {n}) tensors (attention: {n} tokens, {n // 64} heads of 64, causal)",
        "- Device: MLX's default device (the CPU, float32, where there is no GPU)",
        "",
        *table(["Operation", "qwen_lora (μs)", "mlx-lm (μs)", "Ratio"], op_rows),
        "Both run MLX's kernels with the same BLAS: equal times are the expected answer, and "
        "the mlx-lm line tracks the machine (drift) across the history.",
        "",
        "### Model Components",
        "",
        "**Setup**:",
        "- Individual pieces of each implementation's Qwen2 model (qwen_lora's modules against "
        "`mlx_lm.models.qwen2`), random weights",
        "- Qwen architecture of the workload",
        f"- Batch=1, Seq={w['component_seq']}",
        "",
        *table(["Component", "qwen_lora (ms)", "mlx-lm (ms)", "Ratio"], c_rows),
    ]


def section_profiling(ctx: Context) -> list[str]:
    w = ctx.w
    forward = ctx.m("training.GradientComputation.time_forward", QWEN_LORA)
    comps = "micro.ModelComponents.time_forward"
    parts = {label: ctx.m(comps, QWEN_LORA, component=key) for label, key in COMPONENTS}
    rows = []
    if forward is not None and all(parts[k] is not None for k in
                                   ("Embedding", "Attention Layer", "MLP Layer", "Full Layer")):
        layers = w["layers"]
        attention = layers * parts["Attention Layer"].value
        mlp = layers * parts["MLP Layer"].value
        blocks = layers * parts["Full Layer"].value
        embed = parts["Embedding"].value
        rest = forward.value - blocks - embed
        for label, value in ((f"Attention layers ({layers} x)", attention),
                             (f"MLP layers ({layers} x)", mlp),
                             (f"Norms and residuals ({layers} x, the rest of a layer)",
                              blocks - attention - mlp),
                             ("Embedding", embed),
                             ("Output head, final norm and loss (the remainder)", rest)):
            rows.append([label, f"{value * 1e3:,.1f}", f"{value / forward.value:.0%}"])
    breakdown = table(["Part of the forward pass", "ms", "Share"], rows) if rows else \
        ["Not measured (needs `training.GradientComputation.time_forward` and "
         "`micro.ModelComponents.time_forward`).", ""]
    cpu = "training.LoRATraining.time_step_cpu"
    cores = int(ctx.machine.get("num_cpu", "0") or 0)
    ours_cpu, ours_wall = ctx.m(cpu, QWEN_LORA), ctx.m("training.LoRATraining.time_step",
                                                       QWEN_LORA)
    util = ("n/a" if ours_cpu is None or ours_wall is None or not cores else
            f"{ours_cpu.value / (ours_wall.value * cores):.0%} of {cores} cores "
            f"({fmt_time(ours_cpu, 's')} CPU seconds per {fmt_time(ours_wall, 's')} s step)")
    peak = ctx.m("memory.PeakMemory.track_train_step", QWEN_LORA)
    return [
        "## Profiling Results",
        "",
        "### CPU Profiling",
        "",
        "**Command**:",
        "```bash",
        "asv profile --python=same 'training.LoRATraining.time_step' HEAD   # cProfile, "
        "through asv",
        "py-spy record --native -o profile.svg -- .venv/bin/qwen-lora train ...",
        "```",
        "",
        f"**Hotspots**: where one forward pass over {w['train_seq']} tokens goes "
        f"(`training.GradientComputation.time_forward`, qwen_lora: {fmt_time(forward)} ms), "
        "from the component microbenchmarks times the number of layers:",
        "",
        *breakdown,
        "### Memory Profiling",
        "",
        "**Command**: `asv run --bench memory` (MLX's counters, `mx.get_peak_memory`)",
        "",
        f"**Peak Allocations**: {fmt_mb(peak)} MB during a qwen_lora training step "
        "(`memory.PeakMemory.track_train_step`); the other peaks are in the memory table above.",
        "",
        "### Device Utilization",
        "",
        "**Command**: `asv run --bench 'LoRATraining.time_step'` "
        "(`time_step_cpu` times the step with `time.process_time`)",
        "",
        f"**CPU Utilization**: {util}.",
        "",
    ]


def section_targets(verdicts: list[Verdict]) -> list[str]:
    rows = [[v.metric, v.target, v.measured, f"**{_status(v.passed)}**", v.source]
            for v in verdicts]
    return [
        "## Performance Targets",
        "",
        "Based on project goals, judged from the numbers above:",
        "",
        *table(["Metric", "Target", "Measured", "Status", "From"], rows),
    ]


def section_variance(ctx: Context) -> list[str]:
    groups: dict[str, list[float]] = {}
    for (name, _), m in ctx.rs.values.items():
        if m.spread is None or not m.value or m.unit != "seconds":
            continue
        key = name.split(".", 1)[0]
        groups.setdefault(key, []).append(2 * m.spread / m.value)
    rows = [[key.capitalize(), f"±{sorted(v)[len(v) // 2] / 2:.1%}",
             f"±{max(v) / 2:.1%}", str(len(v))] for key, v in sorted(groups.items())]
    return [
        "## Reproducibility",
        "",
        "### Variance",
        "",
        "Half the interquartile range of asv's samples relative to the median, in this run "
        "(median and worst over the module's measurements):",
        "",
        *table(["Benchmarks", "Typical", "Worst", "Measurements"], rows),
        "Memory (`track_*`) values do not vary: the same code allocates the same bytes.",
        "",
        "To keep results comparable: run on an otherwise idle machine (other processes "
        "stretch multi-threaded kernels), never two benchmark runs at once, and keep the "
        "machine's name (`ASV_MACHINE`) per hardware class. The mlx-lm line measures the "
        "machine: the environment (MLX, mlx-lm, PyTorch) is pinned in asv.conf.json and "
        "identical for every commit, so a step in it is drift, not code.",
        "",
    ]


def section_running(ctx: Context) -> list[str]:
    return [
        "## Running Benchmarks Locally",
        "",
        "```bash",
        "make bench                          # default workload on HEAD, html/, this file",
        "make bench-small                    # the small workload on HEAD, html/",
        "make bench-compare BASE=main HEAD=HEAD   # asv continuous; exits non-zero on a "
        "regression",
        "make backfill RANGE=v0.1..main      # small workload over a range, skipping measured "
        "commits",
        "make publish && make preview        # the dashboard on http://127.0.0.1:8080",
        "make report                         # regenerate this file from results/",
        "```",
        "",
        "asv directly: `asv run` (both workloads on the branch head), `asv run --bench "
        "inference` (one module), `asv continuous main HEAD`, `asv compare A B`, "
        "`asv publish && asv preview`. `make` targets pick one workload's environment with "
        "`-E`; see the README's Benchmarks section for the workflow, the time budget and the "
        "smallest regression asv flags here.",
        "",
        "## Future Benchmarks",
        "",
        "- Larger models (Qwen2.5 1.5B, 3B, 7B): presets exist; a workload per size",
        "- Batch size scaling (1, 4, 8, 16)",
        "- Quantized inference (8-bit, 4-bit)",
        "- GPU backends (Metal, CUDA): the same suite runs there; results form their own "
        "machine lines",
        "",
    ]


def section_map(ctx: Context) -> list[str]:
    """Every row of the plan and the benchmark behind it, with whether it has a result."""
    def has(bench: str, **p: Any) -> str:
        found = [m for params, m in ctx.rs.series(bench)
                 if all(params.get(k) == v for k, v in p.items())]
        if found:
            return f"{len(found)} results"
        if bench == SAMPLE_SHARED:  # results from before it: the draws alone stand in
            return f"none (older results: `{SAMPLE_ALONE}` stands in)"
        return "**no result**"

    rows = []
    for label, bench in SEED_MAP:
        name, _, params = bench.partition(" ")
        p = dict(kv.split("=", 1) for kv in params.split()) if params else {}
        p = {k: _param_value(v) for k, v in p.items()}
        rows.append([label, f"`{bench}`", has(name, **p)])
    return ["## Appendix: the plan's rows and their benchmarks", "",
            *table(["Plan row", "asv benchmark", "In this run"], rows)]


SEED_MAP = [
    ("LoRA training: Tokens/sec", "training.LoRATraining.time_token"),
    ("LoRA training: Memory (GB)", "memory.PeakMemory.track_train_step"),
    ("LoRA training: GPU Utilization (CPU here)", "training.LoRATraining.time_step_cpu"),
    ("LoRA training: Time/step", "training.LoRATraining.time_step"),
    ("Gradient computation: Forward", "training.GradientComputation.time_forward"),
    ("Gradient computation: Backward", "training.GradientComputation.time_backward"),
    ("Gradient computation: Total", "training.GradientComputation.time_total"),
    ("Token generation: First token", "inference.Generation.time_first_token"),
    ("Token generation: Per token, Tokens/sec", "inference.Generation.time_per_token"),
    ("Token generation: Total time", "inference.Generation.time_total"),
    ("KV cache: No Cache", "inference.KVCacheVsRecompute.time_token mode='recompute'"),
    ("KV cache: With Cache", "inference.KVCacheVsRecompute.time_token mode='kv_cache'"),
    *[(f"Sampling: {STRATEGY_NAMES[s]}",
       f"inference.Sampling.time_sample strategy='{s}'") for s in STRATEGIES],
    *[(f"Sampling: {STRATEGY_NAMES[s]}, shared", f"{SAMPLE_SHARED} strategy='{s}'")
      for s in STRATEGIES],
    ("Sampling: % of Forward Pass", FORWARD),
    ("Peak memory: Model Load", "memory.PeakMemory.track_model_load"),
    ("Peak memory: Forward Pass", "memory.PeakMemory.track_forward"),
    ("Peak memory: Training Step", "memory.PeakMemory.track_train_step"),
    ("Peak memory: KV-Cache (2048 tokens)", "memory.PeakMemory.track_kv_cache"),
    *[(f"Tensor operations: {label}", f"micro.TensorOps.time_op op='{key}'")
      for label, key in OPS],
    *[(f"Model components: {label}", f"micro.ModelComponents.time_forward component='{key}'")
      for label, key in COMPONENTS],
]


def render(ctx: Context) -> str:
    vocab = ctx.w["vocab"]
    lines = (section_header(ctx) + section_training(ctx) + section_inference(ctx, vocab)
             + section_memory(ctx) + section_micro(ctx) + section_beyond(ctx)
             + section_profiling(ctx)
             + section_targets(judge(ctx.rs, vocab)) + section_variance(ctx)
             + section_running(ctx) + section_map(ctx))
    return "\n".join(lines).rstrip() + "\n"


# -- command line ----------------------------------------------------------------------------

def environment_name(config: Path, workload: str) -> str:
    """The asv environment of `workload` in `config` (for `asv ... -E NAME`), by asv's rules."""
    from asv.config import Config
    from asv.environment import get_environments

    conf = Config.load(str(config))
    names = [env.name for env in get_environments(conf, None, verbose=False)
             if env.env_vars.get(WORKLOAD_VAR) == workload]
    if not names:
        raise ReportError(f"{config}: no environment with {WORKLOAD_VAR}={workload}")
    return names[0]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=Path("asv.conf.json"),
                   help="asv configuration (default: asv.conf.json)")
    p.add_argument("--results", type=Path, default=None,
                   help="asv results directory (default: the configuration's results_dir)")
    p.add_argument("--machine", default=None,
                   help="asv machine name (default: the only one, or this host's name)")
    p.add_argument("--commit", default=None, help="commit whose results to report (default: "
                   "HEAD)")
    p.add_argument("--fill-from", metavar="COMMIT", action="append", default=[],
                   help="take benchmarks the commit's results lack from COMMIT's results on "
                        "the same machine (the report names them); repeatable, each COMMIT "
                        "filling what the ones before it left")
    p.add_argument("--workload", default="default", choices=sorted(WORKLOADS))
    p.add_argument("--output", "-o", default="docs/BENCHMARKS.md",
                   help="file to write, or - for standard output (default: docs/BENCHMARKS.md)")
    p.add_argument("--environment-name", metavar="WORKLOAD", default=None,
                   help="only print the asv environment name of WORKLOAD (for asv -E) and exit")


def run(args: argparse.Namespace) -> int:
    config_path = Path(args.config)
    if args.environment_name is not None:
        print(environment_name(config_path, args.environment_name))
        return 0
    config = load_json_with_comments(config_path) if config_path.exists() else {}
    repo = config_path.resolve().parent
    results = args.results or repo / config.get("results_dir", "results")
    rs, machine_info, machine = find_results(Path(results), args.machine, args.commit,
                                             args.workload, repo)
    for commit in args.fill_from:
        base, _, _ = find_results(Path(results), machine, commit, args.workload, repo)
        rs.fill_from(base)
    text = render(Context(rs, machine_info, machine, args.workload, repo, config))
    if args.output == "-":
        sys.stdout.write(text)
    else:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out)
        print(f"wrote {out} from {rs.path}")
    return 0


def add_parser(subparsers: Any) -> None:
    """The `qwen-lora report` subcommand."""
    p = subparsers.add_parser("report", help="docs/BENCHMARKS.md from the asv results")
    add_arguments(p)
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    try:
        return run(args)
    except ReportError as err:
        print(f"qwen-lora report: error: {err}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen_lora.report", description=__doc__)
    add_arguments(parser)
    return cmd_report(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
