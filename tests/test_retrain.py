"""The paper's protocol reproduced: patient-level splits and k-fold, augmentation and class
balancing only inside the training part, ROC / calibration / mean ± sd against scikit-learn and
numpy, the promotion rule, and the whole loop on real associations: retrain -> promote -> a
running node's next SR names the new model -> rollback -> the old one again."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import Dataset, dcmread
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from model.datasets import load_phantoms
from model.evaluate import (
    RunRecord,
    decide_promotion,
    evaluate,
    expected_calibration_error,
    patient_kfold,
    reliability_bins,
    roc_curve,
    run_splits,
    stat,
    summarize,
    summarize_trivial,
)
from model.metrics import compute_metrics
from model.phantom_dicom import DicomLayout, write_study
from model.phantoms import generate_study
from model.split import patient_split
from model.trainer import TABLE3_PROPORTIONS, TrainConfig, epoch_order, train_model
from node.__main__ import main
from node.config import load_config
from node.demo.modality import send_paths
from node.demo.pacs_standin import PacsStandIn
from node.export.scu import Destination
from node.service.node import Node
from storage.db import Database
from storage.registry import list_models, serving_model
from tests.support.nodes import wait_sr
from tests.support.wait import wait_for

CALLER = "TEST_CAMERA"
ALGORITHM_VERSION = "111003"  # DCM "Algorithm Version"


# --- metrics against scikit-learn --------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=0, max_value=10_000), st.integers(min_value=2, max_value=60))
def test_roc_curve_matches_sklearn(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(bool)
    y[:2] = [True, False]
    scores = np.round(rng.random(n), 1)  # rounding makes ties, the hard case
    ours = roc_curve(y, scores)
    fpr, tpr, thr = skm.roc_curve(y, scores, drop_intermediate=False)
    np.testing.assert_allclose(ours.fpr, fpr)
    np.testing.assert_allclose(ours.tpr, tpr)
    np.testing.assert_allclose(ours.thresholds[1:], thr[1:])
    assert ours.auc == pytest.approx(skm.roc_auc_score(y, scores))


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=0, max_value=10_000), st.integers(min_value=4, max_value=200))
def test_calibration_matches_sklearn(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 4)) * rng.uniform(0.1, 4)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = rng.integers(0, 4, n)
    conf, correct = probs.max(1), probs.argmax(1) == y
    bins = [b for b in reliability_bins(y, probs, 10) if b.count]
    if correct.all() or not correct.any():
        return  # calibration_curve needs both outcomes
    prob_true, prob_pred = calibration_curve(correct, conf, n_bins=10, strategy="uniform")
    np.testing.assert_allclose([b.accuracy for b in bins], prob_true)
    np.testing.assert_allclose([b.confidence for b in bins], prob_pred)
    counts = np.array([b.count for b in bins])
    expected = float(np.sum(counts / n * np.abs(prob_true - prob_pred)))
    assert expected_calibration_error(y, probs) == pytest.approx(expected)


def test_mean_and_sd_over_runs() -> None:
    values = [0.91, 0.95, 0.93, float("nan")]
    s = stat(values)
    assert s.n == 3 and s.mean == pytest.approx(np.mean(values[:3]))
    assert s.sd == pytest.approx(np.std(values[:3], ddof=1))
    assert s.fmt() == f"{s.mean:.4f} ± {s.sd:.4f}" and stat([0.5]).fmt() == "0.5000"


def test_runs_summarised_per_network_and_trivial_counted_once_per_split() -> None:
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2, 3] * 3)
    pids = [f"p{i // 2}" for i in range(12)]
    records = []
    for run in range(3):
        probs = rng.dirichlet(np.ones(4), size=12)
        trivial = compute_metrics(y, rng.dirichlet(np.ones(4), size=12), ("a", "b", "c", "d"))
        for arch in ("dscint", "alexnet"):  # the same split's trivial baseline, twice
            records.append(RunRecord(arch, run, run, evaluate(y, probs, pids), [], 1.0, 1.0,
                                     np.arange(0), np.arange(12), y, probs, trivial))
    s = summarize([r for r in records if r.arch == "dscint"])
    accs = [r.evaluation.image.accuracy for r in records if r.arch == "dscint"]
    assert s.runs == 3 and s.image["accuracy"].mean == pytest.approx(np.mean(accs))
    assert s.image["accuracy"].sd == pytest.approx(np.std(accs, ddof=1))
    t = summarize_trivial(records)
    assert t is not None and t["accuracy"].n == 3


# --- splits, balancing, augmentation inside the training part ----------------------------


def test_kfold_by_patient_covers_every_patient_once() -> None:
    pids = [f"p{i // 2}" for i in range(120)]
    labels = [(i // 2) % 4 for i in range(120)]
    folds = patient_kfold(pids, labels, 5, seed=1)
    seen: list[str] = []
    for train, test in folds:
        test_p = {pids[i] for i in test}
        assert test_p.isdisjoint({pids[i] for i in train})
        assert len(train) + len(test) == 120
        assert all(abs(sum(labels[i] == c for i in test) / 2 - 3) <= 1 for c in range(4))
        seen += sorted(test_p)
    assert sorted(seen) == sorted(set(pids))
    with pytest.raises(ValueError, match="k >= 2"):
        patient_kfold(pids, labels, 1)


def test_repeated_runs_use_distinct_seeded_patient_splits() -> None:
    data = load_phantoms(12, seed=2)
    splits = run_splits(data, runs=3, seed=5, test_fraction=0.3, folds=None)
    assert [s for s, _, _ in splits] == [5, 6, 7]
    for seed, train, test in splits:
        assert {data.patient_ids[i] for i in train}.isdisjoint(
            {data.patient_ids[i] for i in test})
        again = patient_split(data.patient_ids, data.labels, 0.3, seed)
        assert np.array_equal(again[1], test)
    assert len({tuple(t) for _, _, t in splits}) > 1


def test_balanced_sampling_draws_table3_proportions() -> None:
    y = torch.tensor([0] * 2000 + [1] * 300 + [2] * 1200 + [3] * 500)
    gen = torch.Generator().manual_seed(0)
    order = epoch_order(y, TrainConfig(balance_classes=True), gen)
    assert len(order) == len(y) and int(order.min()) >= 0 and int(order.max()) < len(y)
    share = torch.bincount(y[order], minlength=4).double() / len(order)
    np.testing.assert_allclose(share.numpy(), TABLE3_PROPORTIONS, atol=0.02)
    plain = epoch_order(y, TrainConfig(balance_classes=False), gen)
    assert sorted(plain.tolist()) == list(range(len(y)))


def test_augmentation_and_training_never_cross_the_split() -> None:
    """Only images of training patients are ever augmented or fed to the optimiser."""
    data = load_phantoms(8, seed=11)
    cfg = TrainConfig(epochs=1, batch_size=2, seed=3, balance_classes=True, progress=False)
    res = train_model(data, cfg)
    train_p = {data.patient_ids[i] for i in res.train_index}
    test_p = {data.patient_ids[i] for i in res.test_index}
    trained_p = {data.patient_ids[i] for i in res.trained_indices}
    assert test_p and trained_p and train_p.isdisjoint(test_p)
    assert trained_p <= train_p and trained_p.isdisjoint(test_p)
    assert set(res.trained_indices) <= set(res.train_index)
    assert res.images_per_second > 0 and len(res.history) == 1


# --- promotion rule ----------------------------------------------------------------------


def test_promotion_rule() -> None:
    cand = {"study_f1": 0.80, "image_auc": 0.9}
    assert decide_promotion(cand, {"study_f1": 0.80}).promote  # at least as good
    assert not decide_promotion(cand, {"study_f1": 0.81}).promote
    assert not decide_promotion(cand, {"study_f1": 0.78}, margin=0.05).promote
    assert decide_promotion(cand, {"study_f1": 0.9}, force=True).forced
    assert decide_promotion(cand, None).promote
    d = decide_promotion(cand, {"image_auc": 0.95}, metric="image_auc")
    assert not d.promote and "image_auc 0.9000 < current 0.9500" in d.reason
    with pytest.raises(ValueError, match="unknown promotion metric"):
        decide_promotion(cand, None, metric="loss")


# --- end to end: retrain -> promote -> running node -> rollback --------------------------


def _config_file(tmp_path: Path, model: Path, pacs_port: int) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f"""
[node]
port = 0
[pacs]
ae_title = "TEST_PACS"
host = "127.0.0.1"
port = {pacs_port}
[storage]
root = "{tmp_path / 'node'}"
[model]
path = "{model}"
[completion]
quiet_seconds = 1.0
sweep_seconds = 0.2
[export]
backoff_base_seconds = 0.2
backoff_cap_seconds = 1.0
max_attempts = 3
""")
    return path


def _algorithm_version(sr: Dataset) -> str:
    """The TID 4019 Algorithm Version text anywhere in the SR content tree."""
    def walk(items: object) -> str | None:
        for item in items or []:  # type: ignore[attr-defined]
            name = item.get("ConceptNameCodeSequence")
            if name and name[0].CodeValue == ALGORITHM_VERSION:
                return str(item.TextValue)
            found = walk(item.get("ContentSequence", []))
            if found:
                return found
        return None
    version = walk(sr.ContentSequence)
    assert version is not None, "SR names no algorithm version"
    return version


def _send_study(node: Node, tmp_path: Path, seed: int) -> str:
    st = generate_study("normal", seed=seed)
    paths = write_study(st, tmp_path / f"study{seed}", DicomLayout.MULTIFRAME)
    dest = Destination(node.cfg.node.ae_title, "127.0.0.1", node.port)
    assert send_paths(paths, dest, CALLER) == [0]
    return str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def _sr_version(pacs: PacsStandIn, study_uid: str, timeout: float = 60.0) -> str:
    return _algorithm_version(wait_sr(pacs, study_uid, timeout))


def _wait_serving(node: Node, version: str, timeout: float = 90.0) -> None:
    wait_for(lambda: node.model_version == version, timeout, f"the node to serve {version}")


def test_retrain_promote_hot_swap_and_rollback(tmp_path: Path, untrained_model: Path,
                                              pacs: PacsStandIn,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    cfg_file = _config_file(tmp_path, untrained_model, pacs.port)
    with Node(load_config(cfg_file), model_check_seconds=0.2) as node:
        assert node.model_version is None  # empty registry: [model].path is served
        assert _sr_version(pacs, _send_study(node, tmp_path, 1)) == "test-0"
        first_clf = node.current_classifier()

        rc = main(["retrain", "--config", str(cfg_file), "--phantoms", "24", "--epochs", "1",
                   "--runs", "1", "--version", "e2e-1", "--promote", "--quiet"])
        assert rc == 0
        _wait_serving(node, "e2e-1")
        assert _sr_version(pacs, _send_study(node, tmp_path, 2)) == "e2e-1"
        # the object a job in flight holds is untouched by the swap and still classifies
        assert first_clf.metadata.version == "test-0"
        views = [("anterior", generate_study("normal", seed=3).anterior)]
        assert first_clf.classify_study(views).predicted_class

        in_flight: list[str] = []
        sender = threading.Thread(target=lambda: in_flight.extend(
            _send_study(node, tmp_path, s) for s in (4, 5, 6)))
        sender.start()
        assert main(["models", "rollback", "--config", str(cfg_file)]) == 0
        sender.join()
        _wait_serving(node, "test-0")
        for uid in in_flight:  # no study dropped while the model changed under it
            assert _sr_version(pacs, uid) in {"e2e-1", "test-0"}
        assert _sr_version(pacs, _send_study(node, tmp_path, 7)) == "test-0"

    capsys.readouterr()
    assert main(["models", "--config", str(cfg_file)]) == 0
    listing = capsys.readouterr().out
    assert "e2e-1" in listing and "test-0" in listing

    db = Database(load_config(cfg_file).database_url)
    models = {m.version: m for m in list_models(db)}
    serving = serving_model(db)
    db.dispose()
    assert serving is not None and serving.version == "test-0"
    assert models["e2e-1"].state == "retired" and models["e2e-1"].rolled_back_at is not None
    assert Path(models["e2e-1"].path) == tmp_path / "node" / "models" / "e2e-1.pt"
    assert models["test-0"].note and "[model].path" in models["test-0"].note

    report = tmp_path / "node" / "reports" / "e2e-1"
    for name in ("metrics.md", "metrics.json", "config.json", "data.json", "roc.png",
                 "confusion_dscint.png", "training_curves.png", "radar.png",
                 "reliability.png"):
        assert (report / name).stat().st_size > 0, name
    doc = json.loads((report / "metrics.json").read_text())
    promo = doc["promotion"]
    assert promo["forced"] and promo["promote"] and promo["metric"] == "study_f1"
    assert promo["current"] is not None  # the old model was scored on the same held-out set
    assert doc["networks"]["dscint"]["runs"] == 1 and doc["trivial_baseline_image"]
    md = (report / "metrics.md").read_text()
    assert "Table 6 layout" in md and "Tables 8 and 9 layout" in md and "phantoms" in md
    cfg_doc = json.loads((report / "config.json").read_text())
    assert cfg_doc["train"]["epochs"] == 1 and cfg_doc["train"]["balance_classes"]


def test_retrain_reports_bad_data_with_exit_code_2(tmp_path: Path, untrained_model: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    cfg_file = _config_file(tmp_path, untrained_model, 104)
    labels = tmp_path / "labels.csv"
    labels.write_text("study_uid,label\n1.2.3,gout\n")
    rc = main(["retrain", "--config", str(cfg_file), "--dicom", str(tmp_path),
               "--labels", str(labels), "--quiet"])
    assert rc == 2 and "labels.csv row 2: unknown class 'gout'" in capsys.readouterr().err
    rc = main(["retrain", "--config", str(cfg_file), "--phantoms", "4", "--arch", "lenet"])
    assert rc == 2 and "unknown network 'lenet'" in capsys.readouterr().err
    assert main(["models", "rollback", "--config", str(cfg_file)]) == 1
    assert "nothing to roll back" in capsys.readouterr().err
