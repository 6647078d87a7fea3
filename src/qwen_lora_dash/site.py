"""Finishing touches on the site `asv publish` writes to html/, keeping asv's own pages intact.

- `vendor_assets`: asv's index.html loads jQuery, flot and Bootstrap from CDNs, so offline (and
  in a sandboxed CI browser) its graphs stay blank. Copy the vendored files (vendor/README.md)
  to html/vendor/ and point index.html at them, keeping asv's integrity hash where the bytes
  are the CDN's own.
- `add_nav_links`: a "Summary" entry (the landing summary page) and a "BENCHMARKS.md" entry in
  asv's navigation bar.
- `copy_docs`: docs/BENCHMARKS.md beside the pages, raw and rendered.

All three are idempotent: running them twice changes nothing the second time.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
from pathlib import Path

VENDOR_DIR = Path(__file__).with_name("vendor")

# asv 0.6's CDN URLs -> the vendored file that replaces each (vendor/README.md).
CDN_TO_LOCAL = {
    "https://code.jquery.com/jquery-3.3.1.min.js": "jquery-3.3.1.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.min.js":
        "jquery.flot-0.8.3.js",
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.time.min.js":
        "jquery.flot.time-0.8.3.js",
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.selection.min.js":
        "jquery.flot.selection-0.8.3.js",
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.categories.min.js":
        "jquery.flot.categories-0.8.3.js",
    "https://cdn.jsdelivr.net/npm/flot-orderbars@1.0.0/js/jquery.flot.orderBars.js":
        "jquery.flot.orderBars-1.0.0.js",
    "https://cdnjs.cloudflare.com/ajax/libs/stupidtable/1.0.1/stupidtable.min.js":
        "stupidtable-1.1.3.js",
    "https://cdnjs.cloudflare.com/ajax/libs/blueimp-md5/2.19.0/js/md5.min.js":
        "md5-2.19.0.min.js",
    "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/js/bootstrap.min.js":
        "bootstrap-3.1.1.min.js",
    "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/css/bootstrap.min.css":
        "bootstrap-3.1.1.min.css",
}

_TAG = re.compile(r"<(script|link)\b[^>]*?\b(?:src|href)=\"(https?://[^\"]+)\"[^>]*>", re.S)
_INTEGRITY = re.compile(r"\s+integrity=\"([^\"]*)\"")
_CROSSORIGIN = re.compile(r"\s+crossorigin=\"[^\"]*\"")
NAV_MARKER = "<!-- qwen-lora dashboard links -->"


def sri(data: bytes, algorithm: str) -> str:
    """A Subresource Integrity value (`sha256-...`) of `data`."""
    digest = hashlib.new(algorithm, data).digest()
    return f"{algorithm}-{base64.b64encode(digest).decode()}"


def _localize(match: re.Match[str], html_dir: Path) -> str:
    tag, url = match.group(0), match.group(2)
    local = CDN_TO_LOCAL.get(url)
    if local is None:
        return tag  # an asv version with other URLs: leave the tag as asv wrote it
    data = (VENDOR_DIR / local).read_bytes()
    dest = html_dir / "vendor" / local
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    tag = tag.replace(url, f"vendor/{local}")
    integrity = _INTEGRITY.search(tag)
    if integrity:
        expected = integrity.group(1)
        algorithm = expected.split("-", 1)[0]
        if algorithm not in hashlib.algorithms_available or sri(data, algorithm) != expected:
            # Same library and version, but not the CDN's bytes (cdnjs minified flot itself):
            # a browser would refuse it under the CDN's hash.
            tag = _CROSSORIGIN.sub("", _INTEGRITY.sub("", tag))
    return tag


def vendor_assets(html_dir: Path) -> int:
    """Serve asv's CDN scripts and styles from html/vendor/; returns how many tags changed."""
    index = Path(html_dir) / "index.html"
    text = index.read_text()
    changed = 0

    def replace(match: re.Match[str]) -> str:
        nonlocal changed
        new = _localize(match, Path(html_dir))
        changed += new != match.group(0)
        return new

    text = _TAG.sub(replace, text)
    index.write_text(text)
    return changed


def add_nav_links(html_dir: Path, links: list[tuple[str, str]]) -> bool:
    """Add (label, href) entries after the "Regressions" item of asv's navigation bar.
    Returns False when the bar is not where asv 0.6 puts it (the page is left untouched)."""
    index = Path(html_dir) / "index.html"
    text = index.read_text()
    if NAV_MARKER in text:
        return True
    anchor = re.search(r"<li id=\"nav-li-regressions\">.*?</li>", text, re.S)
    if anchor is None:
        return False
    items = "".join(f'\n\t<li class="qwen-lora-link"><a href="{html.escape(href)}">'
                    f"{html.escape(label)}</a></li>" for label, href in links)
    text = text[:anchor.end()] + f"\n\t{NAV_MARKER}{items}" + text[anchor.end():]
    index.write_text(text)
    return True


def render_markdown(text: str) -> str:
    """A small Markdown renderer for the generated docs: headings, paragraphs, lists, pipe
    tables, fenced code, `code`, **bold** and [links](url). Enough for docs/BENCHMARKS.md."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0

    def inline(s: str) -> str:
        s = html.escape(s, quote=False)
        s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
        s = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)
        return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', s)

    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            block = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                block.append(lines[i])
                i += 1
            out.append(f"<pre><code>{html.escape(chr(10).join(block))}</code></pre>")
            i += 1
        elif m := re.match(r"(#{1,6})\s+(.*)", line):
            level = len(m.group(1))
            out.append(f"<h{level}>{inline(m.group(2))}</h{level}>")
            i += 1
        elif line.lstrip().startswith("|"):
            rows = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            body = [r for r in rows if not all(re.fullmatch(r":?-+:?", c) for c in r)]
            head, rest = (body[0], body[1:]) if len(rows) > 1 else ([], body)
            cells = "".join(f"<th>{inline(c)}</th>" for c in head)
            trs = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>"
                          for r in rest)
            out.append(f"<table><thead><tr>{cells}</tr></thead><tbody>{trs}</tbody></table>")
        elif re.match(r"\s*[-*]\s+", line):
            items = []
            while i < len(lines) and (re.match(r"\s*[-*]\s+", lines[i])
                                      or (lines[i].startswith("  ") and items)):
                if re.match(r"\s*[-*]\s+", lines[i]):
                    items.append(re.sub(r"^\s*[-*]\s+", "", lines[i]))
                else:
                    items[-1] += " " + lines[i].strip()
                i += 1
            out.append("<ul>" + "".join(f"<li>{inline(x)}</li>" for x in items) + "</ul>")
        elif not line.strip():
            i += 1
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not re.match(
                    r"(#{1,6}\s|```|\s*\||\s*[-*]\s+)", lines[i]):
                para.append(lines[i].strip())
                i += 1
            out.append(f"<p>{inline(' '.join(para))}</p>")
    return "\n".join(out)


PAGE_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0;
       color: #222; background: #fafafa; }
header { background: #2c3e50; color: #fff; padding: 12px 24px; }
header a { color: #cfe3ff; margin-right: 18px; }
main { padding: 8px 24px 40px; max-width: 1200px; }
table { border-collapse: collapse; margin: 8px 0 18px; background: #fff; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: left; font-size: 14px; }
th { background: #f0f3f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.pass { color: #176f2c; font-weight: bold; }
.fail { color: #b3261e; font-weight: bold; }
.na { color: #777; }
.worse { background: #fde8e6; }
.better { background: #e6f4ea; }
code { background: #eef; padding: 0 3px; }
pre { background: #f4f4f4; padding: 8px; overflow-x: auto; }
"""


def page(title: str, body: str, nav: list[tuple[str, str]]) -> str:
    """A standalone HTML page in the dashboard's style with a link bar."""
    links = "".join(f'<a href="{html.escape(h)}">{html.escape(label)}</a>' for label, h in nav)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{PAGE_STYLE}</style></head>\n"
            f"<body><header><strong>{html.escape(title)}</strong>&nbsp;&nbsp; {links}</header>\n"
            f"<main>\n{body}\n</main></body></html>\n")


def copy_docs(html_dir: Path, docs: Path, nav: list[tuple[str, str]]) -> Path | None:
    """docs/BENCHMARKS.md into html/ as BENCHMARKS.md and a rendered BENCHMARKS.html."""
    docs = Path(docs)
    if not docs.exists():
        return None
    text = docs.read_text()
    (Path(html_dir) / docs.name).write_text(text)
    target = Path(html_dir) / f"{docs.stem}.html"
    target.write_text(page(docs.name, render_markdown(text), nav))
    return target

