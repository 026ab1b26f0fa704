"""The result image's colour map and the PDF page, drawn without matplotlib (issue 18: ~40 MiB
of the classifier process): the map still matches matplotlib's inferno, the page is a PDF a
reader parses (offsets, streams, the image's exact pixels, the text), and the classifier's
modules import no matplotlib."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from matplotlib import colormaps

from node.classify import pdf
from node.classify.result_image import COLORMAP, colour_table, colours_of
from tests.support.nodeproc import REPO

ROWS = [("Finding", "bone metastasis"), ("P(normal)", "0.100"),
        ("Training data", "simulated phantoms (a long description) " * 4),
        ("Weights sha256", "ab" * 32)]


def _page(image: np.ndarray, warning: str = "NOT FOR DIAGNOSIS - test (warning)") -> bytes:
    return pdf.render_pdf(image, ROWS, warning, True)


def _objects(doc: bytes) -> dict[int, bytes]:
    """Each object's body, found through the cross-reference table (so its offsets are
    checked: each must point at 'N 0 obj')."""
    xref = int(re.search(rb"startxref\n(\d+)\n%%EOF", doc).group(1))  # type: ignore[union-attr]
    assert doc[xref:xref + 4] == b"xref"
    count = int(doc[xref:].split(b"\n")[1].split()[1])
    entries = doc[xref:].split(b"\n")[2:2 + count]
    out = {}
    for number, entry in enumerate(entries[1:], start=1):
        offset = int(entry.split()[0])
        head = f"{number} 0 obj\n".encode()
        assert doc[offset:offset + len(head)] == head, number
        out[number] = doc[offset + len(head):doc.index(b"\nendobj", offset)]
    return out


def _stream(body: bytes) -> bytes:
    length = int(re.search(rb"/Length (\d+)", body).group(1))  # type: ignore[union-attr]
    start = body.index(b"stream\n") + len(b"stream\n")
    assert body[start + length:] == b"\nendstream"
    return zlib.decompress(body[start:start + length])


def test_colour_map_matches_matplotlibs_inferno() -> None:
    want = (colormaps[COLORMAP](np.linspace(0, 1, 256))[:, :3] * 255).round()
    assert np.abs(colour_table().astype(int) - want).max() <= 7
    assert (colours_of(np.array([-1.0, 2.0])) == colour_table()[[0, 255]]).all()


def test_the_page_parses_and_carries_the_image_exactly_and_the_text() -> None:
    image = np.random.default_rng(5).integers(0, 256, (1024, 1304, 3), dtype=np.uint8)
    doc = _page(image)
    objects = _objects(doc)
    (img,) = [b for b in objects.values() if b"/Subtype /Image" in b]
    assert b"/Width 1304 /Height 1024" in img
    rows = np.frombuffer(_stream(img), np.uint8).reshape(1024, 1 + 1304 * 3)
    assert (rows[:, 0] == 2).all()  # PNG "up" filter on every row
    decoded = np.cumsum(rows[:, 1:], axis=0, dtype=np.uint8)  # undo "up": sums mod 256
    assert (decoded.reshape(image.shape) == image).all()
    content = _stream(objects[4]).decode("latin-1")
    assert "(Finding) Tj" in content and "(bone metastasis) Tj" in content
    assert "(NOT FOR DIAGNOSIS - test \\(warning\\)) Tj" in content  # parentheses escaped
    assert "/Im1 Do" in content
    assert _page(image) == doc  # repeatable: no date, no random IDs


def test_text_wraps_inside_the_margin_and_never_breaks_the_syntax() -> None:
    width = 200 / 9 * 1000  # 200 points at 9 points
    lines = pdf.wrap("simulated phantoms " * 20 + "x" * 80, width, pdf.REGULAR)
    assert len(lines) > 3 and all(pdf.text_width(ln, pdf.REGULAR) <= width for ln in lines)
    assert pdf.pdf_string("a(b)\\c\u00e9\u4e2d\n") == "a\\(b\\)\\\\c\u00e9? "


@pytest.mark.skipif(shutil.which("pdftotext") is None, reason="poppler-utils not installed")
def test_a_pdf_reader_extracts_the_text(tmp_path: Path) -> None:
    path = tmp_path / "page.pdf"
    path.write_bytes(_page(np.zeros((1024, 1304, 3), np.uint8)))
    done = subprocess.run(["pdftotext", str(path), "-"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and not done.stderr, done.stderr
    assert "Dscint AI result report" in done.stdout and "ab" * 32 in done.stdout


def test_the_classifier_modules_import_no_matplotlib() -> None:
    code = ("import sys, node.classify.worker, node.classify.pdf, node.classify.result_image; "
            "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_a_long_value_is_cut_to_three_lines_above_the_footer() -> None:
    rows = [("Training data", "many words " * 200), *ROWS]
    content = _stream(_objects(pdf.render_pdf(np.zeros((8, 8, 3), np.uint8), rows, "w",
                                              True))[4]).decode("latin-1")
    shown = [ln for ln in content.splitlines() if "(many words" in ln]
    assert len(shown) == pdf.VALUE_LINES and shown[-1].endswith("...) Tj ET")
    baselines = [float(ln.split(" Td ")[0].split()[-1]) for ln in content.splitlines()
                 if " Td " in ln]
    footer = min(baselines)
    assert sorted(baselines).count(footer) == 1 and 0.02 * pdf.PAGE_POINTS[1] < footer
