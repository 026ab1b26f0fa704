"""Reduced-precision serving (model.precision): the ladder int8 -> fp16 -> fp32, a rung chosen at
export on held-out images, checked again at load, served only when it agrees with the fp32
model; each refused rung is a WARNING and the next one is tried.

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
    FP16,
    FP32,
    INT8,
    MIN_AGREEMENT,
    PrecisionCheck,
    PrecisionError,
    compare,
    differentiable,
    int8_module,
    reduced_module,
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


def _underflow_net(seed: int = 0) -> Dscint:
    """`_outlier_net` with FC1 scaled down by 1e9 and FC2 up by 1e9 (the same function in fp32,
    ReLU between them): FC1's weights are then below fp16's smallest subnormal, so fp16 rounds
    them all to zero, and int8 still fails on the outliers. No reduced rung can serve it."""
    net = _outlier_net(seed)
    fc1, fc2 = net.classifier[1], net.classifier[3]
    assert isinstance(fc1, torch.nn.Linear) and isinstance(fc2, torch.nn.Linear)
    assert fc1.bias is not None
    with torch.no_grad():
        fc1.weight.mul_(1e-9)
        fc1.bias.mul_(1e-9)
        fc2.weight.mul_(1e9)
    return net


def _kinds(graph: torch.Graph) -> set[str]:
    """Every node kind in a TorchScript graph, inside loops and branches too."""
    kinds = set()
    for node in graph.nodes():
        kinds.add(node.kind())
        for block in node.blocks():
            kinds |= _kinds(block)  # type: ignore[arg-type]
    return kinds


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Exported with AUTO: int8 is refused, fp16 passes."""
    return export_torchscript(DscintProbabilities(_outlier_net()),
                              tmp_path_factory.mktemp("fp16") / "m.pt", _meta("outlier-1"),
                              precision="auto", verify_studies=STUDIES)


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
    _assert_serves_like_fp32(clf, int8_model, "arthritis", seed=11)
    assert "quantized::linear_dynamic" in _kinds(clf.module.graph)


def _assert_serves_like_fp32(clf: Classifier, path: Path, label: str, seed: int) -> None:
    """One phantom study: the reduced model's class and probabilities (to 1e-3) as the same
    file served in fp32 gives them."""
    fp32 = Classifier(path, precision=FP32)
    assert fp32.precision == FP32 and fp32.precision_check is None
    study = generate_study(label, seed=seed)
    views = [("anterior", study.anterior), ("posterior", study.posterior)]
    got, want = clf.classify_study(views), fp32.classify_study(views)
    assert got.predicted_class == want.predicted_class
    for name in CLASS_NAMES:
        assert abs(got.probabilities[name] - want.probabilities[name]) < 1e-3


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


def test_a_rung_that_fails_falls_to_the_next_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        path = export_torchscript(DscintProbabilities(_outlier_net()), tmp_path / "o.pt",
                                  _meta("outlier-2"), precision="auto", verify_studies=STUDIES)
    assert "int8 refused: int8 predicts the fp32 class on" in caplog.text
    _, meta = load_torchscript(path)
    assert meta.precision == FP16
    check = PrecisionCheck.from_dict(meta.precision_check)
    assert check.precision == FP16 and check.passed and check.max_prob_diff < 1e-2
    assert meta.precision_check["layers"] == ["net.classifier.1"]
    ladder = meta.precision_check["ladder"]  # both checks travel with the file, in order
    assert [(c["precision"], c["passed"]) for c in ladder] == [(INT8, False), (FP16, True)]
    assert ladder[0]["agreement"] < MIN_AGREEMENT


def test_fp16_model_loads_checked_and_serves(outlier_model: Path) -> None:
    clf = Classifier(outlier_model, verify_studies=STUDIES)
    assert (clf.precision, clf.serving) == (FP16, OPTIMIZED)
    assert clf.precision_check is not None and clf.precision_check.passed
    assert "quantized::linear_dynamic_fp16" in _kinds(clf.module.graph)
    _assert_serves_like_fp32(clf, outlier_model, "thyroid_carcinoma", seed=5)


def test_load_climbs_down_from_int8_when_asked(
        outlier_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        clf = Classifier(outlier_model, precision=INT8, verify_studies=STUDIES)
    assert "at load: int8 refused" in caplog.text
    assert clf.precision == FP16 and clf.precision_check is not None
    assert clf.precision_check.precision == FP16 and clf.precision_check.passed


def test_a_model_no_rung_can_serve_is_exported_and_served_fp32(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        path = export_torchscript(DscintProbabilities(_underflow_net()), tmp_path / "bad.pt",
                                  _meta("underflow-1"), precision="auto", verify_studies=STUDIES)
    assert "int8 refused" in caplog.text and "fp16 refused" in caplog.text
    assert "exported for fp32 serving" in caplog.text
    _, meta = load_torchscript(path)
    assert meta.precision == FP32
    check = PrecisionCheck.from_dict(meta.precision_check)
    assert check.precision == FP16 and not check.passed  # the last refusal, with its figures
    assert [c["precision"] for c in meta.precision_check["ladder"]] == [INT8, FP16]
    caplog.clear()
    with caplog.at_level("WARNING"):
        clf = Classifier(path, precision=INT8, verify_studies=STUDIES)  # asked for, refused
    assert clf.precision == FP32 and clf.serving == OPTIMIZED
    assert clf.precision_check is not None and not clf.precision_check.passed
    assert "int8 refused" in caplog.text and "fp16 refused" in caplog.text
    assert "serving fp32" in caplog.text


def test_int8_result_of_an_image_does_not_depend_on_its_batch() -> None:
    """One activation scale per image, not per call: what the check saw is what serves."""
    torch.manual_seed(4)
    with torchscript_deprecation_silenced():
        verified = torch.jit.script(DscintProbabilities(Dscint()).eval())
        module = torch.jit.script(int8_module(verified)[0])
    x = torch.rand(3, 19032)
    x[1] *= 50  # a batch-mate with large activations would set a shared scale
    fc1 = list(module.net.classifier.children())[1]  # type: ignore[union-attr]
    with torch.inference_mode():
        alone, batched = fc1(x[:1]), fc1(x)
    assert torch.equal(alone, batched[:1])


def test_fp16_backward_matches_the_weights() -> None:
    """Evidence maps through an fp16 FC1: the gradient of x @ W16.T."""
    torch.manual_seed(2)
    with torchscript_deprecation_silenced():
        verified = torch.jit.script(DscintProbabilities(Dscint()).eval())
    module, layers = reduced_module(verified, FP16)
    assert layers == ["net.classifier.1"]
    fc1 = list(differentiable(module).net.classifier.children())[1]  # type: ignore[union-attr]
    x = torch.rand(2, 19032, requires_grad=True)
    g = torch.rand(2, 1024)
    (got,) = torch.autograd.grad(fc1(x), x, g)
    w = verified.state_dict()["net.classifier.1.weight"].half().float()
    torch.testing.assert_close(got, g @ w, rtol=1e-4, atol=1e-5)


def test_only_dscint_is_reduced() -> None:
    class Other(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = torch.nn.Identity()
            self.classifier = torch.nn.Sequential(torch.nn.Flatten(),
                                                  torch.nn.Linear(5000, 1000))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.features(x))

    with torchscript_deprecation_silenced():
        other = torch.jit.script(DscintProbabilities(Other()).eval())  # type: ignore[arg-type]
    with pytest.raises(PrecisionError, match="Dscint's layout only"):
        reduced_module(other, INT8)


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
        Classifier(untrained_model, precision="fp8")
    with pytest.raises(ValueError, match="precision must be one of"):
        export_torchscript(DscintProbabilities(Dscint()), Path("/nonexistent/x.pt"),
                           _meta("y"), precision="bf16")


def test_a_rung_that_moves_a_probability_too_far_fails_even_when_classes_agree() -> None:
    """Every class agrees, yet one calibrated probability moved 0.22 (seen on a trained
    network in int8): the SR and the indeterminate threshold show probabilities, so the rung
    is refused and the next one tried."""
    close = PrecisionCheck("int8", images=200, agreement=1.0, max_prob_diff=0.0093)
    far = PrecisionCheck("int8", images=200, agreement=1.0, max_prob_diff=0.22)
    assert close.passed and not far.passed
    assert "allowed 0.05" in far.summary()
    assert PrecisionCheck.from_dict(far.to_dict()) == far
