"""The web page at GET / on the health port: a read-only dashboard for the PACS admin.

One self-contained HTML document (inline style, no script, no external asset: it works on a
hospital network without internet) that reloads itself with a meta refresh. It shows the
newest studies (UID, state, result, probabilities, export state, age), the model served and
every health problem. It carries no patient data (storage keeps none to show) and every
value is HTML-escaped: UIDs, AE titles and error texts come from the network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from typing import Any

from storage.db import Database
from storage.reports import StudySummary, study_summaries

STUDIES_SHOWN = 50  # newest studies on the page

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .3em}h2{font-size:1.05em;margin:1.2em 0 .4em}
table{border-collapse:collapse;background:#fff}td,th{padding:.25em .6em;text-align:left;
border-bottom:1px solid #ddd;white-space:nowrap}th{background:#eee}
.ok{color:#175d17;font-weight:bold}.degraded{color:#a40000;font-weight:bold}
.uid{font-family:ui-monospace,monospace}.muted{color:#777}ul{margin:.3em 0}
"""


@dataclass(frozen=True)
class PageSource:
    """What the page is built from: the database and the refresh period."""

    db: Database
    refresh_seconds: int = 10

    def render(self, report: Mapping[str, Any]) -> str:
        """The page for this health report and the newest studies."""
        rows = study_summaries(self.db, limit=STUDIES_SHOWN)
        return render_page(report, rows, self.refresh_seconds)


def _e(value: object) -> str:
    return escape("-" if value is None or value == "" else str(value), quote=True)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(max(seconds, 0))}s"


def _probabilities(p: Mapping[str, float] | None) -> str:
    if not p:
        return "-"
    return ", ".join(f"{k} {v:.2f}" for k, v in sorted(p.items(), key=lambda kv: -kv[1]))


def _study_rows(rows: Sequence[StudySummary], now: datetime) -> str:
    out = []
    for r in rows:
        export: str | None = r.export_state or None
        if r.export_state and r.export_attempts and r.export_state != "done":
            export = f"{r.export_state} ({r.export_attempts} attempt(s))"
        cells = [f'<td class="uid" title="{_e(r.study_uid)}">{_e(r.study_uid)}</td>',
                 f"<td>{_e(r.state)}</td>", f"<td>{_e(r.predicted_class)}</td>",
                 f"<td>{_e(_probabilities(r.probabilities))}</td>",
                 f"<td>{_e(export)}</td>", f"<td>{_e(r.model_version)}</td>",
                 f"<td>{_e(_age((now - r.last_instance_at).total_seconds()))}</td>"]
        out.append(f'<tr data-study="{_e(r.study_uid)}">{"".join(cells)}</tr>')
    return "\n".join(out) or '<tr><td colspan="7" class="muted">no studies yet</td></tr>'


def _model(report: Mapping[str, Any]) -> str:
    m = report.get("model")
    if not m:
        return '<p class="muted">no model loaded</p>'
    return (f"<p>{_e(m.get('name'))} version {_e(m.get('version'))} "
            f'<span class="muted">sha256 {_e(str(m.get("sha256", ""))[:16])}…</span></p>')


def _problems(report: Mapping[str, Any]) -> str:
    problems = report.get("problems") or []
    if not problems:
        return '<p class="muted">none</p>'
    return "<ul>" + "".join(f"<li>{_e(p)}</li>" for p in problems) + "</ul>"


def render_page(report: Mapping[str, Any], rows: Sequence[StudySummary], refresh_seconds: int,
                now: datetime | None = None) -> str:
    """The whole document; every value escaped."""
    when = now or datetime.now(UTC)
    status = "ok" if report.get("status") == "ok" else "degraded"
    queue = ", ".join(f"{_e(k.replace('_', ' '))} {_e(v)}"
                      for k, v in (report.get("queue") or {}).items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{int(refresh_seconds)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>dscint-node {_e(report.get("ae_title"))}</title><style>{_STYLE}</style></head>
<body>
<h1>dscint-node {_e(report.get("ae_title"))}</h1>
<p>health: <span id="health" class="{status}">{status}</span>
<span class="muted">· {_e(when.isoformat(timespec="seconds"))} · refreshes every
{int(refresh_seconds)} s</span></p>
<h2>Problems</h2><div id="problems">{_problems(report)}</div>
<h2>Model</h2><div id="model">{_model(report)}</div>
<h2>Studies <span class="muted">(newest {len(rows)}; queue: {queue or "-"})</span></h2>
<table id="studies"><thead><tr><th>study</th><th>state</th><th>result</th>
<th>probabilities</th><th>export</th><th>model</th><th>age</th></tr></thead>
<tbody>
{_study_rows(rows, when)}
</tbody></table>
</body></html>
"""
