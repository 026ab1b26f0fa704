"""CLI helpers that hand model/ its data: phantom files and a phantom-trained model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from model.baseline import trivial_baseline
from model.classes import CLASS_NAMES
from model.contact_sheet import write_contact_sheet
from model.phantom_dicom import DicomLayout, write_study
from model.phantoms import PhantomStudy, generate_dataset, generate_study
from model.trainer import LabelledImages, TrainConfig, TrainResult, export_trained, train_model

log = logging.getLogger(__name__)

REALDATA_NM1 = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "wg04-nm1" / \
    "NM1_UNC.dcm"


def phantom_images(studies: list[PhantomStudy], description: str) -> LabelledImages:
    """Two views per phantom study, the patient as the split unit."""
    images: list[np.ndarray] = []
    labels: list[int] = []
    pids: list[str] = []
    views: list[str] = []
    for st in studies:
        for view, img in (("anterior", st.anterior), ("posterior", st.posterior)):
            images.append(img)
            labels.append(CLASS_NAMES.index(st.label))
            pids.append(st.patient.patient_id)
            views.append(view)
    return LabelledImages(images, np.array(labels), pids, views, description, True)


def phantom_training_data(patients: int, seed: int, difficulty: float) -> LabelledImages:
    """Generate a phantom cohort (Table 1 class proportions)."""
    studies = generate_dataset(patients, seed=seed, difficulty=difficulty)
    desc = (f"simulated phantoms (dscint-node generator): {patients} patients, "
            f"difficulty {difficulty}, seed {seed}")
    return phantom_images(studies, desc)


def train_on_phantoms(out: Path, patients: int = 400, epochs: int = 5, seed: int = 0,
                      difficulty: float = 0.5, baseline: bool = True,
                      progress: bool = True) -> tuple[TrainResult, dict[str, float]]:
    """Train, export TorchScript to `out`, and compare with the trivial baseline."""
    data = phantom_training_data(patients, seed, difficulty)
    cfg = TrainConfig(epochs=epochs, seed=seed, progress=progress)
    result = train_model(data, cfg)
    export_trained(result, data, cfg, out)
    summary = {"dscint_image_accuracy": result.image_metrics.accuracy,
               "dscint_study_accuracy": result.study_metrics.accuracy,
               "train_images_per_second": result.images_per_second}
    if baseline:
        base = trivial_baseline(result.inputs, np.asarray(data.labels), result.train_index,
                                result.test_index, seed)
        summary["trivial_baseline_image_accuracy"] = base.accuracy
    log.info("training summary: %s", json.dumps({k: round(v, 4) for k, v in summary.items()}))
    print(json.dumps({k: round(v, 4) for k, v in summary.items()}, indent=2))
    return result, summary


def write_phantoms(out: Path, per_class: int, seed: int, difficulty: float, layout: str
                   ) -> list[Path]:
    """DICOM files per study plus contact_sheet.png (with the real GE scan where available)."""
    out.mkdir(parents=True, exist_ok=True)
    studies = [generate_study(label, seed * 1000 + i * 10 + c, difficulty)
               for c, label in enumerate(CLASS_NAMES) for i in range(per_class)]
    paths: list[Path] = []
    for st in studies:
        paths += write_study(st, out / f"{st.label}_{st.seed}", DicomLayout(layout))
    real = None
    if REALDATA_NM1.is_file():
        from pydicom import dcmread
        real = dcmread(REALDATA_NM1).pixel_array
    sheet = write_contact_sheet(studies, out / "contact_sheet.png", real_scan=real)
    print(f"wrote {len(paths)} DICOM file(s) and {sheet}")
    return paths
