"""Phantom generator, phantom DICOM writer and contact sheet.

The class-difference tests measure the images themselves (not the generator's bookkeeping), so a
change that made a class invisible would fail here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import NuclearMedicineImageStorage, SecondaryCaptureImageStorage

from model.classes import CLASS_NAMES, INPUT_COLS, INPUT_ROWS
from model.contact_sheet import write_contact_sheet
from model.phantom_dicom import (
    SIMULATED_MARKER,
    VIEW_CODES,
    DicomLayout,
    study_datasets,
    write_study,
)
from model.phantoms import (
    PAPER_PROPORTIONS,
    PIXEL_MM,
    PhantomStudy,
    class_counts,
    generate_dataset,
    generate_study,
)

REAL_NM1 = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "wg04-nm1" / \
    "NM1_UNC.dcm"
SEEDS = range(1000, 1012)
MDP_CLASSES = ("normal", "bone_metastasis", "arthritis")


@pytest.fixture(scope="module")
def cohort() -> dict[str, list[PhantomStudy]]:
    """Twelve studies per class at the default difficulty (about 1.5 s in all)."""
    return {lab: [generate_study(lab, s) for s in SEEDS] for lab in CLASS_NAMES}


# --- image measurements ------------------------------------------------------------------------


def _rows(st: PhantomStudy, y0_cm: float, y1_cm: float) -> slice:
    """Image rows of a band of the body given in cm below the vertex (175 cm reference body)."""
    px_per_cm = st.patient.height_cm / 175.0 / (PIXEL_MM / 10.0)
    return slice(int(st.patient.top_row + px_per_cm * y0_cm),
                 int(st.patient.top_row + px_per_cm * y1_cm))


def _midline(st: PhantomStudy, view: str) -> int:
    """Column of the body midline; the posterior view is mirrored."""
    shift = st.patient.shift_cols if view == "ant" else -st.patient.shift_cols
    return round(INPUT_COLS / 2 + shift)


def _box_mean(img: np.ndarray, k: int) -> np.ndarray:
    """k x k moving average (k odd), same size, zero outside; summed-area table, O(1) a pixel."""
    r = k // 2
    c = np.pad(img.astype(np.float64), ((r + 1, r), (r + 1, r))).cumsum(0).cumsum(1)
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)


def _max_filter(img: np.ndarray, k: int) -> np.ndarray:
    """k x k moving maximum (k odd), separable, edges padded with -inf."""
    r = k // 2
    rows = np.pad(img, ((r, r), (0, 0)), constant_values=-np.inf)
    out = rows[: img.shape[0]].copy()
    for i in range(1, k):
        np.maximum(out, rows[i: i + img.shape[0]], out=out)
    cols = np.pad(out, ((0, 0), (r, r)), constant_values=-np.inf)
    out = cols[:, : img.shape[1]].copy()
    for i in range(1, k):
        np.maximum(out, cols[:, i: i + img.shape[1]], out=out)
    return out


def _focal_spots(img: np.ndarray) -> int:
    """Local maxima of the 5x5 mean that are 2.5x their 21x21 ring and near the top of the scale."""
    m = _box_mean(img, 5)
    ring = (_box_mean(img, 21) * 441 - _box_mean(img, 9) * 81) / 360
    peak = m == _max_filter(m, 9)
    floor = 0.7 * float(np.percentile(img, 99.5))
    return int((peak & (m > 2.5 * ring) & (m > floor)).sum())


def _knee_to_thigh(st: PhantomStudy) -> float:
    """Hottest 5x5 spot in the knee band over that of the mid-thigh band, both views averaged."""
    out = []
    for img in (st.anterior, st.posterior):
        m = _box_mean(img, 5)
        knee = float(m[_rows(st, 117, 125)].max())
        thigh = float(m[_rows(st, 100, 110)].max())
        out.append(knee / max(thigh, 1.0))
    return float(np.mean(out))


def _spine_signal(st: PhantomStudy) -> float:
    """Mean of a thoracic-spine strip in the posterior view, relative to the view's p99.5."""
    c = _midline(st, "post")
    img = st.posterior
    return float(img[_rows(st, 33, 56), c - 4:c + 5].mean()) / max(
        float(np.percentile(img, 99.5)), 1.0)


# --- generator ---------------------------------------------------------------------------------


@pytest.mark.parametrize("label", CLASS_NAMES)
def test_same_seed_same_study_different_seed_different(label: str) -> None:
    a, b, c = generate_study(label, 7), generate_study(label, 7), generate_study(label, 8)
    assert np.array_equal(a.anterior, b.anterior) and np.array_equal(a.posterior, b.posterior)
    assert a.patient == b.patient and a.details == b.details
    assert not np.array_equal(a.anterior, c.anterior)
    assert a.patient.patient_id != c.patient.patient_id


def test_difficulty_changes_the_disease_not_the_patient() -> None:
    easy, hard = generate_study("bone_metastasis", 3, 0.0), generate_study("bone_metastasis", 3, 1)
    assert easy.patient == hard.patient
    assert not np.array_equal(easy.anterior, hard.anterior)


def test_shapes_dtypes_and_fields(cohort: dict[str, list[PhantomStudy]]) -> None:
    for label, studies in cohort.items():
        for st in studies:
            assert st.label == label
            for img in (st.anterior, st.posterior):
                assert img.shape == (INPUT_ROWS, INPUT_COLS) and img.dtype == np.uint16
            assert st.patient.sex in ("M", "F") and 28 <= st.patient.age <= 87
            assert st.patient.patient_name.startswith("PHANTOM^")
            assert st.details["simulated"] is True
            expect = "I-131" if label == "thyroid_carcinoma" else "Tc-99m MDP"
            assert st.radiopharmaceutical == expect


def test_details_are_json_serialisable(cohort: dict[str, list[PhantomStudy]]) -> None:
    """Details go into manifests and logs as JSON."""
    for studies in cohort.values():
        json.dumps(studies[0].details)


def test_count_statistics_like_a_real_camera(cohort: dict[str, list[PhantomStudy]]) -> None:
    # The real GE scan: median 1, p99 92, max 278, 3.6 M counts.
    for label, studies in cohort.items():
        for st in studies:
            for img in (st.anterior, st.posterior):
                assert np.median(img) <= 5
                p99 = float(np.percentile(img, 99))
                if label == "thyroid_carcinoma":
                    assert 3 <= p99 <= 100, p99
                    assert 5e4 <= img.sum() <= 2e6
                else:
                    assert 15 <= p99 <= 300, p99
                    assert 8e5 <= img.sum() <= 8e6
                assert img.max() < 20000


def test_outside_the_detector_field_is_empty(cohort: dict[str, list[PhantomStudy]]) -> None:
    for st in cohort["normal"][:4]:
        fov = st.details["fov_cols"]
        assert isinstance(fov, list)
        c0, c1 = int(fov[0]), int(fov[1])
        assert int(st.anterior[:, :c0].sum()) == 0 and int(st.anterior[:, c1:].sum()) == 0


def test_iodine_scans_have_no_skeleton(cohort: dict[str, list[PhantomStudy]]) -> None:
    mdp = np.mean([_spine_signal(st) for lab in MDP_CLASSES for st in cohort[lab]])
    iodine = np.mean([_spine_signal(st) for st in cohort["thyroid_carcinoma"]])
    assert iodine < 0.5 * mdp, (iodine, mdp)


def test_metastases_add_focal_hot_spots(cohort: dict[str, list[PhantomStudy]]) -> None:
    def spots(label: str) -> float:
        return float(np.mean([_focal_spots(st.anterior) + _focal_spots(st.posterior)
                              for st in cohort[label]]))
    assert spots("bone_metastasis") > 1.15 * spots("normal"), (spots("bone_metastasis"),
                                                              spots("normal"))


def test_arthritis_adds_periarticular_uptake_at_knees(
        cohort: dict[str, list[PhantomStudy]]) -> None:
    normal = np.mean([_knee_to_thigh(st) for st in cohort["normal"]])
    arthritis = np.mean([_knee_to_thigh(st) for st in cohort["arthritis"]])
    assert arthritis > normal + 0.15, (arthritis, normal)


def test_spine_is_brighter_posteriorly(cohort: dict[str, list[PhantomStudy]]) -> None:
    """Lumbar vertebrae lie near the back: more counts in the posterior view."""
    wins = 0
    for st in cohort["normal"]:
        rows = _rows(st, 60, 75)
        ca, cp = _midline(st, "ant"), _midline(st, "post")
        ant = st.anterior[rows, ca - 4:ca + 5].mean()
        post = st.posterior[rows, cp - 4:cp + 5].mean()
        wins += int(post > ant)
    assert wins >= 10


def test_posterior_is_mirrored() -> None:
    """A patient lying off-centre appears on opposite sides in the two views."""
    checked = 0
    for seed in range(60):
        if checked == 4:
            break
        st = generate_study("normal", seed)
        if abs(st.patient.shift_cols) < 6:
            continue
        cols = np.arange(INPUT_COLS)
        com_a = float((st.anterior.sum(0) * cols).sum() / st.anterior.sum())
        com_p = float((st.posterior.sum(0) * cols).sum() / st.posterior.sum())
        assert np.sign(com_a - com_p) == np.sign(st.patient.shift_cols)
        assert abs((com_a - com_p) - 2 * st.patient.shift_cols) < 6
        checked += 1
    assert checked >= 3


def test_generate_study_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown class"):
        generate_study("fracture", 1)
    with pytest.raises(ValueError, match="difficulty"):
        generate_study("normal", 1, difficulty=1.5)
    with pytest.raises(ValueError, match="seed"):
        generate_study("normal", -1)


def test_dataset_proportions_determinism_and_unique_patients() -> None:
    a = generate_dataset(20, seed=5)
    b = generate_dataset(20, seed=5)
    assert [s.seed for s in a] == [s.seed for s in b]
    assert all(np.array_equal(x.anterior, y.anterior) for x, y in zip(a, b, strict=True))
    counts = [sum(s.label == lab for s in a) for lab in CLASS_NAMES]
    assert counts == class_counts(20, PAPER_PROPORTIONS) == [6, 4, 5, 5]
    assert len({s.patient.patient_id for s in a}) == 20
    assert [s.label for s in a] != sorted(s.label for s in a)  # shuffled, not grouped
    assert [s.seed for s in generate_dataset(20, seed=6)] != [s.seed for s in a]
    only = generate_dataset(6, seed=1, proportions=(0, 0, 1, 1))
    assert {s.label for s in only} == {"arthritis", "thyroid_carcinoma"}


def test_class_counts_sum_exactly() -> None:
    for n in (0, 1, 7, 99, 600):
        assert sum(class_counts(n, PAPER_PROPORTIONS)) == n
    assert class_counts(600, PAPER_PROPORTIONS) == [180, 120, 144, 156]
    with pytest.raises(ValueError):
        class_counts(10, (1.0, 2.0))


# --- DICOM -------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(DicomLayout))
@pytest.mark.parametrize("label", ["normal", "thyroid_carcinoma"])
def test_dicom_files_round_trip(tmp_path: Path, layout: DicomLayout, label: str) -> None:
    st = generate_study(label, 11)
    paths = write_study(st, tmp_path, layout)
    assert len(paths) == (1 if layout is DicomLayout.MULTIFRAME else 2)
    dss = [pydicom.dcmread(p) for p in paths]
    for ds in dss:
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.Modality == "NM"
        assert ds.PatientID == st.patient.patient_id
        assert str(ds.PatientName) == st.patient.patient_name
        assert ds.PatientComments == SIMULATED_MARKER
        assert SIMULATED_MARKER in ds.ImageComments
        assert ds.Manufacturer == "DSCINT PHANTOM"
        assert (ds.Rows, ds.Columns) == (INPUT_ROWS, INPUT_COLS)
        assert [float(v) for v in ds.PixelSpacing] == [2.26, 2.26]
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (
            16, 16, 15, 0)
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "WHOLE BODY", "EMISSION"]
    assert len({ds.StudyInstanceUID for ds in dss}) == 1
    assert len({ds.SOPInstanceUID for ds in dss}) == len(dss)
    if layout is DicomLayout.MULTIFRAME:
        px = dss[0].pixel_array
        assert px.shape == (2, INPUT_ROWS, INPUT_COLS)
        assert np.array_equal(px[0], st.anterior) and np.array_equal(px[1], st.posterior)
    else:
        assert np.array_equal(dss[0].pixel_array, st.anterior)
        assert np.array_equal(dss[1].pixel_array, st.posterior)


def _view_of_frame(ds: pydicom.Dataset, frame: int) -> str:
    """Follow frame -> Detector Vector -> Detector Information item -> View Code."""
    vector = ds.DetectorVector  # a single value reads back as an int, not a list
    detector = int(vector) if isinstance(vector, int) else int(list(vector)[frame])
    code = ds.DetectorInformationSequence[detector - 1].ViewCodeSequence[0]
    assert code.CodingSchemeDesignator == "SCT"
    return {v[0]: k for k, v in VIEW_CODES.items()}[code.CodeValue]


def test_multiframe_view_codes(tmp_path: Path) -> None:
    st = generate_study("arthritis", 2)
    ds = pydicom.dcmread(write_study(st, tmp_path, DicomLayout.MULTIFRAME)[0])
    assert ds.SOPClassUID == NuclearMedicineImageStorage
    assert int(ds.NumberOfFrames) == 2
    assert list(ds.FrameIncrementPointer) == [0x00540010, 0x00540020]
    assert list(ds.EnergyWindowVector) == [1, 1] and int(ds.NumberOfEnergyWindows) == 1
    assert list(ds.DetectorVector) == [1, 2] and int(ds.NumberOfDetectors) == 2
    assert [_view_of_frame(ds, i) for i in range(2)] == ["ANT", "POST"]
    assert ds.DetectorInformationSequence[0].ViewCodeSequence[0].CodeMeaning == \
        "Anterior projection"
    rng = ds.EnergyWindowInformationSequence[0].EnergyWindowRangeSequence[0]
    assert (float(rng.EnergyWindowLowerLimit), float(rng.EnergyWindowUpperLimit)) == (126, 154)
    rp = ds.RadiopharmaceuticalInformationSequence[0]
    assert rp.RadionuclideCodeSequence[0].CodeValue == "72454006"
    assert ds.StudyDescription == "NM WHOLE BODY BONE"


def test_iodine_energy_window_and_description() -> None:
    ds = study_datasets(generate_study("thyroid_carcinoma", 2))[0]
    rng = ds.EnergyWindowInformationSequence[0].EnergyWindowRangeSequence[0]
    assert (float(rng.EnergyWindowLowerLimit), float(rng.EnergyWindowUpperLimit)) == (328, 400)
    assert ds.StudyDescription == "I-131 WHOLE BODY"
    assert ds.RadiopharmaceuticalInformationSequence[0].RadionuclideCodeSequence[0].CodeValue \
        == "1368003"


def test_per_view_objects_carry_their_own_view(tmp_path: Path) -> None:
    dss = [pydicom.dcmread(p) for p in write_study(generate_study("normal", 4), tmp_path,
                                                   DicomLayout.PER_VIEW)]
    assert [ds.SOPClassUID for ds in dss] == [NuclearMedicineImageStorage] * 2
    assert len({ds.SeriesInstanceUID for ds in dss}) == 1
    assert [int(ds.InstanceNumber) for ds in dss] == [1, 2]
    assert [_view_of_frame(ds, 0) for ds in dss] == ["ANT", "POST"]
    assert [ds.ImageID for ds in dss] == ["ANT", "POST"]


def test_secondary_capture_has_no_view_code(tmp_path: Path) -> None:
    dss = [pydicom.dcmread(p) for p in write_study(generate_study("normal", 4), tmp_path,
                                                   DicomLayout.SECONDARY_CAPTURE)]
    for ds, view in zip(dss, ("ANT", "POST"), strict=True):
        assert ds.SOPClassUID == SecondaryCaptureImageStorage
        assert ds.Modality == "NM" and ds.ConversionType == "WSD"
        assert "DetectorInformationSequence" not in ds and "ViewCodeSequence" not in ds
        assert ds.ImageID == view and ds.ImageComments.startswith(view)
        assert view in ds.SeriesDescription.split()


def test_dicom_uids_are_deterministic(tmp_path: Path) -> None:
    def uids(seed: int, layout: DicomLayout) -> list[tuple[str, str, str]]:
        return [(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
                for ds in study_datasets(generate_study("bone_metastasis", seed), layout)]
    for layout in DicomLayout:
        assert uids(21, layout) == uids(21, layout)
        assert {u[2] for u in uids(21, layout)}.isdisjoint({u[2] for u in uids(22, layout)})
    # the same study in two layouts: one study, different instances
    mf, sc = uids(21, DicomLayout.MULTIFRAME), uids(21, DicomLayout.SECONDARY_CAPTURE)
    assert mf[0][0] == sc[0][0] and mf[0][2] not in {u[2] for u in sc}
    st = generate_study("normal", 3)
    a = write_study(st, tmp_path / "a")[0].read_bytes()
    b = write_study(st, tmp_path / "b")[0].read_bytes()
    assert a == b


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
@pytest.mark.parametrize("layout", list(DicomLayout))
def test_dciodvfy_finds_no_errors(tmp_path: Path, layout: DicomLayout) -> None:
    for path in write_study(generate_study("thyroid_carcinoma", 9), tmp_path, layout):
        out = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True,
                             timeout=60)
        errors = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")]
        assert errors == [], errors


def test_accession_can_be_given() -> None:
    ds = study_datasets(generate_study("normal", 1), DicomLayout.PER_VIEW, accession="ACC42")
    assert {d.AccessionNumber for d in ds} == {"ACC42"}


# --- contact sheet -----------------------------------------------------------------------------


def test_contact_sheet_writes_png(tmp_path: Path, cohort: dict[str, list[PhantomStudy]]) -> None:
    real = pydicom.dcmread(REAL_NM1).pixel_array if REAL_NM1.is_file() else None
    studies = [cohort[lab][0] for lab in CLASS_NAMES]
    out = write_contact_sheet(studies, tmp_path / "sheet" / "contact.png", real_scan=real)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    with pytest.raises(ValueError):
        write_contact_sheet([], tmp_path / "empty.png")
