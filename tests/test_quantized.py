"""int8 serving (model.precision): chosen at export on held-out images, checked again at load,
served only when it agrees with the fp32 model, fp32 with a WARNING otherwise.

The checks here run on 6 held-out phantom studies (12 images, so agreement must be total)
instead of the node's 100, to keep the tests to seconds.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from model.classes import CLASS_NAMES
from model.classifier import OPTIMIZED, Classifier
from model.dscint import Dscint, DscintProbabilities
from model.explain import grad_cam
from model.export import (
    METADATA_FILE,
    ModelFileError,
    ModelMetadata,
    export_torchscript,
    load_torchscript,
    torchscript_deprecation_silenced,
)
from model.phantoms import generate_study
from model.precision import (
    FP32,
    INT8,
    MIN_AGREEMENT,
    PrecisionCheck,
    compare,
    differentiable,
    int8_module,
)
from model.preprocess import preprocess_batch

STUDIES = 6


def _meta(version: str) -> ModelMetadata:
    return ModelMetadata(version=version, weights_sha256="", training_data="unit test",
                         trained_on_phantoms=True)


def _outlier_net(seed: int = 0) -> Dscint:
    """A net int8 cannot serve, built the way int8 fails in practice: each FC1 row has an
    outlier weight (on a feature that is always zero, so fp32 is unaffected), the per-channel
    int8 scale follows the outlier, and every weight that matters rounds to zero."""
    torch.manual_seed(seed)
    net = Dscint().eval()
    conv, fc1 = net.features[12], net.classifier[1]
    assert isinstance(conv, torch.nn.Conv2d) and isinstance(fc1, torch.nn.Linear)
    assert conv.bias is not None
    with torch.no_grad():
        conv.bias[0] = -1e4  # channel 0 of the last convolution never fires
        fc1.weight[:, 0] = 1e3  # FC1's outliers sit on its features
        fc1.weight[:, 1:] *= 30
    return net


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    return export_torchscript(DscintProbabilities(Dscint()),
                              tmp_path_factory.mktemp("int8") / "m.pt", _meta("int8-1"),
                              precision="auto", verify_studies=STUDIES)


def test_export_records_the_int8_choice_and_its_check(int8_model: Path) -> None:
    _, meta = load_torchscript(int8_model)
    assert meta.precision == INT8
    check = PrecisionCheck.from_dict(meta.precision_check)
    assert check.passed and check.images == 2 * STUDIES and check.agreement >= MIN_AGREEMENT
    assert 0.0 <= check.max_prob_diff < 0.05
    assert meta.precision_check["layers"] == ["net.classifier.1"]
    assert "phantom studies" in check.verification_set
    # the file keeps the fp32 weights: they are the reference at every load
    verified, _ = load_torchscript(int8_model)
    assert verified.state_dict()["net.classifier.1.weight"].dtype == torch.float32


def test_int8_model_loads_checked_and_serves(int8_model: Path) -> None:
    clf = Classifier(int8_model, verify_studies=STUDIES)
    assert (clf.precision, clf.serving) == (INT8, OPTIMIZED)
    assert clf.precision_check is not None and clf.precision_check.passed
    fp32 = Classifier(int8_model, precision=FP32)
    assert fp32.precision == FP32 and fp32.precision_check is None
    study = generate_study("arthritis", seed=11)
    views = [("anterior", study.anterior), ("posterior", study.posterior)]
    got, want = clf.classify_study(views), fp32.classify_study(views)
    assert got.predicted_class == want.predicted_class
    for name in CLASS_NAMES:
        assert abs(got.probabilities[name] - want.probabilities[name]) < 1e-3
    kinds = {n.kind() for n in clf.module.graph.nodes()}
    assert "quantized::linear_dynamic" in kinds


def test_int8_frees_the_fp32_fc1(int8_model: Path) -> None:
    clf = Classifier(int8_model, verify_studies=STUDIES)
    held = [t for m in (clf.module, clf.verified_module) for t in m.state_dict().values()
            if isinstance(t, torch.Tensor)]
    assert all(t.numel() < 4_000_000 for t in held)  # no 19032 x 1024 fp32 tensor


def test_evidence_maps_take_gradients_through_int8(int8_model: Path) -> None:
    clf = Classifier(int8_model, verify_studies=STUDIES)
    fp32 = Classifier(int8_model, precision=FP32)
    study = generate_study("bone_metastasis", seed=4)
    batch = preprocess_batch([study.anterior], clf.meta.preprocessing)
    got = grad_cam(clf.verified_module, batch, 1)
    want = grad_cam(fp32.verified_module, batch, 1)
    assert got.shape == (1, 1024, 256) and float(got.max()) > 0
    assert float(np.abs(got - want).max()) < 0.05


def test_int8_backward_matches_the_dequantised_weights() -> None:
    """The chunked backward is the gradient of x @ dequantised(W).T."""
    torch.manual_seed(1)
    with torchscript_deprecation_silenced():
        verified = torch.jit.script(DscintProbabilities(Dscint()).eval())
    module, _ = int8_module(verified)
    fc1 = list(differentiable(module).net.classifier.children())[1]  # type: ignore[union-attr]
    x = torch.rand(2, 19032, requires_grad=True)
    g = torch.rand(2, 1024)
    (got,) = torch.autograd.grad(fc1(x), x, g)
    w = fc1.layer.weight().dequantize()
    torch.testing.assert_close(got, g @ w, rtol=1e-4, atol=1e-5)


def test_a_model_int8_cannot_serve_is_exported_and_served_fp32(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        path = export_torchscript(DscintProbabilities(_outlier_net()), tmp_path / "bad.pt",
                                  _meta("outlier-1"), precision="auto", verify_studies=STUDIES)
    assert "exported for fp32 serving" in caplog.text
    _, meta = load_torchscript(path)
    assert meta.precision == FP32
    check = PrecisionCheck.from_dict(meta.precision_check)
    assert not check.passed and check.agreement < MIN_AGREEMENT  # recorded, with its figures
    caplog.clear()
    with caplog.at_level("WARNING", logger="model.classifier"):
        clf = Classifier(path, precision=INT8, verify_studies=STUDIES)  # asked for, refused
    assert clf.precision == FP32 and clf.serving == OPTIMIZED
    assert clf.precision_check is not None and not clf.precision_check.passed
    assert "int8 check failed at load" in caplog.text and "serving fp32" in caplog.text


def test_check_counts_disagreement() -> None:
    with torchscript_deprecation_silenced():
        verified = torch.jit.script(DscintProbabilities(_outlier_net()).eval())
    module, _ = int8_module(verified)
    pre = ModelMetadata(version="x", weights_sha256="", training_data="",
                        trained_on_phantoms=True).preprocessing
    check = compare(verified, module, pre, 1.0, studies=2)
    assert check.images == 4 and check.agreement < 1.0 and not check.passed
    same = compare(verified, verified, pre, 1.0, studies=2)
    assert same.passed and same.agreement == 1.0 and same.max_prob_diff == 0.0


def test_precision_metadata_round_trip_and_validation(int8_model: Path, tmp_path: Path) -> None:
    _, meta = load_torchscript(int8_model)
    again = ModelMetadata.from_json(meta.to_json())
    assert (again.precision, again.precision_check) == (meta.precision, meta.precision_check)
    doc = json.loads(meta.to_json())
    for change, why in (({"precision": "fp8"}, "not one of"),
                        ({"precision_check": {}}, "carries no precision_check"),
                        ({"precision_check": {**doc["precision_check"], "agreement": 0.9}},
                         "lacks a passed check"),
                        ({"precision_check": {"precision": INT8}}, "malformed")):
        with pytest.raises(ModelFileError, match=why):
            ModelMetadata.from_json(json.dumps({**doc, **change}))
    # a file from before precision existed loads as fp32 with no check
    old = {k: v for k, v in doc.items() if k not in ("precision", "precision_check")}
    legacy = ModelMetadata.from_json(json.dumps(old))
    assert (legacy.precision, legacy.precision_check) == (FP32, {})
    with zipfile.ZipFile(int8_model) as zf:
        assert any(n.endswith(METADATA_FILE) for n in zf.namelist())


def test_fp32_model_serves_fp32_without_a_check(untrained_model: Path) -> None:
    clf = Classifier(untrained_model)
    assert clf.meta.precision == FP32
    assert clf.precision == FP32 and clf.precision_check is None


def test_unknown_precision_is_refused(untrained_model: Path) -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        Classifier(untrained_model, precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        export_torchscript(DscintProbabilities(Dscint()), Path("/nonexistent/x.pt"),
                           _meta("y"), precision="fp16")
