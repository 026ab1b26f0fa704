"""What the result image and the PDF report cost per study: the worker's time for one study
(read, classify, build and store every object, queue the exports) with [results] image and pdf
off, image only, and both, and the size of each object.

`python -m bench.result_objects [--model PATH] [--repeats N] [--png FILE]`: a real worker on
a real SQLite queue and file store, one phantom study (multi-frame NM, both views) classified
`repeats` times per setting (a fresh job each time, the same model: the objects' UIDs repeat,
so each run replaces the last one's files). Without --model an untrained full-size Dscint is
exported (same network, same cost as a trained one). `--png` also writes the result image
scaled to 512 wide as PNG (the README's docs/result-image.png).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread
from rich.console import Console
from rich.table import Table
from sqlalchemy import update

from model.classifier import Classifier
from model.phantom_dicom import DicomLayout, study_datasets
from model.phantoms import generate_study
from node.classify.sr import DeviceInfo
from node.classify.worker import WorkerContext, run_once
from node.dicom.objects import object_kind
from storage.db import CompletionReason, Database, Study, StudyState
from storage.filestore import FileStore
from storage.intake import InstanceRecord, mark_complete, record_instance
from storage.jobs import requeue_studies
from storage.objects import result_objects

DEVICE = DeviceInfo("DSCINT", "bench", "1.2.826.0.1.3680043.8.498.1", "bench")
SETTINGS = (("SR only", False, False), ("SR + image", True, False),
            ("SR + image + PDF", True, True))
PNG_WIDTH = 512


def _study(db: Database, files: FileStore, label: str, seed: int) -> str:
    """One phantom study recorded as the receiver records it, complete."""
    (ds,) = study_datasets(generate_study(label, seed=seed), DicomLayout.MULTIFRAME)
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    study, series, sop = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), \
        str(ds.SOPInstanceUID)
    path = files.write_instance(study, series, sop, buf.getvalue())
    record_instance(db, InstanceRecord(
        sop_uid=sop, study_uid=study, series_uid=series, sop_class_uid=str(ds.SOPClassUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), path=str(path),
        views=("anterior", "posterior"), n_frames=2, size_bytes=len(buf.getvalue()),
        calling_ae="BENCH", patient_key=None))
    mark_complete(db, study, CompletionReason.BOTH_VIEWS)
    return study


def _untrained(workdir: Path) -> Path:
    from model.dscint import Dscint, DscintProbabilities
    from model.export import ModelMetadata, export_torchscript
    meta = ModelMetadata(version="bench-untrained", weights_sha256="",
                         training_data="untrained (random weights)", trained_on_phantoms=True)
    return export_torchscript(DscintProbabilities(Dscint()), workdir / "dscint.pt", meta)


def measure(model: Path, workdir: Path, repeats: int
            ) -> tuple[list[tuple[str, float, float]], dict[str, int], Path | None]:
    """(setting, median s, min s) per setting, object sizes, and the last result image. The
    settings take turns within each repeat, so a busy machine slows them alike."""
    clf = Classifier(model)
    runs: list[tuple[str, Database, str, WorkerContext]] = []
    for name, with_image, with_pdf in SETTINGS:
        db = Database(f"sqlite:///{workdir / (name.replace(' ', '') + '.db')}")
        db.create_all()
        files = FileStore(workdir / name.replace(" ", ""))
        runs.append((name, db, _study(db, files, "bone_metastasis", seed=7), WorkerContext(
            db=db, files=files, classifier=lambda: clf, device=DEVICE,
            destination="PACS@127.0.0.1:104", on_result=lambda: None,
            result_image=with_image, result_pdf=with_pdf)))
    times: dict[str, list[float]] = {name: [] for name, *_ in runs}
    for i in range(repeats + 1):  # the first round warms the model up: not counted
        for name, db, study, ctx in runs:
            if i:
                _fail_for_requeue(db, study)
            t0 = time.perf_counter()
            assert run_once(ctx, "bench:w0")
            if i:
                times[name].append(time.perf_counter() - t0)
    sizes: dict[str, int] = {}
    image: Path | None = None
    for _name, db, study, _ctx in runs:
        for o in result_objects(db)[study]:
            kind = object_kind(o.path, o.is_sr)
            sizes[kind] = Path(o.path).stat().st_size
            if kind == "image":
                image = Path(o.path)
        db.dispose()
    rows = [(n, statistics.median(t), min(t)) for n, t in times.items()]
    return rows, sizes, image


def _fail_for_requeue(db: Database, study: str) -> None:
    """The study back in the queue (as `requeue` does for a failed one)."""
    with db.session() as s, s.begin():
        s.execute(update(Study).where(Study.study_uid == study)
                  .values(state=StudyState.FAILED.value))
    requeue_studies(db, study)


def write_png(image: Path, out: Path, width: int = PNG_WIDTH) -> int:
    """The stored result image scaled to `width` as an optimised 256-colour PNG (grey views
    and one colour map fit a palette); its size in bytes."""
    ds = dcmread(image)
    rgb = np.frombuffer(ds.PixelData, np.uint8).reshape(int(ds.Rows), int(ds.Columns), 3)
    img = Image.fromarray(rgb, "RGB")
    img.thumbnail((width, width * 4), Image.Resampling.LANCZOS)
    img.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        out, format="PNG", optimize=True)
    return out.stat().st_size


def main() -> None:
    """Measure, print the table and the sizes."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dscint-bench-objects-") as tmp:
        workdir = Path(tmp)
        model = args.model or _untrained(workdir)
        rows, sizes, image = measure(model, workdir, max(args.repeats, 1))
        console = Console(width=100)
        table = Table(title=f"worker time per study, {args.repeats} run(s) each (median, min)")
        for col in ("setting", "median s", "min s", "vs SR only"):
            table.add_column(col)
        base = rows[0][1]
        for name, med, low in rows:
            table.add_row(name, f"{med:.2f}", f"{low:.2f}", f"+{med - base:.2f} s")
        console.print(table)
        console.print("object sizes: " + ", ".join(f"{k} {v / 1024:.0f} KiB"
                                                   for k, v in sizes.items()))
        if args.png is not None and image is not None:
            console.print(f"{args.png}: {write_png(image, args.png) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
