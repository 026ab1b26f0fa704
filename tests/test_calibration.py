"""Temperature scaling, the "indeterminate" threshold, their metadata, and a weak model's
result through a real node: indeterminate, with the four probabilities still listed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom import dcmread
from pydicom.sr.codedict import codes

from model.calibration import (
    DEFAULT_TEMPERATURE,
    DEFAULT_THRESHOLD,
    INDETERMINATE,
    INDETERMINATE_CODE,
    MIN_THRESHOLD,
    apply_temperature,
    calibrate,
    choose_threshold,
    decide,
    effective_threshold,
    expected_calibration_error,
    fit_temperature,
)
from model.classes import CLASS_NAMES
from model.classifier import Classifier
from model.dscint import Dscint, DscintProbabilities
from model.evaluate import expected_calibration_error as evaluate_ece
from model.export import ModelFileError, ModelMetadata, export_torchscript, load_torchscript
from model.phantom_dicom import DicomLayout, write_study
from model.phantoms import generate_study
from model.trainer import LabelledImages, TrainConfig, export_trained, train_model
from node.classify.sr import read_result
from node.demo.modality import send_paths
from node.demo.pacs_standin import PacsStandIn
from node.ops.status import result_text
from node.service.node import Node
from storage.reports import study_summaries
from tests.support.nodes import CALLER, dest, node_config, wait_sr


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def _overconfident(n: int = 2000, sharpen: float = 3.0, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z), probabilities reported as softmax(sharpen * z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, size=(n, 4))
    true_p = _softmax(z)
    labels = np.array([rng.choice(4, p=row) for row in true_p])
    return labels, _softmax(sharpen * z)


def test_temperature_keeps_the_arg_max_and_one_is_identity() -> None:
    _, probs = _overconfident(200)
    assert np.array_equal(apply_temperature(probs, 1.0), probs)
    for t in (0.5, 2.0, 7.0):
        scaled = apply_temperature(probs, t)
        assert np.array_equal(scaled.argmax(axis=1), probs.argmax(axis=1))
        assert np.allclose(scaled.sum(axis=1), 1.0)
    assert apply_temperature(probs, 2.0).max(axis=1).mean() < probs.max(axis=1).mean()


def test_temperature_on_probabilities_equals_temperature_on_logits() -> None:
    z = np.random.default_rng(1).normal(0, 3, size=(50, 4))
    assert np.allclose(apply_temperature(_softmax(z), 2.5), _softmax(z / 2.5), atol=1e-12)


def test_fit_recovers_the_overconfidence_and_lowers_ece() -> None:
    labels, probs = _overconfident(sharpen=3.0)
    t = fit_temperature(labels, probs)
    assert 2.5 < t < 3.5
    assert expected_calibration_error(labels, apply_temperature(probs, t)) < \
        expected_calibration_error(labels, probs) / 2
    assert fit_temperature(labels[:0], probs[:0]) == DEFAULT_TEMPERATURE


def test_ece_matches_the_evaluation_module() -> None:
    labels, probs = _overconfident(500)
    assert expected_calibration_error(labels, probs) == pytest.approx(evaluate_ece(labels, probs))
    assert math.isnan(expected_calibration_error(labels[:0], probs[:0]))


def test_threshold_reaches_the_target_or_calls_nothing() -> None:
    labels, probs = _overconfident(sharpen=1.0)
    t = choose_threshold(labels, probs, target=0.9)
    called = probs.max(axis=1) >= t
    assert t >= MIN_THRESHOLD and called.any()
    assert (probs.argmax(axis=1)[called] == labels[called]).mean() >= 0.9
    wrong = (labels + 1) % 4  # every answer wrong: no threshold reaches any accuracy
    assert choose_threshold(wrong, probs, target=0.5) == 1.0
    assert choose_threshold(labels[:0], probs[:0]) == DEFAULT_THRESHOLD


def test_never_a_definite_class_below_one_half() -> None:
    probs = {"normal": 0.45, "bone_metastasis": 0.25, "arthritis": 0.2, "thyroid_carcinoma": 0.1}
    assert decide(probs, 0.3) == INDETERMINATE
    assert decide(probs, 0.0) == INDETERMINATE
    assert decide({**probs, "normal": 0.7, "arthritis": -0.05}, 0.6) == "normal"
    assert decide({**probs, "normal": 0.7}, 0.8) == INDETERMINATE
    assert effective_threshold(0.3) == MIN_THRESHOLD
    assert effective_threshold(0.8) == 0.8
    assert effective_threshold(0.8, override=0.6) == 0.6
    assert effective_threshold(0.8, override=0.2) == MIN_THRESHOLD


def test_indeterminate_code_is_the_one_dicom_lists() -> None:
    code = codes.cid6063.IndeterminateResult
    assert (code.value, code.scheme_designator, code.meaning) == INDETERMINATE_CODE


def test_calibrate_reports_ece_before_and_after_and_the_share_called() -> None:
    labels, probs = _overconfident(sharpen=3.0)
    patients = [f"p{i // 2}" for i in range(len(labels))]
    cal = calibrate(labels, probs, patients, target=0.9)
    assert cal.held_out_studies == len(labels) // 2
    assert cal.image_ece_after < cal.image_ece_before
    assert 0.0 <= cal.indeterminate_share <= 1.0
    assert cal.threshold >= MIN_THRESHOLD
    assert json.dumps(cal.to_dict())  # JSON-safe for the model's metadata


def _export(path: Path, **fields: object) -> Path:
    torch.manual_seed(0)
    meta = ModelMetadata(version="cal-1", weights_sha256="", training_data="test",
                         trained_on_phantoms=True, **fields)  # type: ignore[arg-type]
    return export_torchscript(DscintProbabilities(Dscint()), path, meta)


def test_metadata_round_trips_and_older_files_get_the_defaults(tmp_path: Path) -> None:
    path = _export(tmp_path / "m.pt", temperature=1.7, indeterminate_below=0.8,
                   calibration={"study_ece_after": 0.01})
    _, meta = load_torchscript(path)
    assert (meta.temperature, meta.indeterminate_below) == (1.7, 0.8)
    assert meta.calibration == {"study_ece_after": 0.01}
    doc = json.loads(meta.to_json())
    for key in ("temperature", "indeterminate_below", "calibration"):
        del doc[key]
    old = ModelMetadata.from_json(json.dumps(doc))
    assert (old.temperature, old.indeterminate_below) == (DEFAULT_TEMPERATURE,
                                                          DEFAULT_THRESHOLD)


@pytest.mark.parametrize("key, value", [("temperature", 0.0), ("temperature", "hot"),
                                        ("indeterminate_below", 0.2),
                                        ("indeterminate_below", 1.5)])
def test_invalid_calibration_in_metadata_is_refused(tmp_path: Path, key: str,
                                                    value: object) -> None:
    doc = json.loads(ModelMetadata(version="x", weights_sha256="", training_data="t",
                                   trained_on_phantoms=True).to_json())
    doc[key] = value
    with pytest.raises(ModelFileError):
        ModelMetadata.from_json(json.dumps(doc))


def test_classifier_serves_calibrated_probabilities(tmp_path: Path) -> None:
    plain = Classifier(_export(tmp_path / "plain.pt"))
    hot = Classifier(_export(tmp_path / "hot.pt", temperature=0.1))
    img = generate_study("arthritis", seed=5).anterior
    raw = plain.predict_images([img])
    assert np.allclose(hot.predict_images([img]), apply_temperature(raw, 0.1), atol=1e-6)
    assert hot.predict_images([img]).max() > raw.max()


def test_training_stores_temperature_and_threshold(tmp_path: Path) -> None:
    studies = [generate_study(CLASS_NAMES[i % 4], seed=900 + i) for i in range(8)]
    data = LabelledImages(
        images=[img for s in studies for img in (s.anterior, s.posterior)],
        labels=np.repeat([CLASS_NAMES.index(s.label) for s in studies], 2),
        patient_ids=[f"p{i}" for i in range(8) for _ in range(2)],
        views=["anterior", "posterior"] * 8, description="8 phantoms", trained_on_phantoms=True)
    cfg = TrainConfig(epochs=1, batch_size=2, progress=False, test_fraction=0.5)
    res = train_model(data, cfg)
    assert res.calibration is not None and res.calibration.held_out_studies >= 1
    _, meta = load_torchscript(export_trained(res, data, cfg, tmp_path / "t.pt"))
    assert meta.temperature == res.calibration.temperature
    assert meta.indeterminate_below == res.calibration.threshold >= MIN_THRESHOLD
    assert "image_ece_before" in meta.calibration and "image_ece_after" in meta.calibration


def test_weak_model_yields_indeterminate_through_a_real_node(
        tmp_path: Path, untrained_model: Path, pacs: PacsStandIn) -> None:
    paths = write_study(generate_study("bone_metastasis", seed=321), tmp_path / "out",
                        DicomLayout.MULTIFRAME)
    with Node(node_config(tmp_path / "node", untrained_model, pacs.port)) as node:
        assert send_paths(paths, dest(node), CALLER) == [0] * len(paths)
        study_uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        sr = wait_sr(pacs, study_uid)
        finding, probs = read_result(sr)
        assert finding == INDETERMINATE
        assert set(probs) == set(CLASS_NAMES) and max(probs.values()) < MIN_THRESHOLD
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-3)
        assert INDETERMINATE_CODE[0] in sr.to_json()
        row = {s.study_uid: s for s in study_summaries(node.db)}[study_uid]
        assert row.predicted_class == INDETERMINATE
        assert row.probabilities == pytest.approx(probs, abs=1e-6)
        assert result_text(row).startswith("indeterminate (")
        assert all(f"{k[:4]} 0.2" in result_text(row) for k in CLASS_NAMES)


def test_retrain_report_shows_ece_before_and_after() -> None:
    from model.evaluate import RunRecord, evaluate
    from model.report import ReportInputs, metrics_json, metrics_markdown

    labels, probs = _overconfident(400, sharpen=3.0)
    patients = [f"p{i // 2}" for i in range(len(labels))]
    cal = calibrate(labels, probs, patients, target=0.9)
    rec = RunRecord(arch="dscint", run=0, seed=0, evaluation=evaluate(labels, probs, patients),
                    history=[], images_per_second=1.0, seconds=1.0,
                    train_index=np.arange(0), test_index=np.arange(len(labels)), labels=labels,
                    probabilities=probs, calibration=cal)
    md = metrics_markdown(ReportInputs(records=[rec], config={}, data={}))
    assert "## Calibration and the indeterminate band, Dscint" in md
    row = [line for line in md.splitlines() if line.startswith("| 0 |")][-1]
    assert f"{cal.image_ece_before:.4f}" in row and f"{cal.image_ece_after:.4f}" in row
    assert metrics_json(ReportInputs(records=[rec], config={}, data={}))["runs"][0][
        "calibration"]["temperature"] == cal.temperature
