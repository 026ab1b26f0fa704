"""`make demo`: the whole loop on embedded defaults in a temporary folder.

Phantom studies -> (train a small model if none is configured) -> node + PACS stand-in on
127.0.0.1 -> studies sent as a camera would -> wait for every SR -> a result table.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from rich.console import Console
from rich.table import Table

from model.calibration import INDETERMINATE
from model.classes import CLASS_NAMES
from model.phantom_dicom import DicomLayout, write_study
from model.phantoms import generate_study
from node.config import Config, load_config, with_overrides
from node.demo.modality import send_paths
from node.demo.pacs_standin import PacsStandIn
from node.dicom.codes import ENCAPSULATED_PDF_STORAGE, SC_IMAGE_STORAGE, SR_STORAGE_CLASSES
from node.export.scu import Destination
from node.ops.phantoms import train_on_phantoms
from node.service.node import Node
from node.service.startup import prepare_classifier_process

log = logging.getLogger(__name__)

DEMO_TRAIN_PATIENTS = 700
DEMO_TRAIN_EPOCHS = 8
ABBREV = {"normal": "N", "bone_metastasis": "M", "arthritis": "A", "thyroid_carcinoma": "T"}
DISCLAIMER = ("The model was trained on SIMULATED PHANTOMS, not on patients: its output is a "
              "demonstration, not a diagnosis.")


@dataclass
class SentStudy:
    """One study the demo sent and what came back."""

    study_uid: str
    label: str
    layout: str
    last_ack: float
    predicted: str = "-"
    probabilities: str = "-"
    latency: float | None = None


def _model(cfg: Config | None, workdir: Path, console: Console) -> Path:
    if cfg is not None and cfg.model_path.is_file():
        console.print(f"using configured model {cfg.model_path}")
        return cfg.model_path
    path = workdir / "models" / "dscint.pt"
    console.print(f"no model configured: training a small Dscint on phantoms "
                  f"({DEMO_TRAIN_PATIENTS} patients, {DEMO_TRAIN_EPOCHS} epochs)")
    train_on_phantoms(path, patients=DEMO_TRAIN_PATIENTS, epochs=DEMO_TRAIN_EPOCHS, seed=1,
                      baseline=False)
    return path


def _send_studies(node: Node, workdir: Path, per_class: int) -> list[SentStudy]:
    layouts = list(DicomLayout)
    sent: list[SentStudy] = []
    dest = Destination(node.cfg.node.ae_title, "127.0.0.1", node.port)
    for c, label in enumerate(CLASS_NAMES):
        for i in range(per_class):
            layout = layouts[(c + i) % len(layouts)]
            study = generate_study(label, seed=900_000 + 100 * c + i)
            paths = write_study(study, workdir / "outbox" / f"{label}-{i}", layout)
            statuses = send_paths(paths, dest, calling_ae="DEMO_CAMERA")
            if any(s != 0 for s in statuses):
                raise RuntimeError(f"node refused a demo instance: statuses {statuses}")
            uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
            sent.append(SentStudy(uid, label, layout.value, time.time()))
    return sent


def _collect(sent: list[SentStudy], pacs: PacsStandIn) -> None:
    got = pacs.by_study()
    for s in sent:
        for r in got.get(s.study_uid, []):
            s.latency = r.acknowledged_at - s.last_ack
            s.predicted, s.probabilities = _read_sr(r.dataset)


def _read_sr(ds: object) -> tuple[str, str]:
    """Predicted class and probabilities as the SR states them."""
    from node.classify.sr import read_result
    pred, probs = read_result(ds)  # type: ignore[arg-type]
    return pred, " ".join(f"{ABBREV[k]} {v:.2f}" for k, v in probs.items())


def _table(sent: list[SentStudy]) -> Table:
    t = Table(title="dscint-node demo — model trained on simulated phantoms, not for diagnosis")
    for col in ("study", "layout", "true class", "predicted", "probabilities N/M/A/T",
                "s to SR"):
        t.add_column(col, no_wrap=True)
    for s in sent:
        ok = "" if s.predicted in (s.label, INDETERMINATE) else " ✗"
        t.add_row("…" + s.study_uid[-12:], s.layout, s.label, s.predicted + ok, s.probabilities,
                  f"{s.latency:.2f}" if s.latency is not None else "no SR")
    return t


def _objects_line(pacs: PacsStandIn) -> str:
    """What PACS holds: every study's SR, and beside it what any viewer can show."""
    kinds = (("SR", SR_STORAGE_CLASSES), ("result images", (SC_IMAGE_STORAGE,)),
             ("PDF reports", (ENCAPSULATED_PDF_STORAGE,)))
    counts = ", ".join(f"{len(pacs.objects(classes))} {name}" for name, classes in kinds)
    return f"objects at the PACS stand-in: {counts}"


def run_demo(cfg: Config | None = None, n_per_class: int = 2, workdir: Path | None = None,
             log_level: str = "WARNING") -> int:
    """Run the loop; exit code 0 when every study got its SR. `log_level` is also the
    receiver process's (it sets up its own logging from the node's configuration)."""
    console = Console(width=120)
    workdir = workdir or Path(tempfile.mkdtemp(prefix="dscint-demo-"))
    console.print(f"[bold]dscint-node demo[/bold] in {workdir}\n{DISCLAIMER}")
    model_path = _model(cfg, workdir, console)
    pacs = PacsStandIn(ae_title="DEMO_PACS")
    pacs.start()
    node_cfg = with_overrides(
        load_config(None), node={"port": 0, "ae_title": "DSCINT"},
        pacs={"ae_title": "DEMO_PACS", "host": "127.0.0.1", "port": pacs.port},
        storage={"root": str(workdir / "node")}, model={"path": str(model_path)},
        completion={"quiet_seconds": 10.0, "sweep_seconds": 1.0},
        export={"backoff_base_seconds": 1.0, "backoff_cap_seconds": 5.0},
        logging={"level": log_level})
    prepare_classifier_process(node_cfg)
    try:
        with Node(node_cfg) as node:
            console.print(f"node DSCINT on 127.0.0.1:{node.port}, PACS stand-in DEMO_PACS on "
                          f"127.0.0.1:{pacs.port}; sending {4 * n_per_class} phantom studies")
            sent = _send_studies(node, workdir, n_per_class)
            pacs.wait_for(len(sent), timeout=120)
            _collect(sent, pacs)
            per_study = 1 + node_cfg.results.image + node_cfg.results.pdf
            pacs.wait_for(per_study * len(sent), timeout=60, sop_classes=None)
    finally:
        pacs.stop()
    console.print(_table(sent))
    console.print(_objects_line(pacs))
    latencies = [s.latency for s in sent if s.latency is not None]
    correct = sum(s.predicted == s.label for s in sent)
    unsure = sum(s.predicted == INDETERMINATE for s in sent)
    if latencies:
        console.print(f"median seconds from last instance to SR acknowledged: "
                      f"{statistics.median(latencies):.2f}; correct {correct}, wrong "
                      f"{len(sent) - correct - unsure}, indeterminate {unsure} (of {len(sent)})")
    console.print(DISCLAIMER)
    return 0 if len(latencies) == len(sent) else 1
