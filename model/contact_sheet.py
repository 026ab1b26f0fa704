"""A PNG contact sheet of phantom studies, optionally beside the real GE scan.

Why: the phantoms are only useful if they look like real whole-body scans; a sheet next to the
real image is how a person (or a reviewer) checks that quickly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from model.phantoms import PhantomStudy

STUDIES_PER_ROW = 4


def display_window(img: np.ndarray, percentile: float = 99.5) -> tuple[float, float]:
    """Grey-level window as NM physicians read bone scans: 0 to a high percentile of counts.

    Clipping at a high percentile (not the maximum) keeps a hot bladder or injection site from
    washing out the skeleton.
    """
    hi = float(np.percentile(img, percentile)) if img.size else 1.0
    return 0.0, max(hi, 1.0)


def _panels(studies: Sequence[PhantomStudy]) -> list[tuple[np.ndarray, str]]:
    """(image, title) for each view of each study, anterior first."""
    out = []
    for st in studies:
        name = st.label.replace("_", " ")
        out.append((st.anterior, f"{name}\nseed {st.seed} ANT"))
        out.append((st.posterior, f"{name}\nseed {st.seed} POST"))
    return out


def write_contact_sheet(studies: Sequence[PhantomStudy], out_png: Path,
                        real_scan: np.ndarray | None = None) -> Path:
    """Anterior + posterior per study (inverted grey), titled with the class; returns the path.

    The real scan, when given, fills the first column of the first row. Uses an Agg canvas
    directly (no pyplot), so it needs no display and leaves the process-wide backend alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = _panels(studies)
    if not panels and real_scan is None:
        raise ValueError("nothing to draw: no studies and no real scan")
    lead = 1 if real_scan is not None else 0
    per_row = 2 * min(STUDIES_PER_ROW, max(len(studies), 1))
    ncols = lead + per_row
    nrows = max(1, -(-len(panels) // per_row))
    fig = Figure(figsize=(1.05 * ncols, 4.3 * nrows + 0.4), dpi=160)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(nrows, ncols, wspace=0.04, hspace=0.12)
    cells: list[tuple[np.ndarray, str, int, int]] = [
        (img, title, i // per_row, lead + i % per_row) for i, (img, title) in enumerate(panels)]
    if real_scan is not None:
        cells.insert(0, (np.asarray(real_scan), "real GE scan (NM1)\nanterior", 0, 0))
    for img, title, r, c in cells:
        ax = fig.add_subplot(grid[r, c])
        lo, hi = display_window(img)
        ax.imshow(img, cmap="gray_r", vmin=lo, vmax=hi, interpolation="antialiased")
        ax.set_title(title, fontsize=6)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("SIMULATED PHANTOMS - NOT PATIENTS (grey 0 to p99.5 of each view, inverted)",
                 fontsize=8)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, bbox_inches="tight")
    return out_png
