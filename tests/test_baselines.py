"""The paper's comparison networks (Table 7): one tiny training step of each through the real
trainer at the full 1024 x 256 input, and a baseline exported and served like Dscint.

torchvision and timm are the optional `baselines` extra (torch 2.14.1 + torchvision 0.29.1, a
separate 5.5 GB install that `make test` puts in .venv-baselines and runs this file with).
In an environment without them every test here is skipped, saying why.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from model.archs import BASELINE_KEYS, get_arch, unavailable_reason
from model.classifier import Classifier
from model.datasets import load_phantoms
from model.trainer import LabelledImages, TrainConfig, export_trained, train_model


@pytest.fixture(scope="module")
def four_images() -> LabelledImages:
    """Two patients' views: one patient to train on, one held out."""
    data = load_phantoms(4, seed=21)
    keep = [i for i, p in enumerate(data.patient_ids) if p in set(data.patient_ids[:3:2])]
    return LabelledImages([data.images[i] for i in keep], np.asarray(data.labels)[keep],
                          [data.patient_ids[i] for i in keep], [data.views[i] for i in keep],
                          data.description, True)


def _skip_without(key: str) -> None:
    reason = unavailable_reason(key)
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("key", BASELINE_KEYS)
def test_one_training_step_of_each_baseline(key: str, four_images: LabelledImages) -> None:
    _skip_without(key)
    pids = four_images.patient_ids
    train = np.array([i for i, p in enumerate(pids) if p == pids[0]])
    test = np.array([i for i, p in enumerate(pids) if p != pids[0]])[:1]
    cfg = TrainConfig(epochs=1, batch_size=2, arch=key, progress=False)
    res = train_model(four_images, cfg, split=(train, test))
    assert len(res.history) == 1 and np.isfinite(res.history[0]["loss"])
    assert sorted(res.trained_indices) == sorted(train)
    assert res.test_probabilities.shape == (1, 4)  # one grey channel in, four classes out
    np.testing.assert_allclose(res.test_probabilities.sum(axis=1), 1.0, atol=1e-5)


def _exported(data: LabelledImages, key: str, folder: Path) -> Path:
    """One tiny training step on the first patient, exported as the node would serve it."""
    pids = data.patient_ids
    train = np.array([i for i, p in enumerate(pids) if p == pids[0]])
    test = np.array([i for i, p in enumerate(pids) if p != pids[0]])[:1]
    cfg = TrainConfig(epochs=1, batch_size=2, arch=key, progress=False)
    res = train_model(data, cfg, split=(train, test))
    return export_trained(res, data, cfg, folder / f"{key}.pt", version=f"{key}-1")


def test_a_baseline_exports_and_serves_like_dscint(tmp_path: Path,
                                                   four_images: LabelledImages) -> None:
    _skip_without("resnet18")
    path = _exported(four_images, "resnet18", tmp_path)
    clf = Classifier(path)
    assert clf.metadata.arch == "resnet18" and clf.metadata.name == get_arch("resnet18").display
    pred = clf.classify_study([("anterior", four_images.images[0])])
    assert abs(sum(pred.probabilities.values()) - 1.0) < 1e-4


NODE_PYTHON = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python"
_LOAD_IN_NODE = """
import json, sys
from pathlib import Path
import numpy as np
from model.classifier import Classifier
clf = Classifier(Path(sys.argv[1]))
pred = clf.classify_study([("anterior", np.load(sys.argv[2]))])
import torch
print(json.dumps({"torch": torch.__version__, "probabilities": pred.probabilities}))
"""


def test_a_baseline_exported_here_loads_in_the_nodes_torch(tmp_path: Path,
                                                         four_images: LabelledImages) -> None:
    """Baselines train under torch 2.14.1 (torchvision's pin) but the node serves with the
    torch of .venv (2.13.0): the TorchScript file must load there and give the same answer."""
    _skip_without("alexnet")
    if not NODE_PYTHON.exists():
        pytest.skip(f"no node environment at {NODE_PYTHON} (make test creates it)")
    path = _exported(four_images, "alexnet", tmp_path)
    image = tmp_path / "view.npy"
    np.save(image, four_images.images[0])
    here = Classifier(path).classify_study([("anterior", four_images.images[0])])
    out = subprocess.run([str(NODE_PYTHON), "-c", _LOAD_IN_NODE, str(path), str(image)],
                         capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    there = json.loads(out.stdout.strip().splitlines()[-1])
    assert there["torch"].split("+")[0] != torch.__version__.split("+")[0]
    for name, p in here.probabilities.items():
        assert abs(there["probabilities"][name] - p) < 1e-4, (name, p, there)
