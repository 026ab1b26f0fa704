"""TorchScript export -> load -> same outputs as eager; metadata checks; classifier behaviour."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from model.classes import CLASS_NAMES
from model.classifier import Classifier, plan_views
from model.dscint import Dscint, DscintProbabilities
from model.export import (
    METADATA_FILE,
    ModelFileError,
    ModelMetadata,
    export_torchscript,
    load_torchscript,
    weights_sha256,
)
from model.preprocess import preprocess_batch


def test_export_load_gives_same_outputs_as_eager(tmp_path: Path) -> None:
    torch.manual_seed(7)
    eager = DscintProbabilities(Dscint()).eval()
    meta = ModelMetadata(version="v-test", weights_sha256="", training_data="unit test",
                         trained_on_phantoms=True, metrics={"study_accuracy": 0.5})
    path = export_torchscript(eager, tmp_path / "m.pt", meta)
    scripted, loaded = load_torchscript(path)
    x = torch.rand(3, 1, 1024, 256)
    with torch.inference_mode():
        assert torch.allclose(scripted(x), eager(x), atol=1e-6)
    assert loaded.version == "v-test"
    assert loaded.weights_sha256 == weights_sha256(eager)
    assert loaded.class_names == CLASS_NAMES
    assert loaded.input_shape == (1, 1024, 256)
    assert loaded.metrics == {"study_accuracy": 0.5}
    assert loaded.trained_on_phantoms


def _rewrite_metadata(src: Path, dst: Path, edit: dict[str, object]) -> None:
    """Copy a model zip with its metadata JSON changed (how a tampered file looks)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith(f"extra/{METADATA_FILE}"):
                doc = json.loads(data)
                doc.update(edit)
                data = json.dumps(doc).encode()
            zout.writestr(item, data)


@pytest.mark.parametrize("edit, message", [
    ({"weights_sha256": "0" * 64}, "sha256"),
    ({"format": "something-else"}, "format"),
    ({"preprocessing": {"version": 99, "rows": 1024, "cols": 256, "norm_percentile": 99.5,
                        "clip_max": 4.0}}, "preprocessing"),
    ({"classes": [{"index": 0, "name": "normal", "code_value": "1", "code_meaning": "x",
                   "scheme": "SCT"}]}, "classes"),
])
def test_load_refuses_inconsistent_metadata(untrained_model: Path, tmp_path: Path,
                                            edit: dict[str, object], message: str) -> None:
    bad = tmp_path / "bad.pt"
    _rewrite_metadata(untrained_model, bad, edit)
    with pytest.raises(ModelFileError, match=message):
        load_torchscript(bad)


def test_load_refuses_missing_and_garbage_files(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not found"):
        Classifier(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="cannot load"):
        Classifier(junk)


def test_plan_views_mirrors_a_missing_view() -> None:
    img = np.arange(12, dtype=np.float32).reshape(4, 3)
    planned = plan_views([("anterior", img)])
    assert [(v, src) for v, src, _ in planned] == [("anterior", None), ("posterior", "anterior")]
    assert np.array_equal(planned[1][2], img[:, ::-1])
    both = plan_views([("anterior", img), ("posterior", img)])
    assert [src for _, src, _ in both] == [None, None]
    unknown = plan_views([("unknown", img)])
    assert [(v, src) for v, src, _ in unknown] == [("unknown", None), ("unknown", "unknown")]
    with pytest.raises(ValueError):
        plan_views([])


def test_classifier_combines_views_by_mean(untrained_model: Path) -> None:
    clf = Classifier(untrained_model)
    rng = np.random.default_rng(0)
    ant = rng.poisson(5, (1024, 256)).astype(np.uint16)
    post = rng.poisson(5, (1024, 256)).astype(np.uint16)
    pred = clf.classify_study([("anterior", ant), ("posterior", post)])
    assert [v.view for v in pred.views] == ["anterior", "posterior"]
    per_view = clf.predict_images([ant, post])
    expected = per_view.mean(axis=0)
    assert [pred.probabilities[n] for n in CLASS_NAMES] == pytest.approx(list(expected))
    assert sum(pred.probabilities.values()) == pytest.approx(1.0)
    assert pred.predicted_class == CLASS_NAMES[int(np.argmax(expected))]


def test_classifier_on_real_ge_scan(untrained_model: Path, realdata: Path) -> None:
    ds = pydicom.dcmread(realdata / "NM1_UNC.dcm")
    clf = Classifier(untrained_model)
    pred = clf.classify_study([("unknown", ds.pixel_array)])
    assert len(pred.views) == 2 and pred.views[1].mirrored_from == "unknown"
    assert set(pred.probabilities) == set(CLASS_NAMES)
    assert sum(pred.probabilities.values()) == pytest.approx(1.0)
    batch = preprocess_batch([ds.pixel_array])
    assert batch.shape == (1, 1, 1024, 256) and float(batch.min()) >= 0.0
