"""What a tour section reports, and how the report is written (HTML + JSON)."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kexue.experiments.tables import Number, Table, format_number


@dataclass
class Figure:
    """A PNG saved next to the report (``path`` relative to the report's folder)."""

    path: str
    caption: str


STATUSES = ("holds", "partly", "does not hold", "measured")


@dataclass
class Claim:
    """One claim of an article as the tour measured it: a row of the report's summary.

    ``status``: ``"holds"``, ``"partly"``, ``"does not hold"``, or ``"measured"`` (a number
    reported without a pass/fail claim); ``key_number``: the number that decides it, in words.
    """

    text: str
    status: str
    key_number: str

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")


@dataclass
class Section:
    """One capability's evidence: the claim, how it was tested, and what was measured."""

    name: str
    title: str
    claim: str
    method: str
    verdict: str = ""
    numbers: Mapping[str, Number] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)
    seconds: float = 0.0


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so the file stays standard."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json(sections: list[Section], meta: dict[str, Any], path: Path) -> None:
    payload = {**meta, "sections": {s.name: asdict(s) for s in sections}}
    path.write_text(json.dumps(_clean(payload), indent=2) + "\n")


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{margin-bottom:.2em} h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:1em 0;font-size:.92em}
td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
caption{caption-side:top;text-align:left;font-weight:600;padding-bottom:.3em}
figure{margin:1em 0} figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.9em;color:#555}
.claim{background:#f6f8ff;border-left:4px solid #4a6cf7;padding:.5em .8em}
.verdict{font-weight:600} .meta{color:#666;font-size:.9em}
table.summary td{text-align:left;vertical-align:top} table.summary{width:100%}
.status{font-weight:600;white-space:nowrap;border-radius:3px;padding:.1em .4em}
.status-holds{background:#d9f2dd;color:#0b5d1e} .status-partly{background:#fff1c2;color:#7a5b00}
.status-does-not-hold{background:#fbd9d7;color:#8a1c12}
.status-measured{background:#e6e9f0;color:#333}
.figures{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
.figures figure{flex:1 1 300px;margin:0}
details{margin:.5em 0} code{background:#f3f3f3;padding:0 .2em}
"""


def _summary_table(sections: list[Section]) -> list[str]:
    """The report's first table: every claim, its verdict in words and colour, the key number
    and a link to the section that measured it."""
    esc = html.escape
    rows = [(s, c) for s in sections for c in s.claims]
    if not rows:
        return []
    out = [
        "<table class='summary' id='summary'><caption>The claims at a glance</caption>",
        "<tr><th>claim</th><th>verdict</th><th>key number</th><th>section</th></tr>",
    ]
    for s, c in rows:
        css = "status-" + c.status.replace(" ", "-")
        out.append(
            f"<tr><td>{esc(c.text)}</td><td><span class='status {css}'>{esc(c.status)}</span>"
            f"</td><td>{esc(c.key_number)}</td>"
            f"<td><a href='#{esc(s.name)}'>{esc(s.title)}</a></td></tr>"
        )
    out.append("</table>")
    return out


def write_html(sections: list[Section], meta: dict[str, Any], path: Path) -> None:
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>kexue tour</title><style>{_CSS}</style></head><body>",
        "<h1>kexue tour</h1>",
        f"<p class='meta'>kexue {esc(str(meta.get('kexue_version')))} · "
        f"{esc(str(meta.get('date')))} · {esc(meta.get('machine', {}).get('summary', ''))} · "
        f"total {meta.get('seconds', 0):.1f} s</p>",
    ]
    parts += _summary_table(sections)
    parts.append("<ul>")
    parts += [f"<li><a href='#{esc(s.name)}'>{esc(s.title)}</a></li>" for s in sections]
    parts.append("</ul>")
    for s in sections:
        parts.append(f"<h2 id='{esc(s.name)}'>{esc(s.title)}</h2>")
        parts.append(f"<p class='claim'><b>Claim.</b> {esc(s.claim)}</p>")
        parts.append(f"<p><b>How it was tested.</b> {esc(s.method)}</p>")
        if s.verdict:
            parts.append(f"<p class='verdict'>Result: {esc(s.verdict)}</p>")
        for t in s.tables:
            parts.append(f"<table><caption>{esc(t.caption)}</caption><tr>")
            parts += [f"<th>{esc(h)}</th>" for h in t.headers]
            parts.append("</tr>")
            for row in t.rows:
                parts.append(
                    "<tr>" + "".join(f"<td>{esc(format_number(v))}</td>" for v in row) + "</tr>"
                )
            parts.append("</table>")
        if s.figures:
            parts.append("<div class='figures'>")
            for f in s.figures:
                parts.append(
                    f"<figure><img src='{esc(f.path)}' alt='{esc(f.caption)}'>"
                    f"<figcaption>{esc(f.caption)}</figcaption></figure>"
                )
            parts.append("</div>")
        for note in s.notes:
            parts.append(f"<p class='meta'>{esc(note)}</p>")
        if s.numbers:
            parts.append("<details><summary>All numbers of this section</summary><table>")
            parts += [
                f"<tr><td>{esc(k)}</td><td>{esc(format_number(v))}</td></tr>"
                for k, v in s.numbers.items()
            ]
            parts.append("</table></details>")
        parts.append(f"<p class='meta'>section time {s.seconds:.1f} s</p>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts))
