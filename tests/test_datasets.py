"""Every data-set kind the retrain command reads, written here in the public layouts, and the
errors that name the file or row (unknown labels, missing files, mixed sizes, a patient in two
classes)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread

from model.classes import CLASS_NAMES
from model.datasets import (
    DatasetError,
    concat,
    describe,
    load_bs80k,
    load_phantoms,
    load_png_folder,
    parse_mapping,
    read_label_csv,
)
from model.phantom_dicom import DicomLayout, write_study
from model.phantoms import generate_study
from node.ops.retrain import DataSources, database_data, dicom_folder_data, load_data
from storage.db import Database
from storage.intake import InstanceRecord, record_instance

W, H = 64, 256  # loaders do not care about the network's input size; small files are quick


def _png16(path: Path, value: int, size: tuple[int, int] = (W, H)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0]), value, dtype=np.uint16)
    arr[0, 0] = 60000  # beyond 8 bits: must survive reading
    Image.fromarray(arr).save(path)


def _iics(root: Path, layout: dict[str, list[int]]) -> None:
    """<class>/<Anterior|Posterior>/A<n>.png, P<n>.png."""
    for folder, patients in layout.items():
        for n in patients:
            _png16(root / folder / "Anterior" / f"A{n}.png", 100 + n)
            _png16(root / folder / "Posterior" / f"P{n}.png", 200 + n)


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


# --- PNG, IICS-UNA layout ----------------------------------------------------------------


def test_png_folder_layout_views_patients_and_16_bit(tmp_path: Path) -> None:
    _iics(tmp_path, {"normal": [1, 2], "bone_metastasis": [3]})
    data = load_png_folder(tmp_path)
    assert len(data.images) == 6
    assert sorted(set(data.patient_ids)) == ["1", "2", "3"]
    assert sorted(data.views) == ["anterior"] * 3 + ["posterior"] * 3
    by_pid = {(p, v): (img, lab) for img, lab, p, v in
              zip(data.images, data.labels, data.patient_ids, data.views, strict=True)}
    img, lab = by_pid[("3", "posterior")]
    assert CLASS_NAMES[lab] == "bone_metastasis" and img.max() == 60000 and img[5, 5] == 203
    d = describe(data)
    assert d["patients_per_class"]["normal"] == 2 and d["image_size_w_x_h"] == [W, H]


def test_png_folder_class_map_for_yes_no_folders(tmp_path: Path) -> None:
    _iics(tmp_path, {"yes": [1], "no": [2]})
    with pytest.raises(DatasetError, match=r"class folder .*yes.*not in the label mapping"):
        load_png_folder(tmp_path, {"no": "normal"})
    data = load_png_folder(tmp_path, parse_mapping("yes=bone_metastasis,no=normal"))
    assert {CLASS_NAMES[i] for i in data.labels} == {"bone_metastasis", "normal"}


def test_png_folder_errors_name_the_file(tmp_path: Path) -> None:
    _iics(tmp_path / "unknown", {"gout": [1]})
    with pytest.raises(DatasetError, match=r"gout.*unknown class 'gout'"):
        load_png_folder(tmp_path / "unknown")
    _iics(tmp_path / "two", {"normal": [7], "arthritis": [7]})
    with pytest.raises(DatasetError, match=r"patient 7 is in two classes.*A7\.png"):
        load_png_folder(tmp_path / "two")
    _iics(tmp_path / "mixed", {"normal": [1, 2]})
    _png16(tmp_path / "mixed" / "normal" / "Anterior" / "A2.png", 5, size=(W, H + 8))
    with pytest.raises(DatasetError, match=r"A2\.png: image size 64 x 264 .*mixed image sizes"):
        load_png_folder(tmp_path / "mixed")
    (tmp_path / "view" / "normal" / "Lateral").mkdir(parents=True)
    with pytest.raises(DatasetError, match="Lateral: view folder"):
        load_png_folder(tmp_path / "view")
    with pytest.raises(DatasetError, match="not found"):
        load_png_folder(tmp_path / "absent")


# --- BS-80K style ------------------------------------------------------------------------


def _jpeg(path: Path, value: int, rgb: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((H, W), value, dtype=np.uint8)
    img = Image.fromarray(arr).convert("RGB") if rgb else Image.fromarray(arr)
    img.save(path, quality=95)


def test_bs80k_sidecar_labels_mapped_to_classes(tmp_path: Path) -> None:
    for pid, label in (("0001", "0"), ("0002", "1")):
        for view in ("ANT", "POST"):
            _jpeg(tmp_path / f"{pid}_{view}.jpg", 40 if label == "0" else 200, rgb=view == "POST")
            (tmp_path / f"{pid}_{view}.txt").write_text(f"{label}\n")
    data = load_bs80k(tmp_path, parse_mapping("0=normal,1=bone_metastasis"),
                      patient_prefix="bs:")
    assert sorted(set(data.patient_ids)) == ["bs:0001", "bs:0002"]
    assert sorted(data.views) == ["anterior", "anterior", "posterior", "posterior"]
    for img, lab in zip(data.images, data.labels, strict=True):
        assert img.ndim == 2 and abs(float(img.mean()) - (40 if lab == 0 else 200)) < 3
    assert {CLASS_NAMES[i] for i in data.labels} == {"normal", "bone_metastasis"}


def test_bs80k_list_file_and_its_errors(tmp_path: Path) -> None:
    root = tmp_path / "img"
    for pid in ("a", "b"):
        for view in ("ANT", "POST"):
            _jpeg(root / f"{pid}_{view}.jpg", 100)
    good = tmp_path / "labels.txt"
    good.write_text("# image label\na_ANT.jpg 0\na_POST.jpg 0\nb_ANT.jpg 1\nb_POST.jpg 1\n")
    data = load_bs80k(root, {"0": "normal", "1": "arthritis"}, good)
    assert sorted(CLASS_NAMES[i] for i in data.labels) == ["arthritis"] * 2 + ["normal"] * 2
    bad = tmp_path / "bad.txt"
    bad.write_text("a_ANT.jpg 0\na_POST.jpg 2\n")
    with pytest.raises(DatasetError, match=r"bad\.txt line 2: label '2' is not in the label map"):
        load_bs80k(root, {"0": "normal", "1": "arthritis"}, bad)
    missing = tmp_path / "missing.txt"
    missing.write_text("zzz_ANT.jpg 0\n")
    with pytest.raises(DatasetError, match=r"missing\.txt line 1: image 'zzz_ANT.jpg' not found"):
        load_bs80k(root, {"0": "normal"}, missing)
    with pytest.raises(DatasetError, match=r"a_ANT\.jpg: no label file a_ANT\.txt"):
        load_bs80k(root, {"0": "normal"})
    split = tmp_path / "split.txt"
    split.write_text("a_ANT.jpg 0\na_POST.jpg 1\n")
    with pytest.raises(DatasetError, match="patient a is in two classes"):
        load_bs80k(root, {"0": "normal", "1": "arthritis"}, split)


def test_mapping_and_csv_errors_name_the_row(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown class 'gout'"):
        parse_mapping("1=gout")
    with pytest.raises(DatasetError, match="not KEY=CLASS"):
        parse_mapping("1")
    f = _write_csv(tmp_path / "l.csv", ["study_uid", "label"],
                   [["1.2.3", "normal"], ["1.2.4", "Bone metastasis"], ["1.2.5", "gout"]])
    with pytest.raises(DatasetError, match=r"l\.csv row 4: unknown class 'gout'"):
        read_label_csv(f)
    f = _write_csv(tmp_path / "d.csv", ["study_uid", "label"],
                   [["1.2.3", "normal"], ["1.2.3", "arthritis"]])
    with pytest.raises(DatasetError, match=r"d\.csv row 3: 1\.2\.3 is labelled arthritis"):
        read_label_csv(f)
    f = _write_csv(tmp_path / "h.csv", ["uid", "diagnosis"], [["1.2.3", "normal"]])
    with pytest.raises(DatasetError, match="header must name a key column"):
        read_label_csv(f)
    rows = read_label_csv(_write_csv(tmp_path / "ok.csv", ["StudyInstanceUID", "Class",
                                                           "patient_id"],
                                     [["1.2.3", "Thyroid carcinoma", "p1"]]))
    assert rows[0].label == "thyroid_carcinoma" and rows[0].patient_id == "p1"


# --- DICOM folder and the node's database ------------------------------------------------


def _studies(tmp_path: Path) -> list[tuple[str, str, list[Path]]]:
    """(study UID, label, files) for four phantom studies in two layouts."""
    out = []
    for i, label in enumerate(CLASS_NAMES):
        st = generate_study(label, seed=900 + i)
        layout = DicomLayout.MULTIFRAME if i % 2 else DicomLayout.PER_VIEW
        paths = write_study(st, tmp_path / "dicom" / f"s{i}", layout)
        out.append((str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID), label,
                    paths))
    return out


def test_dicom_folder_by_study_uid_and_by_path(tmp_path: Path) -> None:
    studies = _studies(tmp_path)
    (tmp_path / "dicom" / "notes.txt").write_text("not DICOM")
    by_uid = _write_csv(tmp_path / "uids.csv", ["study_uid", "label"],
                        [[uid, label] for uid, label, _ in studies])
    data = dicom_folder_data(tmp_path / "dicom", by_uid)
    assert len(data.images) == 8 and data.images[0].shape == (1024, 256)
    assert len(set(data.patient_ids)) == 4 and all(p.startswith("pt-") for p in data.patient_ids)
    assert sorted(data.views) == ["anterior"] * 4 + ["posterior"] * 4
    assert sorted(CLASS_NAMES[i] for i in data.labels) == sorted(CLASS_NAMES * 2)
    by_path = _write_csv(tmp_path / "paths.csv", ["path", "label"],
                         [[str(p.relative_to(tmp_path / "dicom")), label]
                          for _, label, paths in studies for p in paths])
    assert len(dicom_folder_data(tmp_path / "dicom", by_path).images) == 8
    unknown = _write_csv(tmp_path / "u.csv", ["study_uid", "label"], [["1.2.999", "normal"]])
    with pytest.raises(DatasetError, match=r"u\.csv row 2: study 1\.2\.999 not found"):
        dicom_folder_data(tmp_path / "dicom", unknown)
    gone = _write_csv(tmp_path / "g.csv", ["path", "label"], [["s0/missing.dcm", "normal"]])
    with pytest.raises(DatasetError, match=r"g\.csv row 2: file not found"):
        dicom_folder_data(tmp_path / "dicom", gone)


def test_database_studies_with_csv_labels(tmp_path: Path) -> None:
    studies = _studies(tmp_path)
    db = Database(f"sqlite:///{tmp_path / 'node.db'}")
    db.create_all()
    for uid, _, paths in studies:
        for p in paths:
            ds = dcmread(p, stop_before_pixels=True)
            record_instance(db, InstanceRecord(
                sop_uid=str(ds.SOPInstanceUID), study_uid=uid,
                series_uid=str(ds.SeriesInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), path=str(p),
                views=(), n_frames=int(ds.get("NumberOfFrames", 1)),
                size_bytes=p.stat().st_size, calling_ae="CAM", patient_key=f"key-{uid[-6:]}"))
    labels = _write_csv(tmp_path / "db.csv", ["study_uid", "label"],
                        [[uid, label] for uid, label, _ in studies[:3]])
    data = database_data(db, labels)
    assert len(data.images) == 6 and len(set(data.patient_ids)) == 3
    via_sources = load_data(DataSources(from_db=True, labels=labels), db)
    assert len(via_sources.images) == 6
    missing = _write_csv(tmp_path / "m.csv", ["study_uid", "label"], [["1.2.999", "normal"]])
    with pytest.raises(DatasetError, match=r"m\.csv row 2: study 1\.2\.999 is not in the node"):
        database_data(db, missing)
    db.dispose()


# --- phantoms and combining --------------------------------------------------------------


def test_phantoms_and_concat(tmp_path: Path) -> None:
    ph = load_phantoms(4, seed=3)
    assert len(ph.images) == 8 and ph.trained_on_phantoms and len(set(ph.patient_ids)) == 4
    _iics(tmp_path, {"normal": [1]})
    png = load_png_folder(tmp_path, patient_prefix="png:")
    with pytest.raises(DatasetError, match="mixed image sizes"):
        concat([ph, png])  # 256 x 1024 phantoms and 64 x 256 test PNGs
    both = concat([ph, load_phantoms(4, seed=4)])
    assert len(both.images) == 16 and not describe(both)["views"].get("unknown")
    with pytest.raises(DatasetError, match="no training data"):
        load_data(DataSources(), None)
