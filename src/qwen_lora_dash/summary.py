"""The dashboard's landing summary: html/summary.html, built from asv's results.

For each machine and workload (asv environment) it shows
- the seed's targets judged pass/fail on the latest measured commit: training throughput at
  least 90% of mlx-lm's, inference speed at least 95%, peak memory at most mlx-lm's, the KV
  cache at least 2x faster than recomputation, sampling under 1% of a forward pass;
- every qwen_lora measurement next to mlx-lm's (the ratio) on that commit;
- the latest commit against the previous measured one, changes beyond asv's regression
  thresholds highlighted;
and links to asv's own pages (grid, list, regressions) and to docs/BENCHMARKS.md.

It runs inside `asv publish` as an asv plugin (`.src.qwen_lora_dash.asv_plugin`, named in
asv.conf.json's "plugins"), or afterwards: `python -m qwen_lora_dash.summary` (`make dashboard`).
"""

from __future__ import annotations

import argparse
import ast
import html
import itertools
import json
import math
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import site

QWEN_LORA, MLX_LM = "qwen_lora", "mlx_lm"
IMPL = "implementation"
WORKLOAD_VAR = "QWEN_LORA_WORKLOAD"
DEFAULT_THRESHOLD = 0.05

Key = tuple[str, tuple[tuple[str, Any], ...]]  # (benchmark, sorted (param, value) pairs)


def _param_value(text: str) -> Any:
    """asv stores parameter values as their repr: "'qwen_lora'" -> 'qwen_lora', '32000' -> 32000."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


@dataclass
class Snapshot:
    """Every result of one commit on one machine in one environment."""

    machine: str
    env: str
    workload: str
    commit: str
    date: int
    values: dict[Key, float] = field(default_factory=dict)

    def get(self, benchmark: str, **params: Any) -> float | None:
        """The value of `benchmark` whose parameters include `params`, if exactly one."""
        found = [v for (name, ps), v in self.values.items()
                 if name == benchmark and all(dict(ps).get(k) == p for k, p in params.items())]
        return found[0] if len(found) == 1 else None

    def series(self, benchmark: str) -> list[tuple[dict[str, Any], float]]:
        return [(dict(ps), v) for (name, ps), v in sorted(self.values.items(), key=str)
                if name == benchmark]


def load_snapshots(results_dir: Path, benchmarks: dict[str, Any]) -> list[Snapshot]:
    """Read every asv result file under `results_dir` with asv's own loader, keeping the
    results whose benchmark version matches `benchmarks` (as `asv publish` does)."""
    from asv import results as asv_results

    snapshots = []
    for res in asv_results.iter_results(str(results_dir)):
        env_vars = res.env_vars or {}
        snap = Snapshot(machine=res.params.get("machine", "?"), env=res.env_name,
                        workload=str(env_vars.get(WORKLOAD_VAR, res.env_name)),
                        commit=res.commit_hash, date=res.date or 0)
        for key in res.get_result_keys(benchmarks):
            names = benchmarks[key].get("param_names", [])
            params = res.get_result_params(key)
            values = res.get_result_value(key, params)
            combos = list(itertools.product(*params)) if params else [()]
            values = values if isinstance(values, list) else [values]
            for combo, value in zip(combos, values, strict=False):
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    continue
                pairs = tuple(sorted(zip(names, map(_param_value, combo), strict=False)))
                snap.values[(key, pairs)] = float(value)
        if snap.values:
            snapshots.append(snap)
    return snapshots


# -- the seed's targets -------------------------------------------------------------------

@dataclass
class Verdict:
    target: str
    goal: str
    measured: str
    passed: bool | None  # None: not measured on this commit
    detail: str = ""


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def _vs_mlx(snap: Snapshot, bench: str, **params: Any) -> tuple[float | None, float | None]:
    return (snap.get(bench, implementation=QWEN_LORA, **params),
            snap.get(bench, implementation=MLX_LM, **params))


def judge_training(snap: Snapshot) -> Verdict:
    ours, theirs = _vs_mlx(snap, "training.LoRATraining.time_step")
    share = _ratio(theirs, ours)  # throughput ratio = inverse time ratio
    return Verdict("LoRA training throughput", ">= 90% of mlx-lm (seed: 90-100%)",
                   "n/a" if share is None else f"{share:.0%} of mlx-lm",
                   None if share is None else share >= 0.90,
                   "training.LoRATraining.time_step, seconds per step")


def judge_inference(snap: Snapshot) -> Verdict:
    ours, theirs = _vs_mlx(snap, "inference.Generation.time_per_token")
    share = _ratio(theirs, ours)
    return Verdict("Inference speed (decoding)", ">= 95% of mlx-lm (seed: 95-100%)",
                   "n/a" if share is None else f"{share:.0%} of mlx-lm",
                   None if share is None else share >= 0.95,
                   "inference.Generation.time_per_token, seconds per token")


def judge_memory(snap: Snapshot) -> Verdict:
    ratios = {}
    for (name, _), _v in snap.values.items():
        if name.startswith("memory.") and name not in ratios:
            ours, theirs = _vs_mlx(snap, name)
            r = _ratio(ours, theirs)
            if r is not None:
                ratios[name] = r
    if not ratios:
        return Verdict("Peak memory", "<= mlx-lm", "n/a", None)
    worst = max(ratios, key=ratios.get)
    detail = ", ".join(f"{n.rsplit('.', 1)[-1]} {r:.2f}x" for n, r in sorted(ratios.items()))
    return Verdict("Peak memory", "<= mlx-lm on every measure",
                   f"worst {ratios[worst]:.2f}x of mlx-lm ({worst.rsplit('.', 1)[-1]})",
                   all(r <= 1.0 for r in ratios.values()), detail)


def judge_kv_cache(snap: Snapshot) -> Verdict:
    bench = "inference.KVCacheVsRecompute.time_token"
    speedup = _ratio(snap.get(bench, implementation=QWEN_LORA, mode="recompute"),
                     snap.get(bench, implementation=QWEN_LORA, mode="kv_cache"))
    return Verdict("KV-cache speedup", ">= 2x over recomputation",
                   "n/a" if speedup is None else f"{speedup:.1f}x",
                   None if speedup is None else speedup >= 2.0,
                   f"{bench}, qwen_lora, recompute / kv_cache")


def judge_sampling(snap: Snapshot) -> Verdict:
    forward = snap.get("inference.ForwardPass.time_forward", implementation=QWEN_LORA)
    samples = [(p, v) for p, v in snap.series("inference.Sampling.time_sample")
               if p.get(IMPL) == QWEN_LORA]
    if forward is None or not samples:
        return Verdict("Sampling overhead", "< 1% of a forward pass", "n/a", None)
    # The vocabulary the workload's model has: the sampling row nearest the forward pass's.
    vocabularies = sorted({p.get("vocabulary") for p, _ in samples if p.get("vocabulary")})
    vocab = _model_vocabulary(snap.workload, vocabularies)
    rows = [(p, v) for p, v in samples if vocab is None or p.get("vocabulary") == vocab]
    worst_params, worst = max(rows, key=lambda pv: pv[1])
    share = worst / forward
    return Verdict("Sampling overhead", "< 1% of a forward pass",
                   f"{share:.2%} ({worst_params.get('strategy', '?')}, vocabulary {vocab})",
                   share < 0.01, "worst strategy's inference.Sampling.time_sample / "
                   "inference.ForwardPass.time_forward, qwen_lora")


def _model_vocabulary(workload: str, vocabularies: list[int]) -> int | None:
    """The small workload's model has the 32,000-token vocabulary; the default one, Qwen2.5's
    151,936 (benchmarks/common.py)."""
    if not vocabularies:
        return None
    return min(vocabularies) if workload == "small" else max(vocabularies)


JUDGES: list[Callable[[Snapshot], Verdict]] = [judge_training, judge_inference, judge_memory,
                                                judge_kv_cache, judge_sampling]


def judge(snap: Snapshot) -> list[Verdict]:
    """The seed's five targets on one commit."""
    return [j(snap) for j in JUDGES]


# -- comparisons ----------------------------------------------------------------------------

def thresholds_from_conf(conf: dict[str, Any]) -> list[tuple[re.Pattern[str], float]]:
    return [(re.compile(k), float(v))
            for k, v in (conf.get("regressions_thresholds") or {}).items()]


def threshold_for(name: str, thresholds: list[tuple[re.Pattern[str], float]]) -> float:
    """asv's rule: the largest threshold whose regex matches the benchmark's name."""
    matching = [t for rx, t in thresholds if rx.search(name)]
    return max(matching) if matching else DEFAULT_THRESHOLD


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "seconds":
        for scale, suffix in ((1, "s"), (1e-3, "ms"), (1e-6, "us"), (1e-9, "ns")):
            if abs(value) >= scale:
                return f"{value / scale:.3g} {suffix}"
        return f"{value:.3g} s"
    if unit == "bytes":
        for scale, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if abs(value) >= scale:
                return f"{value / scale:.3g} {suffix}"
        return f"{value:.0f} B"
    return f"{value:.4g} {unit}".strip()


def _label(key: Key) -> str:
    name, params = key
    shown = ", ".join(f"{v}" for k, v in params)
    return f"{name} ({shown})" if shown else name


# -- the page -------------------------------------------------------------------------------

def _td(text: str, cls: str = "") -> str:
    return f'<td class="{cls}">{html.escape(text)}</td>' if cls else f"<td>{html.escape(text)}</td>"


def _commit_link(commit: str, commit_url: str | None, length: int = 8) -> str:
    short = html.escape(commit[:length])
    return (f'<a href="{html.escape(commit_url + commit)}"><code>{short}</code></a>'
            if commit_url else f"<code>{short}</code>")


def _graph_link(benchmark: str, text: str) -> str:
    return f'<a href="index.html#{html.escape(benchmark)}">{html.escape(text)}</a>'


def render_group(latest: Snapshot, previous: Snapshot | None, benchmarks: dict[str, Any],
                 thresholds: list[tuple[re.Pattern[str], float]],
                 commit_url: str | None) -> str:
    """The summary of one machine and workload."""
    parts = [f"<h2>{html.escape(latest.machine)} &middot; workload "
             f"<code>{html.escape(latest.workload)}</code></h2>",
             f"<p>Latest measured commit {_commit_link(latest.commit, commit_url)}"
             + (f", compared with the previous measured commit "
                f"{_commit_link(previous.commit, commit_url)}." if previous else
                " (the only one measured here).") + "</p>"]

    verdicts = judge(latest)
    rows = []
    for v in verdicts:
        status = ("pass", "PASS") if v.passed else ("fail", "FAIL") if v.passed is not None \
            else ("na", "no data")
        rows.append(f"<tr>{_td(v.target)}{_td(v.goal)}{_td(v.measured)}"
                    f'<td class="{status[0]}">{status[1]}</td>{_td(v.detail)}</tr>')
    parts.append('<h3>Targets of the seed</h3><table class="targets"><thead><tr><th>target</th>'
                 "<th>goal</th><th>measured</th><th>verdict</th><th>from</th></tr></thead>"
                 f"<tbody>{''.join(rows)}</tbody></table>")

    # qwen_lora against mlx-lm, same parameters otherwise.
    rows = []
    for (name, params), ours in sorted(latest.values.items(), key=str):
        p = dict(params)
        if p.get(IMPL) != QWEN_LORA:
            continue
        other = dict(p, **{IMPL: MLX_LM})
        theirs = latest.values.get((name, tuple(sorted(other.items()))))
        if theirs is None:
            continue
        unit = benchmarks.get(name, {}).get("unit", "")
        ratio = ours / theirs if theirs else math.inf
        cls = "worse" if ratio > 1.0 else "better" if ratio < 1.0 else ""
        rest = ", ".join(f"{k}={v}" for k, v in params if k != IMPL)
        rows.append(f"<tr><td>{_graph_link(name, name)}</td>{_td(rest)}"
                    f'{_td(format_value(ours, unit), "num")}'
                    f'{_td(format_value(theirs, unit), "num")}'
                    f'{_td(f"{ratio:.2f}x", ("num " + cls).strip())}</tr>')
    if rows:
        parts.append("<h3>qwen_lora against mlx-lm (latest commit)</h3><p>Ratio qwen_lora / "
                     "mlx-lm: below 1 is faster or smaller.</p><table><thead><tr><th>benchmark"
                     "</th><th>parameters</th><th>qwen_lora</th><th>mlx-lm</th><th>ratio</th>"
                     f"</tr></thead><tbody>{''.join(rows)}</tbody></table>")

    if previous is not None:
        rows = []
        flagged = 0
        for key in sorted(set(latest.values) | set(previous.values), key=str):
            now, before = latest.values.get(key), previous.values.get(key)
            unit = benchmarks.get(key[0], {}).get("unit", "")
            ratio = _ratio(now, before)
            threshold = threshold_for(key[0], thresholds)
            cls = ""
            if ratio is not None and ratio > 1 + threshold:
                cls, flagged = "worse", flagged + 1
            elif ratio is not None and ratio < 1 / (1 + threshold):
                cls = "better"
            rows.append(f"<tr><td>{_graph_link(key[0], _label(key))}</td>"
                        f'{_td(format_value(before, unit), "num")}'
                        f'{_td(format_value(now, unit), "num")}'
                        f'{_td("-" if ratio is None else f"{ratio:.2f}x", ("num " + cls).strip())}'
                        "</tr>")
        parts.append(f"<h3>Latest against previous commit</h3><p>{flagged} measurement(s) worse "
                     "by more than asv's regression threshold (red); green: better.</p>"
                     "<table><thead><tr><th>benchmark</th><th>previous</th><th>latest</th>"
                     f"<th>ratio</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")
    return "\n".join(parts)


def latest_pairs(snapshots: Iterable[Snapshot], order: dict[str, int]
                 ) -> list[tuple[Snapshot, Snapshot | None]]:
    """For each (machine, environment): the latest snapshot and the one before it, commits
    ordered by `order` (asv's revision numbers) and then by commit date."""
    groups: dict[tuple[str, str], list[Snapshot]] = {}
    for snap in snapshots:
        groups.setdefault((snap.machine, snap.env), []).append(snap)
    pairs = []
    for _, snaps in sorted(groups.items()):
        snaps.sort(key=lambda s: (order.get(s.commit, -1), s.date))
        pairs.append((snaps[-1], snaps[-2] if len(snaps) > 1 else None))
    return pairs


NAV = [("Benchmark grid", "index.html"), ("Benchmark list", "index.html#/summarylist"),
       ("Regressions", "index.html#/regressions"), ("BENCHMARKS.md", "BENCHMARKS.html")]


def build_summary(results_dir: Path, html_dir: Path, conf: dict[str, Any],
                  order: dict[str, int] | None = None) -> Path:
    """Write html/summary.html from `results_dir` and return its path."""
    bench_file = Path(results_dir) / "benchmarks.json"
    benchmarks = json.loads(bench_file.read_text()) if bench_file.exists() else {}
    benchmarks = {k: v for k, v in benchmarks.items() if isinstance(v, dict)}
    if order is None:
        index = Path(html_dir) / "index.json"
        revs = json.loads(index.read_text()).get("revision_to_hash", {}) if index.exists() else {}
        order = {h: int(r) for r, h in revs.items()}
    snapshots = load_snapshots(Path(results_dir), benchmarks)
    thresholds = thresholds_from_conf(conf)
    commit_url = conf.get("show_commit_url") or None
    sections = [render_group(latest, prev, benchmarks, thresholds, commit_url)
                for latest, prev in latest_pairs(snapshots, order)]
    if not sections:
        sections = ["<p>No results yet: run <code>make bench</code> or "
                    "<code>make history</code>, then <code>make dashboard</code>.</p>"]
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    intro = (f"<p>Generated {stamp} from {len(snapshots)} result file(s). Graphs, history and "
             "step detection are asv's own pages (links above); the benchmark plan and the "
             'latest full report are in <a href="BENCHMARKS.html">docs/BENCHMARKS.md</a>.</p>')
    target = Path(html_dir) / "summary.html"
    target.write_text(site.page(f"{conf.get('project', 'asv')} benchmarks: summary",
                                intro + "\n".join(sections), NAV))
    return target


def read_conf(path: Path) -> dict[str, Any]:
    """asv.conf.json (JSON with // comments), read as asv reads it."""
    from asv import util

    return util.load_json(str(path), js_comments=True)


def finish_site(html_dir: Path, results_dir: Path, conf: dict[str, Any],
                docs: Path = Path("docs/BENCHMARKS.md"),
                order: dict[str, int] | None = None) -> Path:
    """Everything on top of `asv publish`: vendored scripts, the summary page, the docs
    page and the navigation links to both."""
    html_dir = Path(html_dir)
    site.vendor_assets(html_dir)
    links = [("Summary", "summary.html")]
    if site.copy_docs(html_dir, docs, links + NAV[:3]) is not None:
        links.append(("BENCHMARKS.md", "BENCHMARKS.html"))
    site.add_nav_links(html_dir, links)
    return build_summary(results_dir, html_dir, conf, order)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen_lora_dash.summary",
                                     description="Finish html/ after `asv publish`.")
    parser.add_argument("--config", type=Path, default=Path("asv.conf.json"))
    parser.add_argument("--results", type=Path)
    parser.add_argument("--html", type=Path)
    parser.add_argument("--docs", type=Path, default=Path("docs/BENCHMARKS.md"))
    args = parser.parse_args(argv)
    conf = read_conf(args.config)
    html_dir = args.html or Path(conf.get("html_dir", "html"))
    results_dir = args.results or Path(conf.get("results_dir", "results"))
    if not (html_dir / "index.html").exists():
        print(f"error: {html_dir}/index.html missing: run asv publish first", file=sys.stderr)
        return 1
    print(finish_site(html_dir, results_dir, conf, args.docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
