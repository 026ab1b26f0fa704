"""Evidence maps (model/explain.py) and the pointing game's plumbing (bench/explain.py).

The maps are checked on a tiny network with Dscint's layout (16 feature layers, CBAM at 3,
then a classifier) whose weights are set by hand so that one class's logit is the amount of
bright spots in the image: every map of that class must peak on a planted bright lesion, in
both images of a batch, and on a view's own pixel grid whatever its matrix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bench.explain import (
    Tally,
    lesion_masks,
    mask_contrast,
    peak_inside,
)
from bench.explain import main as bench_main
from model.classifier import Classifier
from model.dscint import HybridAttention
from model.explain import (
    CAM_RULES,
    EARLY_SPLIT,
    LAST_CONV_SPLIT,
    ExplainError,
    attention_map,
    class_activation_map,
    evidence_maps,
    gradient_x_input,
    to_view_grid,
)
from model.export import ModelMetadata, export_torchscript, torchscript_deprecation_silenced
from model.phantoms import generate_study

BRIGHT = 1  # the class whose logit is the bright spots' sum; class 0's is zero
BACKGROUND = 1.0  # the first convolution's bias removes this much: noise below it is dark


def _identity_conv() -> nn.Conv2d:
    conv = nn.Conv2d(1, 1, 3, padding=1)
    nn.init.dirac_(conv.weight)
    assert conv.bias is not None
    nn.init.zeros_(conv.bias)
    return conv


class TinyBrightSpot(nn.Module):
    """Dscint's layout, one channel, weights by hand: class 1 = sum of what exceeds the
    background (after pooling), any input size."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        first = _identity_conv()
        assert first.bias is not None
        nn.init.constant_(first.bias, -BACKGROUND)
        attention = HybridAttention(1, reduction=1, kernel_size=7)
        for p in attention.parameters():
            nn.init.zeros_(p)  # sigmoid(0): a uniform 0.5 weighting, no shift of the peak
        self.features = nn.Sequential(
            first, nn.ReLU(inplace=True), nn.MaxPool2d(2), attention,
            _identity_conv(), nn.BatchNorm2d(1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            _identity_conv(), nn.ReLU(inplace=True), _identity_conv(), nn.ReLU(inplace=True),
            _identity_conv(), nn.BatchNorm2d(1), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=1, padding=1))
        head = nn.Linear(1, classes)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        with torch.no_grad():
            head.weight[BRIGHT, 0] = 100.0
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class Probabilities(nn.Module):
    """As the exported wrapper: `net` inside, softmax out."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)


def _tiny() -> torch.jit.ScriptModule:
    with torchscript_deprecation_silenced():
        return torch.jit.script(Probabilities(TinyBrightSpot()).eval())


def _planted(rows: int, cols: int, spots: list[tuple[int, int]], seed: int = 0) -> torch.Tensor:
    """(N, 1, rows, cols) noise in [0, 0.8] and one bright 7 x 7 spot per image."""
    gen = torch.Generator().manual_seed(seed)
    batch = torch.rand(len(spots), 1, rows, cols, generator=gen) * 0.8
    for i, (r, c) in enumerate(spots):
        batch[i, 0, r - 3:r + 4, c - 3:c + 4] = 4.0
    return batch


def _peak(m: np.ndarray) -> tuple[int, int]:
    r, c = np.unravel_index(int(np.argmax(m)), m.shape)
    return int(r), int(c)


SPOTS = [(200, 20), (40, 50)]


@pytest.mark.parametrize("split", [LAST_CONV_SPLIT, EARLY_SPLIT])
@pytest.mark.parametrize("rule", sorted(CAM_RULES))
def test_class_activation_maps_peak_on_the_planted_spot(split: int, rule: str) -> None:
    batch = _planted(256, 64, SPOTS)
    maps = class_activation_map(_tiny(), batch, BRIGHT, split, rule)
    assert maps.shape == (2, 256, 64) and maps.dtype == np.float32
    for m, (r, c) in zip(maps, SPOTS, strict=True):
        assert float(m.min()) >= 0.0 and float(m.max()) == pytest.approx(1.0)
        pr, pc = _peak(m)
        assert abs(pr - r) <= 6 and abs(pc - c) <= 6, (rule, split, (pr, pc), (r, c))


def test_gradient_maps_and_the_shown_map_peak_on_the_planted_spot() -> None:
    batch = _planted(256, 64, SPOTS)
    module = _tiny()
    for maps in (gradient_x_input(module, batch, BRIGHT),
                 gradient_x_input(module, batch, BRIGHT, samples=3, noise=0.1),
                 evidence_maps(module, batch, BRIGHT)):
        assert maps.shape == (2, 256, 64)
        for m, (r, c) in zip(maps, SPOTS, strict=True):
            pr, pc = _peak(m)
            assert abs(pr - r) <= 6 and abs(pc - c) <= 6
            assert float(m.max()) == pytest.approx(1.0) and float(m.min()) >= 0.0


def test_a_class_without_evidence_gets_an_all_zero_map_not_nan() -> None:
    maps = class_activation_map(_tiny(), _planted(128, 32, [(60, 10)]), 0)
    assert np.isfinite(maps).all() and float(maps.max()) == 0.0


def test_cbam_attention_map_is_scaled_to_one() -> None:
    maps = attention_map(_tiny(), _planted(128, 32, [(60, 10)]))
    assert maps.shape == (1, 128, 32) and float(maps.max()) == pytest.approx(1.0)
    assert float(maps.min()) >= 0.0


class _Flat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)


class _Short(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = TinyBrightSpot()
        self.net.features = nn.Sequential(*list(self.net.features.children())[:8])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)


def test_explain_errors() -> None:
    batch = _planted(64, 16, [(30, 8)])
    with pytest.raises(ExplainError, match="not a Dscint"):
        class_activation_map(_Flat(), torch.rand(1, 1, 4, 4), 0)
    with pytest.raises(ExplainError, match="expected Dscint's 16"):
        class_activation_map(_Short(), batch, 0)
    with pytest.raises(ExplainError, match="expected Dscint's 16"):
        gradient_x_input(_Short(), batch, 0)
    with pytest.raises(ExplainError, match=r"outside net\.features"):
        class_activation_map(_tiny(), batch, 0, split=16)
    with pytest.raises(ExplainError, match="class index 7"):
        class_activation_map(_tiny(), batch, 7)
    with pytest.raises(ExplainError, match="class index -1"):
        gradient_x_input(_tiny(), batch, -1)
    with pytest.raises(ExplainError, match="unknown map rule"):
        class_activation_map(_tiny(), batch, 0, rule="lime")
    net = TinyBrightSpot()
    net.features[3] = nn.Identity()  # no CBAM where Dscint has it
    plain = Probabilities(net)
    with pytest.raises(ExplainError, match="not a CBAM"):
        attention_map(plain, batch)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    meta = ModelMetadata(version="tiny-0", weights_sha256="",
                         training_data="hand-set weights: responds to bright spots",
                         trained_on_phantoms=True)
    return export_torchscript(Probabilities(TinyBrightSpot()),
                              tmp_path_factory.mktemp("tiny") / "tiny.pt", meta)


@pytest.mark.parametrize(("shape", "spot"), [((1024, 256), (700, 60)),
                                             ((600, 200), (450, 150)),  # padded rows
                                             ((512, 512), (100, 400)),  # padded rows, square
                                             ((1024, 128), (300, 30))])  # padded columns
def test_classifier_maps_lie_on_the_views_own_pixel_grid(
        tiny_model: Path, shape: tuple[int, int], spot: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    view = rng.poisson(20.0, shape).astype(np.float64)
    r, c = spot
    view[r - 4:r + 5, c - 4:c + 5] = 5000.0
    (m,) = Classifier(tiny_model, optimize=False).explain([view], "bone_metastasis")
    assert m is not None and m.shape == shape and m.dtype == np.float32
    pr, pc = _peak(m)
    assert abs(pr - r) <= 8 and abs(pc - c) <= 8, ((pr, pc), spot)
    assert float(m.max()) <= 1.0 and float(m.min()) >= 0.0


def test_classifier_explain_without_a_dscint_layout_gives_none(tmp_path: Path,
                                                               tiny_model: Path) -> None:
    clf = Classifier(tiny_model, optimize=False)
    assert clf.explain([], "normal") == []
    with torchscript_deprecation_silenced():
        clf._verified = torch.jit.script(_Flat())  # a foreign layout
    assert clf.explain([np.ones((1024, 256))] * 2, "normal") == [None, None]


def test_to_view_grid_undoes_the_padding() -> None:
    grid = np.zeros((1024, 256), np.float32)
    assert to_view_grid(grid, (1024, 256)) is grid
    grid[512, 128] = 1.0  # the centre of the input is the centre of any view
    for shape in ((600, 200), (1024, 128), (2048, 512)):
        back = to_view_grid(grid, shape)
        pr, pc = _peak(back)
        assert abs(pr - shape[0] // 2) <= 2 and abs(pc - shape[1] // 2) <= 2


def test_pointing_game_counts_a_peak_inside_the_mask() -> None:
    mask = np.zeros((2, 20, 10), bool)
    mask[0, 5:8, 2:4] = True  # view 1 has no lesion: not a trial
    maps = np.zeros((2, 20, 10), np.float32)
    maps[0, 6, 3] = 1.0
    maps[1, 0, 0] = 1.0
    tally = Tally()
    tally.add(maps, mask)
    assert (tally.hits, tally.trials) == (1, 1)
    maps[0, 6, 3], maps[0, 15, 9] = 0.5, 1.0  # the peak moves out of the lesion
    tally.add(maps, mask)
    assert (tally.hits, tally.trials) == (1, 2)
    assert tally.line("x") == "x: 1/2 hits (50%)"
    assert not peak_inside(np.zeros((20, 10)), mask[0])  # a flat map peaks at (0, 0)


def test_lesion_masks_lie_on_the_phantoms_hot_spots() -> None:
    study = generate_study("bone_metastasis", 910_001)
    masks = lesion_masks("bone_metastasis", 910_001)
    assert masks.shape == (2, 1024, 256) and 0 < masks.mean() < 0.05
    for counts, mask in zip((study.anterior, study.posterior), masks, strict=True):
        c = counts.astype(np.float64)
        got = mask_contrast(c, mask, [(0, 0), (4, 0), (-4, 0), (0, 4), (0, -4)])
        assert got[(0, 0)] > 1.3
        assert max(got, key=lambda k: got[k]) == (0, 0), got


def test_bench_prints_the_pointing_game_last(tiny_model: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    bench_main(["--model", str(tiny_model), "--per-class", "1", "--shown-only"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("pointing game: ") and lines[-1].endswith("%)")
    hits, trials = lines[-1].split(": ")[1].split(" hits")[0].split("/")
    assert int(trials) == 4 and 0 <= int(hits) <= 4
