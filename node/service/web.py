"""The web page at GET / on the health port: a read-only dashboard for the PACS admin.

One self-contained HTML document (inline style, no script, no external asset: it works on a
hospital network without internet) that reloads itself with a meta refresh. It shows the
newest studies (UID, state, result, probabilities, export state, age), the model served,
every health problem and, once there is one, a thumbnail of the latest result image (a small
PNG inside the page as a data: URI, so the page's token covers it and nothing else is
served). It carries no patient data (storage keeps none to show; the result image has no
identifier burned in) and every value is HTML-escaped: UIDs, AE titles and error texts come
from the network.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom import dcmread

from node.dicom.objects import object_kind
from storage.db import Database, ExportState
from storage.objects import ResultObject, newest_object_paths, result_objects
from storage.reports import StudySummary, study_summaries

log = logging.getLogger(__name__)

STUDIES_SHOWN = 50  # newest studies on the page
THUMB_WIDTH = 240  # pixels; the result image is 1024 wide
THUMB_CANDIDATES = 8  # newest result objects looked at for the latest result image

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .3em}h2{font-size:1.05em;margin:1.2em 0 .4em}
table{border-collapse:collapse;background:#fff}td,th{padding:.25em .6em;text-align:left;
border-bottom:1px solid #ddd;white-space:nowrap}th{background:#eee}
.ok{color:#175d17;font-weight:bold}.degraded{color:#a40000;font-weight:bold}
.uid{font-family:ui-monospace,monospace}.muted{color:#777}ul{margin:.3em 0}
"""


class Thumbnails:
    """The latest result image as a small PNG, made once per image file (a page load of an
    unchanged node reads no DICOM file). Holds one PNG (~50 KiB)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[str, float] | None = None
        self._png = b""

    def latest(self, db: Database) -> tuple[str, bytes] | None:
        """(study UID, PNG) of the newest result image still on disk, or None."""
        for study_uid, path in newest_object_paths(db, THUMB_CANDIDATES):
            if object_kind(path) == "image":
                png = self._png_of(Path(path))
                return (study_uid, png) if png else None
        return None

    def _png_of(self, path: Path) -> bytes:
        try:
            key = (str(path), path.stat().st_mtime)
        except OSError:  # retention removed it
            return b""
        with self._lock:
            if key != self._key:
                self._png, self._key = thumbnail_png(path), key
            return self._png


def thumbnail_png(path: Path, width: int = THUMB_WIDTH) -> bytes:
    """A stored result image (8-bit RGB Secondary Capture) scaled to `width` as PNG; b""
    for anything else (the page then shows no thumbnail, never an error)."""
    try:
        ds = dcmread(path)
        if (ds.SamplesPerPixel, ds.BitsAllocated, ds.PhotometricInterpretation) != \
                (3, 8, "RGB"):
            return b""
        rgb = np.frombuffer(ds.PixelData, np.uint8).reshape(int(ds.Rows), int(ds.Columns), 3)
        img = Image.fromarray(rgb, "RGB")
        img.thumbnail((width, width * 4), Image.Resampling.LANCZOS)
        buf = BytesIO()
        img.save(buf, format="PNG", optimize=True)
        return buf.getvalue()
    except Exception as exc:  # unreadable, cut short, odd: no thumbnail
        log.warning("no thumbnail of result image %s: %s", path.name, type(exc).__name__)
        return b""


@dataclass(frozen=True)
class PageSource:
    """What the page is built from: the database and the refresh period."""

    db: Database
    refresh_seconds: int = 10
    thumbnails: Thumbnails = field(default_factory=Thumbnails, compare=False)

    def render(self, report: Mapping[str, Any]) -> str:
        """The page for this health report and the newest studies."""
        rows = study_summaries(self.db, limit=STUDIES_SHOWN)
        objects = result_objects(self.db, [r.study_uid for r in rows]) if rows else {}
        return render_page(report, rows, self.refresh_seconds, objects=objects,
                           thumbnail=self.thumbnails.latest(self.db))


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


def _export(r: StudySummary, objects: Sequence[ResultObject]) -> str | None:
    """The export cell: the SR's delivery and how many of the result's objects (SR, image,
    PDF) were delivered: "done, 3/3 sent"."""
    export: str | None = r.export_state or None
    if r.export_state and r.export_attempts and r.export_state != "done":
        export = f"{r.export_state} ({r.export_attempts} attempt(s))"
    if objects:
        sent = sum(o.state is ExportState.DONE for o in objects)
        count = f"{sent}/{len(objects)} sent"
        export = f"{export or '-'}, {count}"
    return export


def _study_rows(rows: Sequence[StudySummary], now: datetime,
                objects: Mapping[str, Sequence[ResultObject]] | None = None) -> str:
    out = []
    for r in rows:
        export = _export(r, (objects or {}).get(r.study_uid, ()))
        cells = [f'<td class="uid" title="{_e(r.study_uid)}">{_e(r.study_uid)}</td>',
                 f"<td>{_e(r.state)}</td>", f"<td>{_e(r.predicted_class)}</td>",
                 f"<td>{_e(_probabilities(r.probabilities))}</td>",
                 f"<td>{_e(export)}</td>", f"<td>{_e(r.model_version)}</td>",
                 f"<td>{_e(_age((now - r.last_instance_at).total_seconds()))}</td>"]
        out.append(f'<tr data-study="{_e(r.study_uid)}">{"".join(cells)}</tr>')
    return "\n".join(out) or '<tr><td colspan="7" class="muted">no studies yet</td></tr>'


def _model(report: Mapping[str, Any]) -> str:
    m, shadow = report.get("model"), report.get("shadow_trial")
    trial = "" if not shadow else (f"<p>shadow trial: version {_e(shadow)} "
                                   '<span class="muted">(its results are stored, never sent)'
                                   "</span></p>")
    if not m:
        return '<p class="muted">no model loaded</p>' + trial
    return (f"<p>{_e(m.get('name'))} version {_e(m.get('version'))} "
            f'<span class="muted">sha256 {_e(str(m.get("sha256", ""))[:16])}…</span></p>'
            + trial)


def _problems(report: Mapping[str, Any]) -> str:
    problems = report.get("problems") or []
    if not problems:
        return '<p class="muted">none</p>'
    return "<ul>" + "".join(f"<li>{_e(p)}</li>" for p in problems) + "</ul>"


def _thumbnail(thumbnail: tuple[str, bytes] | None) -> str:
    """The latest result image, inline (data: URI; the page's CSP allows img-src data:)."""
    if not thumbnail or not thumbnail[1]:
        return ""
    study_uid, png = thumbnail
    data = base64.b64encode(png).decode("ascii")
    return (f'<h2>Latest result image <span class="muted">(study <span class="uid">'
            f'{_e(study_uid)}</span>)</span></h2>\n<img id="result-image" width="{THUMB_WIDTH}" '
            f'alt="result image of study {_e(study_uid)}" src="data:image/png;base64,{data}">')


def render_page(report: Mapping[str, Any], rows: Sequence[StudySummary], refresh_seconds: int,
                now: datetime | None = None,
                objects: Mapping[str, Sequence[ResultObject]] | None = None,
                thumbnail: tuple[str, bytes] | None = None) -> str:
    """The whole document; every value escaped. `objects`: each study's result objects (the
    export cell counts them); `thumbnail`: (study UID, PNG) of the latest result image."""
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
{_thumbnail(thumbnail)}
<h2>Studies <span class="muted">(newest {len(rows)}; queue: {queue or "-"})</span></h2>
<table id="studies"><thead><tr><th>study</th><th>state</th><th>result</th>
<th>probabilities</th><th>export</th><th>model</th><th>age</th></tr></thead>
<tbody>
{_study_rows(rows, when, objects)}
</tbody></table>
</body></html>
"""
