"""The published site on a small asv project measured and published by asv itself: the plugin
runs inside `asv publish`, vendors asv's scripts, adds the landing summary with the seed's
targets judged, and links docs/BENCHMARKS.md; in headless Chromium the graphs draw offline
and the regressions page lists the slowdown the project's history contains."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from dash_helpers import REPO, asv, make_toy_project, measure_toy_project, serve

from qwen_lora_dash import site, summary
from qwen_lora_dash.headless import Browser, find_chromium

ARTIFACTS = REPO / "test-artifacts"

# Three commits: a baseline; then qwen_lora's generation 20% slower (past asv's 10% threshold,
# and below 95% of mlx-lm) and top-p sampling at 2% of a forward pass; then training at 95%.
VERSIONS = [
    {},
    {"token/qwen_lora": 0.012, "sample/top_p/151936": 0.0002},
    {"token/qwen_lora": 0.012, "sample/top_p/151936": 0.0002, "train/qwen_lora": 0.0105},
]


@pytest.fixture(scope="module")
def toy_site(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("toy") / "project"
    home = tmp_path_factory.mktemp("home")
    commits = make_toy_project(root, VERSIONS)
    measure_toy_project(root, home, commits)
    asv(root, home, "publish")
    return root, commits


class _Rows(HTMLParser):
    """Table rows of a page as lists of cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def table_rows(path: Path) -> list[list[str]]:
    parser = _Rows()
    parser.feed(path.read_text())
    return parser.rows


def test_asv_publish_runs_the_plugin_and_vendors_the_scripts(toy_site):
    root, _ = toy_site
    html_dir = root / "html"
    index = (html_dir / "index.html").read_text()
    assert not re.search(r'src="https?://', index), "a script still comes from a CDN"
    assert 'href="https://cdn.jsdelivr.net/npm/bootstrap' not in index
    for local in site.CDN_TO_LOCAL.values():
        assert (html_dir / "vendor" / local).read_bytes() == (site.VENDOR_DIR / local).read_bytes()
    # Byte-identical files keep asv's integrity hash; the others lose it (or browsers refuse).
    jquery = re.search(r'<script src="vendor/jquery-3.3.1.min.js"[^>]*>', index).group(0)
    assert 'integrity="sha256-FgpCb/KJQlLNfOu91ta32o/NMZxltwRo8QtmkMRdAu8="' in jquery
    flot = re.search(r'<script src="vendor/jquery.flot-0.8.3.js"[^>]*>', index).group(0)
    assert "integrity" not in flot
    assert index.count(site.NAV_MARKER) == 1
    assert '<a href="summary.html">Summary</a>' in index
    assert '<a href="BENCHMARKS.html">BENCHMARKS.md</a>' in index
    # asv's own pages and data are all still there.
    for name in ("regressions.json", "regressions.xml", "index.json", "graphdisplay.js"):
        assert (html_dir / name).exists()
    assert ["a", "b"] in table_rows(html_dir / "BENCHMARKS.html")
    assert (html_dir / "BENCHMARKS.md").read_text().startswith("# Benchmarks")


def test_summary_judges_the_seed_targets_on_the_latest_commit(toy_site):
    root, commits = toy_site
    page = root / "html" / "summary.html"
    text = page.read_text()
    assert commits[-1][:8] in text and commits[-2][:8] in text
    verdicts = {row[0]: row[1:4] for row in table_rows(page) if len(row) == 5}
    assert verdicts["Training Throughput"][1:] == ["95% of mlx-lm", "PASS"]
    assert verdicts["Inference Speed"][1:] == ["83% of mlx-lm (decoding)", "FAIL"]
    assert verdicts["Memory Usage"][1:] == ["worst 0.91x of mlx-lm (track_forward)", "PASS"]
    assert verdicts["KV-Cache Speedup"][1:] == ["5.0x", "PASS"]
    assert verdicts["Sampling Overhead"][2] == "FAIL"
    assert verdicts["Sampling Overhead"][1].startswith("2.00% (worst: Top-p")
    ratios = {(r[0], r[1]): r[4] for r in table_rows(page) if len(r) == 5 and r[4].endswith("x")}
    assert ratios[("inference.Generation.time_per_token", "")] == "1.20x"
    assert ratios[("memory.PeakMemory.track_forward", "")] == "0.91x"
    # Latest against previous: only training moved (5%, under the 10% threshold).
    assert "0 measurement(s) worse" in text
    assert re.search(r"training\.LoRATraining\.time_step \(qwen_lora\).*?1\.05x", text, re.S)


def test_finishing_again_changes_nothing(toy_site, tmp_path):
    root, _ = toy_site
    html_dir = tmp_path / "html"
    subprocess.run(["cp", "-r", str(root / "html"), str(html_dir)], check=True)
    before = (html_dir / "index.html").read_text()
    proc = subprocess.run([sys.executable, "-m", "qwen_lora_dash.summary", "--config",
                           str(root / "asv.conf.json"), "--results", str(root / "results"),
                           "--html", str(html_dir), "--docs", str(root / "docs/BENCHMARKS.md")],
                          capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert (html_dir / "index.html").read_text() == before
    assert site.vendor_assets(html_dir) == 0


def test_snapshots_follow_asv_revisions(toy_site):
    root, commits = toy_site
    conf = summary.read_conf(root / "asv.conf.json")
    benchmarks = json.loads((root / "results" / "benchmarks.json").read_text())
    sets = summary.load_result_sets(root / "results", benchmarks)
    assert sorted(rs.commit for rs in sets) == sorted(commits)
    order = {c: i for i, c in enumerate(commits)}
    [(latest, previous)] = summary.latest_pairs(sets, order)
    assert (latest.commit, previous.commit) == (commits[2], commits[1])
    assert latest.get("training.LoRATraining.time_step", implementation="qwen_lora").value \
        == 0.0105
    assert summary.threshold_for("memory.PeakMemory.track_forward",
                                 summary.thresholds_from_conf(conf)) == 0.01


def test_render_markdown_covers_the_generated_docs():
    md = ("# Title\n\nSome `code` and **bold** with a [link](x.html).\n\n- one\n- two\n  more\n\n"
          "| h1 | h2 |\n|:---|---:|\n| a | b |\n\n```text\n<raw>\n```\n")
    out = site.render_markdown(md)
    assert "<h1>Title</h1>" in out
    assert "<code>code</code>" in out and "<strong>bold</strong>" in out
    assert '<a href="x.html">link</a>' in out
    assert "<li>two more</li>" in out
    assert "<th>h1</th>" in out and "<td>b</td>" in out and "---" not in out
    assert "<pre><code>&lt;raw&gt;</code></pre>" in out


GRAPH_POINTS = """(() => {
  const plot = $('#main-graph').data('plot');
  if (!plot) return null;
  return plot.getData().filter(s => s.data && s.data.length)
             .map(s => s.data.filter(p => p && p[1] !== null).length);
})()"""


@pytest.mark.skipif(find_chromium() is None,
                    reason="chromium is not installed (apt-get install chromium; .ci/run does)")
def test_pages_render_in_headless_chromium(toy_site):
    root, commits = toy_site
    ARTIFACTS.mkdir(exist_ok=True)
    with serve(root / "html") as url, Browser() as browser:
        browser.navigate(f"{url}/index.html#inference.Generation.time_per_token")
        points = browser.wait_for(GRAPH_POINTS, timeout=30)
        assert sorted(points) == [3, 3], points  # qwen_lora and mlx-lm, three commits each
        browser.screenshot(ARTIFACTS / "toy-graph.png")
        browser.navigate(f"{url}/index.html#regressions")
        rows = browser.wait_for("""[...document.querySelectorAll('#regressions-body tbody tr')]
            .map(tr => tr.innerText)""", timeout=30)
        assert any("inference.Generation.time_per_token" in r and commits[1][:8] in r
                   for r in rows), rows
        browser.navigate(f"{url}/summary.html")
        assert browser.evaluate("document.querySelectorAll('td.fail').length") == 2
        assert browser.console_errors() == []
