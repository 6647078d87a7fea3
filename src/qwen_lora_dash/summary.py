"""The dashboard's landing summary: html/summary.html, built from asv's results.

For each machine and workload (asv environment) it shows
- the seed's targets judged pass/fail on the latest measured commit: training throughput at
  least 90% of mlx-lm's, inference speed at least 95%, peak memory at most mlx-lm's, the KV
  cache at least 2x faster than recomputation, sampling under 1% of a forward pass (judged by
  `qwen_lora.report.judge`, as docs/BENCHMARKS.md judges them);
- every qwen_lora measurement next to mlx-lm's (the ratio) on that commit;
- the latest commit against the previous measured one, changes beyond asv's regression
  thresholds highlighted;
and links to asv's own pages (grid, list, regressions) and to docs/BENCHMARKS.md.

It runs inside `asv publish` as an asv plugin (`.src.qwen_lora_dash.asv_plugin`, named in
asv.conf.json's "plugins"), or afterwards: `python -m qwen_lora_dash.summary` (`make dashboard`).
"""

from __future__ import annotations

import argparse
import functools
import html
import importlib.util
import json
import math
import re
import sys
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

from . import site

QWEN_LORA, MLX_LM = "qwen_lora", "mlx_lm"
IMPL = "implementation"
DEFAULT_THRESHOLD = 0.05
REPORT_PY = Path(__file__).resolve().parents[1] / "qwen_lora" / "report.py"


@functools.cache
def report() -> ModuleType:
    """`qwen_lora.report` (docs/BENCHMARKS.md), whose result reader and target judgements the
    summary shares. Loaded from its file: it needs only the standard library, while importing
    the `qwen_lora` package would load MLX and the BLAS shim into `asv publish`."""
    spec = importlib.util.spec_from_file_location("_qwen_lora_report", REPORT_PY)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {REPORT_PY}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def load_result_sets(results_dir: Path, benchmarks: dict[str, Any]) -> list[Any]:
    """Every asv result file under `results_dir/<machine>/`, read by the report's reader
    (`qwen_lora.report.ResultSet`: commit, environment, workload, measurements)."""
    sets = []
    for machine_json in sorted(Path(results_dir).glob("*/machine.json")):
        for path in sorted(machine_json.parent.glob("*.json")):
            if path.name != "machine.json":
                rs = report().read_result_file(path, benchmarks)
                if rs.values:
                    sets.append(rs)
    return sets


def machine_of(rs: Any) -> str:
    return rs.params.get("machine") or rs.path.parent.name


def judge(rs: Any) -> list[Any]:
    """The seed's five targets on one result set, as docs/BENCHMARKS.md judges them."""
    workloads = report().WORKLOADS
    vocab = workloads.get(rs.workload, workloads["default"])["vocab"]
    return report().judge(rs, vocab)


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


def _value(measurement: Any | None) -> float | None:
    return None if measurement is None else measurement.value


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def _label(key: tuple[str, tuple[tuple[str, Any], ...]]) -> str:
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


def render_group(latest: Any, previous: Any | None, benchmarks: dict[str, Any],
                 thresholds: list[tuple[re.Pattern[str], float]],
                 commit_url: str | None) -> str:
    """The summary of one machine and workload."""
    parts = [f"<h2>{html.escape(machine_of(latest))} &middot; workload "
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
        source = v.source.replace("`", "")
        rows.append(f"<tr>{_td(v.metric)}{_td(v.target)}{_td(v.measured)}"
                    f'<td class="{status[0]}">{status[1]}</td>{_td(source)}</tr>')
    parts.append('<h3>Targets of the seed</h3><table class="targets"><thead><tr><th>target</th>'
                 "<th>goal</th><th>measured</th><th>verdict</th><th>from</th></tr></thead>"
                 f"<tbody>{''.join(rows)}</tbody></table>")

    # qwen_lora against mlx-lm, same parameters otherwise.
    rows = []
    for (name, params), measured in sorted(latest.values.items(), key=str):
        ours, p = measured.value, dict(params)
        if p.get(IMPL) != QWEN_LORA:
            continue
        other = dict(p, **{IMPL: MLX_LM})
        found = latest.values.get((name, tuple(sorted(other.items()))))
        if found is None:
            continue
        theirs = found.value
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
            now, before = _value(latest.values.get(key)), _value(previous.values.get(key))
            unit = benchmarks.get(key[0], {}).get("unit", "")
            ratio = _ratio(now, before)
            threshold = threshold_for(key[0], thresholds)
            cls = ""
            if ratio is not None and ratio > 1 + threshold:
                cls, flagged = "worse", flagged + 1
            elif ratio is not None and ratio < 1 / (1 + threshold):
                cls = "better"
            rows.append((cls == "", f"<tr><td>{_graph_link(key[0], _label(key))}</td>"
                         f'{_td(format_value(before, unit), "num")}'
                         f'{_td(format_value(now, unit), "num")}'
                         f'{_td("-" if ratio is None else f"{ratio:.2f}x", ("num " + cls).strip())}'
                         "</tr>"))
        head = ("<table><thead><tr><th>benchmark</th><th>previous</th><th>latest</th>"
                "<th>ratio</th></tr></thead><tbody>")
        moved = "".join(r for same, r in rows if not same)
        steady = "".join(r for same, r in rows if same)
        parts.append(f"<h3>Latest against previous commit</h3><p>{flagged} measurement(s) worse "
                     "by more than asv's regression threshold (red); green: better by as much."
                     "</p>" + (f"{head}{moved}</tbody></table>" if moved else "")
                     + (f"<details><summary>{sum(same for same, _ in rows)} within the "
                        f"threshold</summary>{head}{steady}</tbody></table></details>"
                        if steady else ""))
    return "\n".join(parts)


def latest_pairs(result_sets: Iterable[Any], order: dict[str, int]
                 ) -> list[tuple[Any, Any | None]]:
    """For each (machine, environment): the latest result set and the one before it, commits
    ordered by `order` (asv's revision numbers), then by when they were measured."""
    groups: dict[tuple[str, str], list[Any]] = {}
    for rs in result_sets:
        groups.setdefault((machine_of(rs), rs.env_name), []).append(rs)
    pairs = []
    for _, sets in sorted(groups.items()):
        sets.sort(key=lambda rs: (order.get(rs.commit, -1), rs.started or 0))
        pairs.append((sets[-1], sets[-2] if len(sets) > 1 else None))
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
    snapshots = load_result_sets(Path(results_dir), benchmarks)
    thresholds = thresholds_from_conf(conf)
    commit_url = conf.get("show_commit_url") or None
    sections = [render_group(latest, prev, benchmarks, thresholds, commit_url)
                for latest, prev in latest_pairs(snapshots, order)]
    if not sections:
        sections = ["<p>No results yet: run <code>make bench</code> or "
                    "<code>make history</code>, then <code>make dashboard</code>.</p>"]
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    has_docs = (Path(html_dir) / "BENCHMARKS.html").exists()
    intro = (f"<p>Generated {stamp} from {len(snapshots)} result file(s). Graphs, history and "
             "step detection are asv's own pages (links above)"
             + ("; the benchmark plan and the latest full report are in "
                '<a href="BENCHMARKS.html">docs/BENCHMARKS.md</a>.</p>' if has_docs else ".</p>"))
    nav = NAV if has_docs else NAV[:3]
    target = Path(html_dir) / "summary.html"
    target.write_text(site.page(f"{conf.get('project', 'asv')} benchmarks: summary",
                                intro + "\n".join(sections), nav))
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
