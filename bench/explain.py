"""Pointing game of the evidence maps on phantoms whose lesions are known.

For each metastasis and arthritis phantom (and each view), several evidence maps of the
predicted class are computed (Grad-CAM, HiResCAM and Grad-CAM++ at two layers, gradient x
input, SmoothGrad, CBAM's spatial attention) and, for reference, the brightest input pixel and
a random pixel's chance; a hit is the map's maximum inside a lesion dilated by the camera blur:
the lesions alone rendered and blurred as the camera blurs the study, above 5% of their peak.
The lesion render repeats the generator's own steps with its private helpers (model.phantoms
has no public lesion mask): kept in step with `generate_study`; `--check` measures that each
mask lies on the study's hot spots, and nowhere better when shifted by a few pixels.

`python -m bench.explain [--model PATH] [--per-class N] [--check] [--png DIR]`; without
--model the configured model ([model].path of config.toml) is used if present, else the demo's
model is trained first. The last line is `pointing game: H/N hits (P%)` of the map the node
shows (`model.explain.evidence_maps`, what `Classifier.explain` returns).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model import phantoms as ph
from model.classifier import Classifier
from model.explain import (
    EARLY_SPLIT,
    EVIDENCE_METHOD,
    LAST_CONV_SPLIT,
    attention_map,
    class_activation_map,
    gradient_x_input,
)
from model.preprocess import preprocess_batch

LABELS = ("bone_metastasis", "arthritis")
MASK_FRACTION = 0.05  # blurred lesion activity above this share of its peak counts as lesion
SEED0 = 910_000
SHIFTS = (-4, -2, 0, 2, 4)  # pixels, for the alignment check
SMOOTHGRAD_SAMPLES, SMOOTHGRAD_NOISE = 8, 0.6  # the shown map uses 4 (model.explain)

MapFn = Callable[[torch.nn.Module, torch.Tensor, int], np.ndarray]


@dataclass
class Tally:
    """Hits, trials and time of one map kind."""

    hits: int = 0
    trials: int = 0
    seconds: float = 0.0
    studies: int = 0

    def line(self, name: str) -> str:
        share = 100.0 * self.hits / self.trials if self.trials else math.nan
        return f"{name}: {self.hits}/{self.trials} hits ({share:.0f}%)"

    def add(self, maps: np.ndarray, masks: np.ndarray) -> None:
        """Count the views whose map peaks inside their lesion mask."""
        for m, mask in zip(maps, masks, strict=True):
            if not mask.any():
                continue  # a lesion outside this view's field
            self.trials += 1
            self.hits += int(peak_inside(m, mask))


def peak_inside(evidence: np.ndarray, mask: np.ndarray) -> bool:
    """True when the map's maximum (the first one, row-major, on a tie) is a mask pixel."""
    r, c = np.unravel_index(int(np.argmax(evidence)), evidence.shape)
    return bool(mask[r, c])


def lesion_masks(label: str, seed: int, difficulty: float = 0.5) -> np.ndarray:
    """(2, 1024, 256) bool: anterior and posterior (mirrored as shown) lesion masks."""
    r_pat, r_anat, r_dis, r_noise = ph._streams(label, seed)
    when = datetime(2017, 1, 2, 8, 0) + timedelta(days=int(r_pat.integers(0, 730)),
                                                  minutes=int(r_pat.integers(0, 540)))
    patient = ph._sample_patient(r_pat, label, seed, when)
    bd = ph._body(patient, r_anat)
    sc, _ = ph._mdp_scene(bd, patient, r_anat)
    before = len(sc.bone)
    if label == "bone_metastasis":
        ph._metastases(sc, r_dis, difficulty)
    else:
        ph._arthritis(sc, r_dis, difficulty)
    lesions = [p._replace(amp=abs(p.amp)) for p in sc.bone[before:]]
    only = replace(sc, bone=lesions, organ=[], soft=[], detector=[], gains={})
    fwhm = float(r_noise.uniform(2.6, 3.6))
    views = ph._render(only, ph._Geometry.of(patient), ph._MU_TC, 1.0,
                       np.random.default_rng(0))
    lam = ph._camera(views, fwhm)
    lam = np.stack([lam[0], lam[1][:, ::-1]])
    return lam > MASK_FRACTION * max(float(lam.max()), 1e-9)


def mask_contrast(counts: np.ndarray, mask: np.ndarray,
                  shifts: Sequence[tuple[int, int]] = ((0, 0),)) -> dict[tuple[int, int], float]:
    """Per (rows, cols) shift: mean counts inside the shifted mask over the mean in a 6-pixel
    ring around it; above 1 when the mask sits on hot spots, highest at no shift when it is
    aligned with them."""
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    ring = (F.max_pool2d(t, 13, 1, 6)[0, 0].numpy() > 0) & ~mask
    out = {}
    for dr, dc in shifts:
        inside = counts[np.roll(mask, (dr, dc), axis=(0, 1))].mean()
        outside = counts[np.roll(ring, (dr, dc), axis=(0, 1))].mean()
        out[(dr, dc)] = float(inside / max(outside, 1e-9))
    return out


def check_masks(per_class: int) -> bool:
    """Print, per phantom and view, the mask's contrast and the shift that maximises it."""
    aligned = True
    for label in LABELS:
        for i in range(per_class):
            seed = SEED0 + i
            study = ph.generate_study(label, seed)
            masks = lesion_masks(label, seed)
            for view, counts, mask in zip(("ant", "post"), (study.anterior, study.posterior),
                                          masks, strict=True):
                if not mask.any():
                    continue
                c = counts.astype(np.float64)
                grid = mask_contrast(c, mask, [(dr, dc) for dr in SHIFTS for dc in SHIFTS])
                best = max(grid, key=lambda k: grid[k])
                aligned &= best == (0, 0)
                print(f"check {label} seed {seed} {view}: {int(mask.sum())} lesion pixels "
                      f"({100 * mask.mean():.2f}% of the view), contrast {grid[(0, 0)]:.2f}, "
                      f"best shift {best}")
    print(f"check: masks {'aligned' if aligned else 'NOT aligned'} with the studies' hot spots")
    return aligned


def _brightest(module: torch.nn.Module, batch: torch.Tensor, class_index: int) -> np.ndarray:
    """Reference, not an explanation: the input itself, lightly smoothed."""
    return F.avg_pool2d(batch, 5, 1, 2)[:, 0].numpy()


def methods() -> dict[str, MapFn]:
    """Every map measured, by the name printed."""
    def cam(split: int, rule: str) -> MapFn:
        return lambda m, b, c: class_activation_map(m, b, c, split, rule)
    table: dict[str, MapFn] = {}
    for split, where in ((LAST_CONV_SPLIT, "last conv, 63x15"), (EARLY_SPLIT, "conv 2, 127x31")):
        for rule in ("grad-cam", "hirescam", "grad-cam++"):
            table[f"{rule} ({where})"] = cam(split, rule)
    table["gradient x input"] = lambda m, b, c: gradient_x_input(m, b, c)
    table[f"smoothgrad x input ({SMOOTHGRAD_SAMPLES})"] = lambda m, b, c: gradient_x_input(
        m, b, c, SMOOTHGRAD_SAMPLES, SMOOTHGRAD_NOISE)
    table["CBAM spatial attention"] = lambda m, b, c: attention_map(m, b)
    table["reference: brightest input pixel"] = _brightest
    return table


def demo_model() -> Path:
    """The demo's model (node/demo/run.py's budget and seed), trained into a temporary file."""
    from node.demo.run import DEMO_TRAIN_EPOCHS, DEMO_TRAIN_PATIENTS
    from node.ops.phantoms import train_on_phantoms
    out = Path(tempfile.mkdtemp()) / "demo.pt"
    print(f"training the demo's model ({DEMO_TRAIN_PATIENTS} patients, "
          f"{DEMO_TRAIN_EPOCHS} epochs) into {out}")
    train_on_phantoms(out, patients=DEMO_TRAIN_PATIENTS, epochs=DEMO_TRAIN_EPOCHS, seed=1,
                      baseline=False, progress=False)
    return out


def _model(path: str | None) -> Path:
    if path:
        return Path(path)
    configured = Path("var/dscint/models/dscint.pt")
    return configured if configured.is_file() else demo_model()


def _write_png(out: Path, label: str, seed: int, study: ph.PhantomStudy,
               maps: np.ndarray, masks: np.ndarray) -> None:
    """Views with the lesion outline (red) and the map's peak (blue cross), map beside."""
    from PIL import Image
    panels = []
    for counts, m, mask in zip((study.anterior, study.posterior), maps, masks, strict=True):
        g = np.clip(counts / max(float(np.percentile(counts[counts > 0], 99.5)), 1.0), 0, 1)
        rgb = np.repeat((255 * (1 - g))[:, :, None], 3, axis=2).astype(np.uint8)
        inner = mask & np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) \
            & np.roll(mask, -1, 1)
        rgb[mask & ~inner] = (255, 0, 0)
        r, c = np.unravel_index(int(np.argmax(m)), m.shape)
        rgb[max(r - 6, 0):r + 7, c] = rgb[r, max(c - 6, 0):c + 7] = (0, 0, 255)
        heat = (255 * m).astype(np.uint8)
        panels += [rgb, np.stack([heat, heat // 3, 255 - heat], axis=2)]
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(panels, axis=1)).save(out / f"{label}_{seed}.png")


def run(model_path: Path, per_class: int, png: Path | None = None, compare: bool = True
        ) -> tuple[dict[str, Tally], Tally, float]:
    """Pointing game over `per_class` phantoms of each label, both views each: a tally per
    measured map (none unless `compare`), the shown map's tally and a random pixel's chance."""
    clf = Classifier(model_path, optimize=False)
    table = methods() if compare else {}
    tallies = {name: Tally() for name in table}
    shown, chance = Tally(), []
    for label in LABELS:
        for i in range(per_class):
            seed = SEED0 + i
            study = ph.generate_study(label, seed)
            masks = lesion_masks(label, seed)
            chance += [float(m.mean()) for m in masks if m.any()]
            views = [study.anterior, study.posterior]
            pred = clf.classify_study([("anterior", views[0]), ("posterior", views[1])])
            t0 = time.perf_counter()
            maps = np.stack([m for m in clf.explain(views, pred.predicted_class)
                             if m is not None])
            shown.seconds += time.perf_counter() - t0
            shown.studies += 1
            shown.add(maps, masks)
            if png is not None and i < 3:
                _write_png(png, label, seed, study, maps, masks)
            batch = preprocess_batch(views, clf.meta.preprocessing)
            top = clf.meta.class_names.index(pred.predicted_class)
            for name, fn in table.items():
                t0 = time.perf_counter()
                got = fn(clf.verified_module, batch, top)
                tallies[name].seconds += time.perf_counter() - t0
                tallies[name].studies += 1
                tallies[name].add(got, masks)
    return tallies, shown, float(np.mean(chance)) if chance else math.nan


def main(argv: list[str] | None = None) -> None:
    """Print every map's figure, then the shown map's as the last line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="TorchScript model (default: configured, else the demo's)")
    ap.add_argument("--per-class", type=int, default=20, help="phantoms per label")
    ap.add_argument("--check", action="store_true",
                    help="first check the lesion masks against the generator's studies")
    ap.add_argument("--png", type=Path, help="write the shown map of 3 phantoms per label here")
    ap.add_argument("--shown-only", action="store_true",
                    help="measure only the map the node shows, not the alternatives")
    args = ap.parse_args(argv)
    if args.check:
        check_masks(min(args.per_class, 5))
    path = _model(args.model)
    tallies, shown, chance = run(path, args.per_class, args.png, not args.shown_only)
    print(f"model {path}; {args.per_class} phantoms per label, both views; hit = map maximum "
          f"inside the blurred lesions (> {MASK_FRACTION:.0%} of their peak); a random pixel "
          f"hits {100 * chance:.1f}% of the time")
    for name, t in tallies.items():
        print(f"{t.line(name)}, {1000 * t.seconds / max(t.studies, 1):.0f} ms per study")
    print(f"shown map ({EVIDENCE_METHOD}, Classifier.explain): "
          f"{1000 * shown.seconds / max(shown.studies, 1):.0f} ms per study")
    print(shown.line("pointing game"))


if __name__ == "__main__":
    main()
