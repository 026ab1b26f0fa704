"""The report folder a retrain writes: tables laid out like the paper's and the figures.

- metrics.md / metrics.json: Table 6 (overall metrics), Figure 5 (per class), Tables 8 and 9
  (networks compared, AUC), calibration and speed, all mean ± sd over the runs;
- roc.png (Figure 8), confusion_<net>.png (Figure 9), training_curves.png (Figure 4),
  radar.png (Figure 7), reliability.png (calibration);
- config.json (exact configuration, versions, command line) and data.json (what was trained on).

Figures use matplotlib's object API with the Agg canvas created per figure: no pyplot, no
global backend switch, nothing at import time.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.archs import get_arch
from model.classes import CLASS_NAMES
from model.evaluate import (
    OVERALL_KEYS,
    PER_CLASS_KEYS,
    ArchSummary,
    PromotionDecision,
    RunRecord,
    Stat,
    summarize,
    summarize_trivial,
)

log = logging.getLogger(__name__)

METRIC_TITLES = {"accuracy": "Accuracy", "precision": "Precision", "recall": "Recall",
                 "specificity": "Specificity", "f1": "F-1 score", "auc": "AUC"}
PAPER_TABLE8 = {  # Lin et al. 2021, Tables 8 and 9, on their private augmented data set
    "alexnet": (0.9652, 0.9641, 0.9643, 0.9884, 0.9715, 0.9973),
    "resnet18": (0.9314, 0.9316, 0.9293, 0.9767, 0.9303, 0.9877),
    "vgg16": (0.9550, 0.9538, 0.9556, 0.9850, 0.9541, 0.9921),
    "inception_v4": (0.8384, 0.8367, 0.8348, 0.9420, 0.8345, 0.9532),
    "densenet121": (0.9371, 0.9391, 0.9332, 0.9781, 0.9309, 0.9838),
    "dscint": (0.9801, 0.9795, 0.9791, 0.9933, 0.9792, 0.9985),
}


@dataclass
class ReportInputs:
    """Everything a report is made from."""

    records: Sequence[RunRecord]
    config: Mapping[str, Any]
    data: Mapping[str, Any]
    primary: str = "dscint"
    promotion: PromotionDecision | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _stat_json(s: Stat) -> dict[str, float | int]:
    return {"mean": s.mean, "sd": s.sd, "n": s.n}


def summaries(records: Sequence[RunRecord]) -> dict[str, ArchSummary]:
    """One summary per network, in the order the networks were run."""
    archs = list(dict.fromkeys(r.arch for r in records))
    return {a: summarize([r for r in records if r.arch == a]) for a in archs}


def _summary_json(s: ArchSummary) -> dict[str, Any]:
    return {
        "arch": s.arch, "name": get_arch(s.arch).display, "runs": s.runs,
        "image": {k: _stat_json(v) for k, v in s.image.items()},
        "study": {k: _stat_json(v) for k, v in s.study.items()},
        "per_class": {c: {k: _stat_json(v) for k, v in m.items()}
                      for c, m in s.per_class.items()},
        "image_ece": _stat_json(s.image_ece),
        "train_images_per_second": _stat_json(s.images_per_second),
        "seconds_per_run": _stat_json(s.seconds),
        "confusion_summed_over_runs": s.confusion,
    }


def _run_json(r: RunRecord) -> dict[str, Any]:
    ev = r.evaluation
    return {"arch": r.arch, "run": r.run, "seed": r.seed, "metrics": ev.headline(),
            "image_per_class": {c: asdict(m) for c, m in ev.image.per_class.items()},
            "image_confusion": ev.image.confusion, "study_confusion": ev.study.confusion,
            "held_out_images": ev.image.n, "held_out_studies": ev.study.n,
            "train_images": len(r.train_index), "history": r.history,
            "train_images_per_second": r.images_per_second, "seconds": r.seconds,
            "trivial_baseline": None if r.trivial is None else
            {k: getattr(r.trivial, k) for k in OVERALL_KEYS},
            "calibration": None if r.calibration is None else r.calibration.to_dict()}


def metrics_json(inp: ReportInputs) -> dict[str, Any]:
    """The machine-readable form of every table."""
    sums = summaries(inp.records)
    trivial = summarize_trivial(inp.records)
    return {
        "primary": inp.primary,
        "networks": {a: _summary_json(s) for a, s in sums.items()},
        "trivial_baseline_image": None if trivial is None else
        {k: _stat_json(v) for k, v in trivial.items()},
        "runs": [_run_json(r) for r in inp.records],
        "promotion": None if inp.promotion is None else inp.promotion.to_dict(),
        "paper_table8_9": {a: dict(zip(OVERALL_KEYS, v, strict=True))
                           for a, v in PAPER_TABLE8.items()},
        **inp.extra,
    }


# --- Markdown ----------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return [*out, ""]


def _overall_table(s: ArchSummary) -> list[str]:
    """Table 6: one row per evaluation level."""
    rows = [[level] + [getattr(s, attr)[k].fmt() for k in OVERALL_KEYS]
            for level, attr in (("held-out images", "image"), ("held-out studies", "study"))]
    return _table(["", *[METRIC_TITLES[k] for k in OVERALL_KEYS]], rows)


def _per_class_table(s: ArchSummary) -> list[str]:
    """Figure 5 as a table: per-class one-vs-rest metrics, image level."""
    rows = [[c] + [s.per_class[c][k].fmt() for k in PER_CLASS_KEYS] for c in CLASS_NAMES]
    return _table(["class", *[METRIC_TITLES[k] for k in PER_CLASS_KEYS]], rows)


def _comparison_table(sums: Mapping[str, ArchSummary], trivial: Mapping[str, Stat] | None,
                      level: str) -> list[str]:
    """Table 8 (+ Table 9's AUC row): metrics as rows, networks as columns."""
    names = [get_arch(a).display for a in sums]
    header = ["", *names] + (["trivial baseline (logistic regression)"]
                             if trivial and level == "image" else [])
    rows = []
    for k in OVERALL_KEYS:
        row = [METRIC_TITLES[k]] + [getattr(s, level)[k].fmt() for s in sums.values()]
        if trivial and level == "image":
            row.append(trivial[k].fmt())
        rows.append(row)
    return _table(header, rows)


def _speed_table(sums: Mapping[str, ArchSummary]) -> list[str]:
    rows = [[get_arch(a).display, s.images_per_second.fmt(2), s.seconds.fmt(1),
             s.image_ece.fmt()] for a, s in sums.items()]
    return _table(["network", "training images/s", "seconds per run", "ECE (image)"], rows)


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4f}"


def _calibration_section(records: Sequence[RunRecord], arch: str) -> list[str]:
    """Temperature scaling and the indeterminate band per run of the primary network; run 0's
    temperature and threshold are the ones stored in the exported model."""
    cals = [(r.run, r.calibration) for r in records if r.arch == arch and r.calibration]
    if not cals:
        return []
    target = cals[0][1].target_accuracy
    rows = [[str(run), f"{c.temperature:.3f}", f"{c.threshold:.3f}", _fmt(c.image_ece_before),
             _fmt(c.image_ece_after), _fmt(c.study_ece_before), _fmt(c.study_ece_after),
             f"{c.indeterminate_share:.1%}", _fmt(c.accuracy_called)] for run, c in cals]
    return [f"## Calibration and the indeterminate band, {get_arch(arch).display}", "",
            "Temperature T fitted on the held-out part (minimum NLL). ECE after: cross-fitted "
            "(T fitted on one half of the held-out patients, measured on the other). Threshold: "
            f"the lowest (>= 0.5) at which the held-out studies called reach {target:.0%} "
            "accuracy; below it a study is reported indeterminate (1.0: the target was not "
            "reached, every study is indeterminate).", "",
            *_table(["run", "T", "threshold", "ECE image before", "ECE image after",
                     "ECE study before", "ECE study after", "indeterminate studies",
                     "accuracy on the rest"], rows)]


def _paper_table() -> list[str]:
    names = [get_arch(a).display for a in PAPER_TABLE8]
    rows = [[METRIC_TITLES[k]] + [f"{PAPER_TABLE8[a][i]:.4f}" for a in PAPER_TABLE8]
            for i, k in enumerate(OVERALL_KEYS)]
    return _table(["", *names], rows)


def metrics_markdown(inp: ReportInputs) -> str:
    """Human-readable report with the paper's table layouts."""
    sums = summaries(inp.records)
    trivial = summarize_trivial(inp.records)
    prim = sums.get(inp.primary) or next(iter(sums.values()))
    runs = prim.runs
    lines = [f"# Retraining report: {get_arch(prim.arch).display}", "",
             f"Data: {inp.data.get('description', '')}. "
             f"{inp.data.get('patients', '?')} patients, {inp.data.get('images', '?')} images.",
             f"Protocol: {runs} run(s), each a fresh training with its own seed and patient-level "
             "split; values are mean ± sd over runs (sample sd). Augmentation (paper §2.2) is "
             "applied only to the training part of each split.", ""]
    if inp.data.get("trained_on_phantoms"):
        lines += ["> Trained and tested on **simulated phantoms**: these numbers say how the "
                  "pipeline works, not how a model would do on patients.", ""]
    lines += [f"## Overall metrics (Table 6 layout), {get_arch(prim.arch).display}", ""]
    lines += _overall_table(prim)
    lines += [f"## Per-class metrics (Figure 5), {get_arch(prim.arch).display}, images", ""]
    lines += _per_class_table(prim)
    lines += ["## Networks compared on held-out images (Tables 8 and 9 layout)", ""]
    lines += _comparison_table(sums, trivial, "image")
    lines += ["## Networks compared on held-out studies (views averaged, as the node serves)",
              ""]
    lines += _comparison_table(sums, None, "study")
    lines += ["## Training speed and calibration", ""]
    lines += _speed_table(sums)
    lines += _calibration_section(inp.records, prim.arch)
    if inp.promotion is not None:
        p = inp.promotion
        lines += ["## Promotion", "",
                  f"{'Promoted' if p.promote else 'Not promoted'}: {p.reason}.", ""]
    lines += ["## The paper's figures, for reference (private data, augmented before splitting)",
              ""]
    lines += _paper_table()
    lines += ["Figures: roc.png, confusion_<network>.png, training_curves.png, radar.png, "
              "reliability.png. Configuration: config.json; data: data.json; every run: "
              "metrics.json.", ""]
    return "\n".join(lines)


# --- figures -----------------------------------------------------------------------------


def _figure(width: float, height: float, polar: bool = False) -> Any:
    """A Figure with its own Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    return path


def _macro_roc(r: RunRecord) -> tuple[np.ndarray, np.ndarray]:
    grid = np.linspace(0.0, 1.0, 201)
    tprs = [np.interp(grid, c.fpr, c.tpr) for c in r.evaluation.image_roc.values()
            if not math.isnan(c.auc)]
    return grid, np.mean(tprs, axis=0) if tprs else np.full_like(grid, np.nan)


def plot_roc(records: Sequence[RunRecord], primary: str, path: Path) -> Path:
    """Left: per-class ROC of the primary network (run 0); right: macro ROC per network."""
    fig = _figure(11, 5)
    ax1, ax2 = fig.subplots(1, 2)
    first = next(r for r in records if r.arch == primary)
    for name, c in first.evaluation.image_roc.items():
        ax1.plot(c.fpr, c.tpr, label=f"{name} (AUC {c.auc:.3f})")
    ax1.set_title(f"{get_arch(primary).display}, run 0, one-vs-rest")
    for arch in dict.fromkeys(r.arch for r in records):
        r0 = next(r for r in records if r.arch == arch)
        fpr, tpr = _macro_roc(r0)
        ax2.plot(fpr, tpr, label=f"{get_arch(arch).display} (AUC {r0.evaluation.image.auc:.3f})")
    ax2.set_title("Macro-average ROC per network, run 0")
    for ax in (ax1, ax2):
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_confusion(s: ArchSummary, path: Path) -> Path:
    """Confusion matrix summed over runs (Figure 9)."""
    cm = np.asarray(s.confusion)
    fig = _figure(5.5, 4.8)
    ax = fig.subplots()
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax)
    ticks = range(len(CLASS_NAMES))
    ax.set_xticks(list(ticks), CLASS_NAMES, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(list(ticks), CLASS_NAMES, fontsize=8)
    for i in ticks:
        for j in ticks:
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{get_arch(s.arch).display}: held-out images, {s.runs} run(s) summed")
    return _save(fig, path)


def plot_training(records: Sequence[RunRecord], path: Path) -> Path:
    """Loss and training accuracy per epoch, mean over runs, one line per network (Fig. 4)."""
    fig = _figure(11, 4.5)
    ax1, ax2 = fig.subplots(1, 2)
    for arch in dict.fromkeys(r.arch for r in records):
        hists = [r.history for r in records if r.arch == arch and r.history]
        if not hists:
            continue
        n = min(len(h) for h in hists)
        epochs = np.arange(1, n + 1)
        for ax, key in ((ax1, "loss"), (ax2, "train_accuracy")):
            ax.plot(epochs, np.mean([[h[e][key] for e in range(n)] for h in hists], axis=0),
                    marker="o", label=get_arch(arch).display)
    ax1.set_title("training loss")
    ax2.set_title("training accuracy (augmented batches)")
    for ax in (ax1, ax2):
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_radar(sums: Mapping[str, ArchSummary], path: Path) -> Path:
    """Per-class specificity and F1, one polygon per network (Figure 7)."""
    fig = _figure(11, 5)
    angles = np.linspace(0, 2 * np.pi, len(CLASS_NAMES), endpoint=False)
    closed = np.r_[angles, angles[:1]]
    for i, key in enumerate(("specificity", "f1")):
        ax = fig.add_subplot(1, 2, i + 1, projection="polar")
        for arch, s in sums.items():
            vals = [s.per_class[c][key].mean for c in CLASS_NAMES]
            ax.plot(closed, [*vals, vals[0]], marker="o", label=get_arch(arch).display)
        ax.set_xticks(angles, CLASS_NAMES, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(METRIC_TITLES[key])
        ax.legend(loc="lower left", bbox_to_anchor=(-0.25, -0.2), fontsize=7)
    return _save(fig, path)


def plot_reliability(records: Sequence[RunRecord], primary: str, path: Path) -> Path:
    """Reliability diagram of the primary network's run 0 (top-class confidence)."""
    first = next(r for r in records if r.arch == primary)
    bins = [b for b in first.evaluation.reliability if b.count]
    fig = _figure(5.5, 5)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    ax.bar([(b.lower + b.upper) / 2 for b in bins], [b.accuracy for b in bins],
           width=[b.upper - b.lower for b in bins], alpha=0.6, edgecolor="black",
           label="accuracy per bin")
    ax.plot([b.confidence for b in bins], [b.accuracy for b in bins], "o-", color="C1",
            label="accuracy at the bin's mean confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("top-class probability")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{get_arch(primary).display}: ECE {first.evaluation.image_ece:.3f}")
    ax.legend(fontsize=8)
    return _save(fig, path)


# --- the folder --------------------------------------------------------------------------


def write_report(out: Path, inp: ReportInputs) -> list[Path]:
    """Write every table and figure under `out`; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    sums = summaries(inp.records)
    primary = inp.primary if inp.primary in sums else next(iter(sums))
    written = []
    for name, doc in (("metrics.json", metrics_json(inp)), ("config.json", dict(inp.config)),
                      ("data.json", dict(inp.data))):
        p = out / name
        p.write_text(json.dumps(_finite(doc), indent=2, default=_json_default,
                                allow_nan=False) + "\n")
        written.append(p)
    md = out / "metrics.md"
    md.write_text(metrics_markdown(inp))
    written.append(md)
    written.append(plot_roc(inp.records, primary, out / "roc.png"))
    written += [plot_confusion(s, out / f"confusion_{a}.png") for a, s in sums.items()]
    written.append(plot_training(inp.records, out / "training_curves.png"))
    written.append(plot_radar(sums, out / "radar.png"))
    written.append(plot_reliability(inp.records, primary, out / "reliability.png"))
    log.info("report written to %s (%d files)", out, len(written))
    return written


def _json_default(obj: Any) -> Any:
    """numpy scalars/arrays, paths and NaN-safe floats in JSON."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def _finite(obj: Any) -> Any:
    """NaN/inf -> None, so the JSON is strict (an undefined AUC is null, not NaN)."""
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _finite(obj.tolist())
    return obj
