"""An asv plugin: `asv publish` itself finishes the site (qwen_lora_dash.summary.finish_site).

Named in asv.conf.json as `"plugins": [".src.qwen_lora_dash.asv_plugin"]` (the leading dot:
import from the repository root, so any asv installation finds it), this module is imported
by every asv command; its OutputPublisher runs last in `asv publish`, after asv wrote its pages
and graphs, so that a fresh clone's `asv publish && asv preview` serves the landing summary, the
vendored scripts (graphs draw offline) and docs/BENCHMARKS.md without a further step.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from asv.console import log
from asv.publishing import OutputPublisher


class DashboardSummary(OutputPublisher):
    """html/summary.html, html/vendor/ and navigation links on top of asv's pages."""

    name = "summary"
    button_label = "Summary"
    description = "The seed's targets, qwen_lora against mlx-lm, latest against previous commit"
    order = math.inf

    @classmethod
    def publish(cls, conf: Any, repo: Any, benchmarks: Any, graphs: Any,
                revisions: dict[str, int]) -> None:
        from .summary import finish_site

        html_dir = Path(conf.html_dir)
        docs = Path("docs/BENCHMARKS.md")  # asv runs from the repository root...
        if not docs.exists():  # ...or html/ sits beside docs/
            docs = html_dir.resolve().parent / "docs" / "BENCHMARKS.md"
        page = finish_site(html_dir, Path(conf.results_dir), vars(conf), docs,
                           order=dict(revisions))
        log.info(f"wrote {page}")
