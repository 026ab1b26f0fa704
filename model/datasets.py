"""Training data from what a user has: PNG sets in the public layouts, labelled DICOM studies
(read by node/ and handed in as arrays), and phantoms. Everything becomes LabelledImages.

Why so strict: a silently dropped row or a patient counted in two classes makes every metric
after it wrong, and the patient-level split depends on patient IDs being right. So each problem
raises DatasetError naming the file or CSV row: unknown labels, missing files, mixed image
sizes, a patient in two classes.

Layouts (field notes §6):
- IICS-UNA (Zenodo 10.5281/zenodo.13900966): `<class>/<Anterior|Posterior>/A<n>.png` and
  `P<n>.png`, 16-bit, 256 x 1024 (W x H); patient = n.
- BS-80K style: 8-bit JPEG/PNG whole-body views (`<id>_ANT.jpg`, `<id>_POST.jpg`, ...) with
  labels 0 (normal) / 1 (abnormal) in text files: a list file of `<image> <label>` lines, or a
  `<image stem>.txt` beside each image. The user maps 0/1 to this node's classes.
"""

from __future__ import annotations

import csv
import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from model.classes import CLASS_NAMES
from model.phantoms import generate_dataset
from model.trainer import LabelledImages

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
_VIEW_FOLDERS = {"anterior": "anterior", "ant": "anterior", "posterior": "posterior",
                 "post": "posterior"}
_VIEW_TOKENS = {"ANT": "anterior", "ANTERIOR": "anterior", "A": "anterior",
                "POST": "posterior", "POSTERIOR": "posterior", "P": "posterior"}
_IICS_NAME = re.compile(r"^[AaPp]?(\d+)$")
KEY_COLUMNS = ("study_uid", "studyinstanceuid", "path", "file")
LABEL_COLUMNS = ("label", "class")


class DatasetError(ValueError):
    """The data cannot be used as given; the message names the file or row."""


@dataclass(frozen=True)
class ViewRecord:
    """One labelled view on its way into LabelledImages; `source` names it in errors."""

    image: np.ndarray
    label: str
    patient_id: str
    view: str
    source: str


# --- labels ------------------------------------------------------------------------------


def normalise_class(name: str) -> str:
    """'Bone metastasis' / 'bone-metastasis' -> 'bone_metastasis'."""
    return re.sub(r"[\s\-]+", "_", name.strip()).lower()


def class_name(label: str, where: str, mapping: Mapping[str, str] | None = None) -> str:
    """A valid class name from a raw label (through `mapping` if given); DatasetError if not."""
    raw = label.strip()
    if mapping is not None and normalise_class(raw) not in CLASS_NAMES:
        if raw not in mapping and normalise_class(raw) not in mapping:
            raise DatasetError(f"{where}: label {raw!r} is not in the label mapping "
                               f"({', '.join(f'{k}={v}' for k, v in mapping.items())})")
        raw = mapping.get(raw, mapping.get(normalise_class(raw), raw))
    name = normalise_class(raw)
    if name not in CLASS_NAMES:
        raise DatasetError(f"{where}: unknown class {label.strip()!r}; expected one of "
                           f"{', '.join(CLASS_NAMES)}")
    return name


def parse_mapping(text: str) -> dict[str, str]:
    """'0=normal,1=bone_metastasis' -> {'0': 'normal', '1': 'bone_metastasis'}, validated."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise DatasetError(f"mapping entry {part!r} is not KEY=CLASS")
        out[key.strip()] = class_name(value, f"mapping entry {part!r}")
    if not out:
        raise DatasetError(f"empty mapping {text!r}")
    return out


@dataclass(frozen=True)
class LabelRow:
    """One row of a label CSV: a study UID or a file path, its class, optionally a patient."""

    row: int  # 1-based line number in the file, header = 1
    key_kind: str  # "study_uid" or "path"
    key: str
    label: str
    patient_id: str | None
    where: str  # "labels.csv row 3", for errors


def read_label_csv(path: Path) -> list[LabelRow]:
    """Rows of `study_uid|path, label[, patient_id]`; every problem names its row."""
    if not path.is_file():
        raise DatasetError(f"label file not found: {path}")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = {normalise_class(h): h for h in reader.fieldnames or []}
        key_col = next((header[c] for c in KEY_COLUMNS if c in header), None)
        label_col = next((header[c] for c in LABEL_COLUMNS if c in header), None)
        if key_col is None or label_col is None:
            raise DatasetError(f"{path}: header must name a key column ({', '.join(KEY_COLUMNS)}) "
                               f"and a label column ({', '.join(LABEL_COLUMNS)}); got "
                               f"{reader.fieldnames}")
        kind = "path" if normalise_class(key_col) in ("path", "file") else "study_uid"
        patient_col = header.get("patient_id") or header.get("patient")
        rows = [_label_row(path, i, rec, key_col, label_col, patient_col, kind)
                for i, rec in enumerate(reader, start=2)]
    _check_duplicate_keys(rows)
    if not rows:
        raise DatasetError(f"{path}: no labelled rows")
    return rows


def _label_row(path: Path, line: int, rec: Mapping[str, str | None], key_col: str,
               label_col: str, patient_col: str | None, kind: str) -> LabelRow:
    where = f"{path.name} row {line}"
    key = (rec.get(key_col) or "").strip()
    if not key:
        raise DatasetError(f"{where}: empty {key_col}")
    label = class_name(rec.get(label_col) or "", where)
    patient = (rec.get(patient_col) or "").strip() if patient_col else ""
    return LabelRow(line, kind, key, label, patient or None, where)


def _check_duplicate_keys(rows: Sequence[LabelRow]) -> None:
    seen: dict[str, LabelRow] = {}
    for r in rows:
        first = seen.setdefault(r.key, r)
        if first is not r and first.label != r.label:
            raise DatasetError(f"{r.where}: {r.key} is labelled {r.label} but {first.where} "
                               f"says {first.label}")


# --- assembling --------------------------------------------------------------------------


def assemble(records: Iterable[ViewRecord], description: str,
             trained_on_phantoms: bool = False) -> LabelledImages:
    """Checked LabelledImages: one image size, known labels, one class per patient."""
    recs = list(records)
    if not recs:
        raise DatasetError(f"no images found ({description})")
    first = recs[0]
    patient_class: dict[str, ViewRecord] = {}
    for r in recs:
        if r.image.ndim != 2:
            raise DatasetError(f"{r.source}: expected a 2-D grey image, got shape "
                               f"{r.image.shape}")
        if r.image.shape != first.image.shape:
            raise DatasetError(f"{r.source}: image size {_wxh(r.image)} differs from "
                               f"{_wxh(first.image)} of {first.source} (mixed image sizes)")
        class_name(r.label, r.source)
        other = patient_class.setdefault(r.patient_id, r)
        if other.label != r.label:
            raise DatasetError(f"patient {r.patient_id} is in two classes: {other.label} "
                               f"({other.source}) and {r.label} ({r.source})")
    return LabelledImages(
        images=[r.image for r in recs],
        labels=np.array([CLASS_NAMES.index(r.label) for r in recs], dtype=np.int64),
        patient_ids=[r.patient_id for r in recs], views=[r.view for r in recs],
        description=description, trained_on_phantoms=trained_on_phantoms)


def _wxh(img: np.ndarray) -> str:
    return f"{img.shape[1]} x {img.shape[0]} (W x H)"


def concat(parts: Sequence[LabelledImages]) -> LabelledImages:
    """Several sources as one data set (patients must already be distinct across sources)."""
    if not parts:
        raise DatasetError("no data sources given")
    if len(parts) == 1:
        return parts[0]
    recs = [ViewRecord(img, CLASS_NAMES[int(lab)], pid, view, f"{p.description} image {i}")
            for p in parts
            for i, (img, lab, pid, view) in enumerate(zip(p.images, p.labels, p.patient_ids,
                                                          p.views, strict=True))]
    return assemble(recs, " + ".join(p.description for p in parts),
                    all(p.trained_on_phantoms for p in parts))


def describe(data: LabelledImages) -> dict[str, Any]:
    """What the report and the registry say about a data set (Table 1/2 style counts)."""
    labels = np.asarray(data.labels)
    patients: dict[str, int] = {}
    for pid, lab in zip(data.patient_ids, labels, strict=True):
        patients[pid] = int(lab)
    shape = data.images[0].shape if len(data.images) else (0, 0)
    return {
        "description": data.description,
        "trained_on_phantoms": data.trained_on_phantoms,
        "images": len(labels), "patients": len(patients),
        "image_size_w_x_h": [int(shape[1]), int(shape[0])],
        "images_per_class": {c: int((labels == i).sum()) for i, c in enumerate(CLASS_NAMES)},
        "patients_per_class": {c: sum(1 for v in patients.values() if v == i)
                               for i, c in enumerate(CLASS_NAMES)},
        "views": dict(Counter(data.views)),
    }


# --- image files -------------------------------------------------------------------------


def read_grey_image(path: Path) -> np.ndarray:
    """A PNG/JPEG as a 2-D array of its stored values (16-bit stays 16-bit; colour -> grey)."""
    try:
        with Image.open(path) as opened:
            img: Image.Image = opened
            if img.mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr"):
                img = img.convert("L")
            arr = np.asarray(img)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot read image: {exc}") from exc
    if arr.ndim != 2:
        raise DatasetError(f"{path}: expected a grey image, got shape {arr.shape}")
    return arr.astype(np.float32)


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                  and p.is_file())


def load_png_folder(root: Path, class_map: Mapping[str, str] | None = None,
                    patient_prefix: str = "") -> LabelledImages:
    """IICS-UNA layout `<class>/<Anterior|Posterior>/A<n>.png`; patient = n.

    `class_map` maps folder names to classes (e.g. {'yes': 'bone_metastasis', 'no': 'normal'});
    without it a class folder must be named after a class.
    """
    if not root.is_dir():
        raise DatasetError(f"PNG data folder not found: {root}")
    records: list[ViewRecord] = []
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir())
    if not class_dirs:
        raise DatasetError(f"{root}: no class folders (expected <class>/<Anterior|Posterior>/)")
    for cdir in class_dirs:
        label = class_name(cdir.name, f"class folder {cdir}", class_map)
        for vdir in sorted(d for d in cdir.iterdir() if d.is_dir()):
            view = _VIEW_FOLDERS.get(vdir.name.lower())
            if view is None:
                raise DatasetError(f"{vdir}: view folder must be Anterior or Posterior")
            for f in _images_under(vdir):
                m = _IICS_NAME.match(f.stem)
                pid = m.group(1) if m else f.stem
                records.append(ViewRecord(read_grey_image(f), label, f"{patient_prefix}{pid}",
                                          view, str(f)))
    desc = f"PNG folder {root} (IICS-UNA layout)"
    return assemble(records, desc)


def _view_and_patient(stem: str) -> tuple[str, str]:
    """'000123_ANT' -> ('anterior', '000123'); no view token -> ('unknown', stem)."""
    tokens = re.split(r"[_\-\s.]+", stem)
    for i in range(len(tokens) - 1, -1, -1):
        view = _VIEW_TOKENS.get(tokens[i].upper())
        if view is not None and len(tokens) > 1:
            rest = "_".join(tokens[:i] + tokens[i + 1:])
            return view, rest
    return "unknown", stem


def _bs80k_labels(root: Path, images: Sequence[Path], label_file: Path | None
                  ) -> dict[Path, tuple[str, str]]:
    """Raw label and where it came from, per image: a list file, else sidecar .txt files."""
    out: dict[Path, tuple[str, str]] = {}
    if label_file is not None:
        if not label_file.is_file():
            raise DatasetError(f"label file not found: {label_file}")
        by_name = {p.name: p for p in images} | {p.stem: p for p in images} | \
            {str(p.relative_to(root)): p for p in images}
        for n, line in enumerate(label_file.read_text(encoding="utf-8").splitlines(), 1):
            parts = line.split("#", 1)[0].replace(",", " ").split()
            if not parts:
                continue
            where = f"{label_file.name} line {n}"
            if len(parts) < 2:
                raise DatasetError(f"{where}: expected '<image> <label>'")
            img = by_name.get(parts[0])
            if img is None:
                raise DatasetError(f"{where}: image {parts[0]!r} not found under {root}")
            out[img] = (parts[1], where)
        return out
    for img in images:
        side = img.with_suffix(".txt")
        if not side.is_file():
            raise DatasetError(f"{img}: no label file {side.name} beside it (or pass a list "
                               "file of '<image> <label>' lines)")
        tokens = side.read_text(encoding="utf-8").split()
        if not tokens:
            raise DatasetError(f"{side}: empty label file")
        out[img] = (tokens[0], str(side))
    return out


def load_bs80k(root: Path, label_map: Mapping[str, str], label_file: Path | None = None,
               patient_prefix: str = "") -> LabelledImages:
    """BS-80K style: 8-bit views + 0/1 labels in text files, mapped to classes by the user."""
    if not root.is_dir():
        raise DatasetError(f"BS-80K data folder not found: {root}")
    images = _images_under(root)
    labels = _bs80k_labels(root, images, label_file)
    records = []
    for img in images:
        if img not in labels:
            log.warning("%s has no label in %s: left out", img, label_file)
            continue
        raw, where = labels[img]
        view, pid = _view_and_patient(img.stem)
        records.append(ViewRecord(read_grey_image(img), class_name(raw, where, label_map),
                                  f"{patient_prefix}{pid}", view, str(img)))
    mapping = ", ".join(f"{k}={v}" for k, v in label_map.items())
    return assemble(records, f"BS-80K-style folder {root} (labels mapped {mapping})")


# --- phantoms ----------------------------------------------------------------------------


def load_phantoms(n_patients: int, seed: int = 0, difficulty: float = 0.5) -> LabelledImages:
    """A phantom cohort in Table 1 proportions, both views per patient."""
    studies = generate_dataset(n_patients, seed=seed, difficulty=difficulty)
    records = [ViewRecord(img, st.label, st.patient.patient_id, view, f"phantom seed {st.seed}")
               for st in studies
               for view, img in (("anterior", st.anterior), ("posterior", st.posterior))]
    desc = (f"simulated phantoms (dscint-node generator): {n_patients} patients, "
            f"difficulty {difficulty}, seed {seed}")
    return assemble(records, desc, trained_on_phantoms=True)
