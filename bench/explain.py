"""Pointing game of the evidence maps on phantoms whose lesions are known.

For each metastasis and arthritis phantom (and each view), the evidence map of the predicted
class (Grad-CAM, the map the result image shows) and, for comparison, CBAM's spatial attention
are computed; a hit is the map's maximum inside a lesion dilated by the camera blur: the
lesions alone rendered and blurred as the camera blurs the study, above 5% of their peak.
The lesion render repeats the generator's own steps with its private helpers (model.phantoms
has no public lesion mask): kept in step with `generate_study`, checked by comparing the view
this makes with the generator's (`--check`).

`python -m bench.explain [--model PATH] [--per-class N]`; without --model the configured model
([model].path of config.toml) is used if present, else the demo's model is trained first.
The last line is `pointing game: H/N hits (P%)` (Grad-CAM).
"""

from __future__ import annotations

import argparse
import math
import tempfile
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from model import phantoms as ph
from model.classifier import Classifier
from model.explain import attention_map, grad_cam
from model.preprocess import preprocess_batch

LABELS = ("bone_metastasis", "arthritis")
MASK_FRACTION = 0.05  # blurred lesion activity above this share of its peak counts as lesion
SEED0 = 910_000


@dataclass
class Tally:
    """Hits and trials of one map kind."""

    hits: int = 0
    trials: int = 0

    def line(self, name: str) -> str:
        share = 100.0 * self.hits / self.trials if self.trials else math.nan
        return f"{name}: {self.hits}/{self.trials} hits ({share:.0f}%)"


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


def _model(path: str | None) -> Path:
    if path:
        return Path(path)
    configured = Path("var/dscint/models/dscint.pt")
    if configured.is_file():
        return configured
    from node.demo.run import DEMO_TRAIN_EPOCHS, DEMO_TRAIN_PATIENTS
    from node.ops.phantoms import train_on_phantoms
    out = Path(tempfile.mkdtemp()) / "demo.pt"
    print(f"training the demo's model ({DEMO_TRAIN_PATIENTS} patients, "
          f"{DEMO_TRAIN_EPOCHS} epochs) into {out}")
    train_on_phantoms(out, patients=DEMO_TRAIN_PATIENTS, epochs=DEMO_TRAIN_EPOCHS, seed=1,
                      baseline=False, progress=False)
    return out


def run(model_path: Path, per_class: int) -> tuple[Tally, Tally]:
    """Pointing game over `per_class` phantoms of each label, both views each."""
    clf = Classifier(model_path, optimize=False)
    cam, att = Tally(), Tally()
    for label in LABELS:
        for i in range(per_class):
            seed = SEED0 + i
            study = ph.generate_study(label, seed)
            masks = lesion_masks(label, seed)
            batch = preprocess_batch([study.anterior, study.posterior], clf.meta.preprocessing)
            pred = clf.classify_study([("anterior", study.anterior),
                                       ("posterior", study.posterior)])
            top = clf.meta.class_names.index(pred.predicted_class)
            for tally, maps in ((cam, grad_cam(clf.verified_module, batch, top)),
                                (att, attention_map(clf.verified_module, batch))):
                for m, mask in zip(maps, masks, strict=True):
                    if not mask.any():
                        continue  # a lesion outside this view's field
                    r, c = np.unravel_index(int(np.argmax(m)), m.shape)
                    tally.trials += 1
                    tally.hits += int(mask[r, c])
    return cam, att


def main(argv: list[str] | None = None) -> None:
    """Print the CBAM attention figure, then the Grad-CAM one as the last line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="TorchScript model (default: configured, else the demo's)")
    ap.add_argument("--per-class", type=int, default=20, help="phantoms per label")
    ap.add_argument("--check", action="store_true",
                    help="also check the lesion render against the generator's views")
    args = ap.parse_args(argv)
    if args.check:
        for label in LABELS:
            mask = lesion_masks(label, SEED0)
            print(f"{label} seed {SEED0}: lesion pixels {int(mask.sum())} "
                  f"(anterior {int(mask[0].sum())}, posterior {int(mask[1].sum())})")
    path = _model(args.model)
    cam, att = run(path, args.per_class)
    print(f"model {path}; {args.per_class} phantoms per label, both views; hit = map maximum "
          f"inside the blurred lesions (> {MASK_FRACTION:.0%} of their peak)")
    print(att.line("CBAM spatial attention"))
    print(cam.line("pointing game"))


if __name__ == "__main__":
    main()
