"""`python -m node retrain`: the paper's protocol on the user's data, a report folder, and the
model registry with promotion and rollback (the `models` command: node.ops.models).

node/ joins the layers here: it reads DICOM (node.dicom) and the node's database (storage)
and hands plain arrays to model/, which trains, evaluates and writes the report; the registry
(storage.registry) records every model and which one a running node serves.

Promotion rule: the candidate (run 0 of the chosen network) and the model serving now are
evaluated on the same held-out studies (run 0's test part); the candidate is promoted when its
metric (default macro F1 at study level) is at least the current one's plus a margin, or when
forced with --promote. A running node notices the new serving version within seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from rich.console import Console

from node.config import Config
from node.dicom.pixels import DecodeError
from node.dicom.views import extract_views
from node.ops.models import promotion_gate
from storage.db import Database
from storage.feedback import feedback_labels
from storage.intake import study_instances, study_patient_keys
from storage.registry import (
    ModelRecord,
    NewModel,
    RegistryError,
    list_models,
    model_file_path,
    promote,
    register_model,
    serving_model,
    verify_model_file,
)

if TYPE_CHECKING:  # model/ (torch, sklearn) is imported where used: `status` stays fast
    from model.datasets import LabelRow, ViewRecord
    from model.evaluate import Evaluation, PromotionDecision, Protocol, RunRecord
    from model.trainer import LabelledImages, TrainConfig

log = logging.getLogger(__name__)


# --- data sources ------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSources:
    """Where the training data comes from; several sources are concatenated."""

    phantoms: int = 0
    phantom_seed: int = 0
    difficulty: float = 0.5
    dicom: Path | None = None
    from_db: bool = False
    labels: Path | None = None
    png: Path | None = None
    class_map: dict[str, str] | None = None
    bs80k: Path | None = None
    bs80k_labels: Path | None = None
    label_map: dict[str, str] | None = None


def _patient_hash(value: str) -> str:
    """Patient IDs group views for the split but never leave this function in clear."""
    return "pt-" + hashlib.sha256(value.encode()).hexdigest()[:16]


def _dicom_views(path: Path, label: str, patient: str | None, where: str) -> list[ViewRecord]:
    """Every view of one file, labelled; the patient from the CSV, PatientID or study UID."""
    from model.datasets import DatasetError, ViewRecord
    if not path.is_file():
        raise DatasetError(f"{where}: file not found: {path}")
    try:
        ds = dcmread(path)
        views = extract_views(ds)
    except (InvalidDicomError, DecodeError, OSError, ValueError) as exc:
        raise DatasetError(f"{where}: cannot read DICOM {path}: {exc}") from exc
    pid = patient or str(ds.get("PatientID", "") or "") or str(ds.get("StudyInstanceUID", path))
    return [ViewRecord(v.pixels, label, _patient_hash(pid), v.view.value,
                       f"{path}" + (f" frame {v.frame_number}" if v.frame_number else ""))
            for v in views]


def _index_dicom_folder(folder: Path) -> dict[str, list[Path]]:
    """StudyInstanceUID -> files, reading headers only; non-DICOM files are skipped."""
    index: dict[str, list[Path]] = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.suffix.lower() in {".csv", ".txt", ".png", ".jpg", ".json"}:
            continue
        try:
            ds = dcmread(p, stop_before_pixels=True,
                         specific_tags=["StudyInstanceUID", "PatientID"])
        except (InvalidDicomError, OSError):
            continue
        uid = str(ds.get("StudyInstanceUID", "") or "")
        if uid:
            index.setdefault(uid, []).append(p)
    return index


def _resolve_row_path(row: LabelRow, csv_dir: Path, folder: Path) -> Path:
    p = Path(row.key).expanduser()
    if p.is_absolute():
        return p
    for base in (folder, csv_dir):
        if (base / p).exists():
            return base / p
    return folder / p


def dicom_folder_data(folder: Path, labels: Path) -> LabelledImages:
    """A folder of DICOM studies with a CSV of StudyInstanceUID (or file path) -> class."""
    from model.datasets import DatasetError, assemble, read_label_csv
    if not folder.is_dir():
        raise DatasetError(f"DICOM folder not found: {folder}")
    rows = read_label_csv(labels)
    index = _index_dicom_folder(folder) if any(r.key_kind == "study_uid" for r in rows) else {}
    records: list[ViewRecord] = []
    for row in rows:
        if row.key_kind == "path":
            paths = [_resolve_row_path(row, labels.parent, folder)]
        else:
            paths = index.get(row.key, [])
            if not paths:
                raise DatasetError(f"{row.where}: study {row.key} not found under {folder}")
        for p in paths:
            records += _dicom_views(p, row.label, row.patient_id, row.where)
    return assemble(records, f"DICOM folder {folder} labelled by {labels.name} "
                             f"({len(rows)} labelled row(s))")


def feedback_rows(db: Database) -> list[LabelRow]:
    """The physicians' labels (`python -m node feedback`) as label rows, by study UID."""
    from model.datasets import LabelRow, class_name
    rows = []
    for i, (uid, label) in enumerate(sorted(feedback_labels(db).items()), start=1):
        where = f"feedback for study {uid}"
        rows.append(LabelRow(i, "study_uid", uid, class_name(label, where), None, where))
    return rows


def database_data(db: Database, labels: Path | None) -> LabelledImages:
    """Studies the node has received, labelled by a CSV of StudyInstanceUID -> class, or
    (no CSV) by the physicians' feedback. A CSV row for a study that is missing is an error;
    feedback for a study not received (yet) or already purged is skipped and counted."""
    from model.datasets import DatasetError, assemble, read_label_csv
    rows = read_label_csv(labels) if labels is not None else feedback_rows(db)
    if not rows:
        raise DatasetError("--from-db without --labels uses the physicians' feedback, and "
                           "none is recorded: run `python -m node feedback` first")
    keys = study_patient_keys(db)
    records: list[ViewRecord] = []
    used = 0
    for row in rows:
        if row.key_kind != "study_uid":
            raise DatasetError(f"{row.where}: the node's database is keyed by study UID, "
                               "not file path")
        instances = [i for i in study_instances(db, row.key) if not i.late] \
            if row.key in keys else []
        if not instances and labels is None:
            continue  # feedback may come before the study, or after housekeeping
        if row.key not in keys:
            raise DatasetError(f"{row.where}: study {row.key} is not in the node's database")
        if not instances:
            raise DatasetError(f"{row.where}: study {row.key} has no stored instances")
        patient = row.patient_id or keys[row.key] or row.key
        for inst in instances:
            records += _dicom_views(Path(inst.path), row.label, patient, row.where)
        used += 1
    if labels is None:
        log.info("feedback: %d of %d labelled study(ies) have stored instances", used,
                 len(rows))
        if not used:
            raise DatasetError(f"none of the {len(rows)} studies with feedback has stored "
                               "instances in the node's database")
    source = labels.name if labels is not None else "physicians' feedback"
    return assemble(records, f"{used} stored study(ies) labelled by {source}")


def load_data(src: DataSources, db: Database | None) -> LabelledImages:
    """Every requested source, checked and concatenated (patients namespaced per source)."""
    from model.datasets import DatasetError, concat, load_bs80k, load_phantoms, load_png_folder
    parts: list[LabelledImages] = []
    if src.phantoms:
        parts.append(load_phantoms(src.phantoms, src.phantom_seed, src.difficulty))
    if src.dicom is not None:
        if src.labels is None:
            raise DatasetError("--dicom needs --labels CSV")
        parts.append(dicom_folder_data(src.dicom, src.labels))
    if src.from_db:
        if db is None:
            raise DatasetError("--from-db needs the node's database")
        parts.append(database_data(db, src.labels))
    if src.png is not None:
        parts.append(load_png_folder(src.png, src.class_map, patient_prefix="png:"))
    if src.bs80k is not None:
        if not src.label_map:
            raise DatasetError("--bs80k needs --label-map, e.g. 0=normal,1=bone_metastasis")
        parts.append(load_bs80k(src.bs80k, src.label_map, src.bs80k_labels,
                                patient_prefix="bs80k:"))
    if not parts:
        raise DatasetError("no training data: give --phantoms N, --dicom DIR, --from-db, "
                           "--png DIR or --bs80k DIR")
    return concat(parts)


# --- retraining --------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrainOptions:
    """Everything `python -m node retrain` was asked to do."""

    sources: DataSources
    train: TrainConfig
    protocol: Protocol
    out: Path | None = None
    version: str | None = None
    register: bool = True
    force_promote: bool = False
    allow_promote: bool = True
    metric: str = "study_f1"
    margin: float = 0.0
    cli: dict[str, Any] = field(default_factory=dict)  # the parsed command line


@dataclass(frozen=True)
class RetrainOutcome:
    """What a retrain produced."""

    version: str
    report_dir: Path
    model_path: Path
    registered: bool
    decision: PromotionDecision | None
    records: list[RunRecord]


def _environment() -> dict[str, Any]:
    import torch

    from model.distributed import current_world
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "training_processes": current_world().size,
            "platform": platform.platform()}


def _config_doc(opts: RetrainOptions, version: str) -> dict[str, Any]:
    src = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts.sources).items()}
    return {"version": version, "command_line": opts.cli, "train": asdict(opts.train),
            "protocol": asdict(opts.protocol), "sources": src,
            "promotion": {"metric": opts.metric, "margin": opts.margin,
                          "forced": opts.force_promote, "allowed": opts.allow_promote},
            "environment": _environment()}


def current_model(cfg: Config, db: Database) -> tuple[Path, ModelRecord | None] | None:
    """The model a node would serve now: the registry's serving one (its file verified as a
    node verifies it: a mismatching file is not evaluated), else [model].path."""
    rec = serving_model(db)
    if rec is not None:
        try:
            return verify_model_file(cfg.storage_root, rec).path, rec
        except RegistryError as exc:
            log.error("serving model not evaluated: %s", exc)
            return None
    if cfg.model_path.is_file():
        return cfg.model_path, None
    return None


def register_configured_model(cfg: Config, db: Database) -> ModelRecord | None:
    """With an empty registry, record [model].path as serving so a rollback can return to it.
    The file is registered by its bytes (node.service.models.adopt_configured: copied into
    the models directory, its metadata read without loading it)."""
    from model.export import ModelFileError
    from node.service.models import adopt_configured
    if serving_model(db) is not None or not cfg.model_path.is_file():
        return None
    try:
        rec = adopt_configured(db, cfg.storage_root, cfg.model_path)
    except ModelFileError as exc:
        log.error("[model].path %s is not a usable model, not registered: %s",
                  cfg.model_path, exc)
        return None
    return promote(db, rec.version, note="served from [model].path before the registry")


def _current_evaluation(path: Path, data: LabelledImages, rec0: RunRecord) -> Evaluation | None:
    """The serving model on run 0's held-out images; None if it cannot be loaded."""
    from model.evaluate import evaluate_model_file
    from model.export import ModelFileError
    try:
        return evaluate_model_file(path, data, rec0.test_index)
    except ModelFileError as exc:
        log.error("current model %s cannot be evaluated: %s", path, exc)
        return None


def _export_candidate(cfg: Config, opts: RetrainOptions, rec0: RunRecord, data: LabelledImages,
                      version: str, report_dir: Path) -> Path:
    """TorchScript of run 0, straight into the registry's folder (or the report folder)."""
    from model.trainer import export_trained
    assert rec0.result is not None
    path = model_file_path(cfg.storage_root, version) if opts.register \
        else report_dir / f"{version}.pt"
    if path.exists():
        raise RegistryError(f"{path} already exists: choose another --version")
    train_cfg = replace(opts.train, seed=rec0.seed, arch=rec0.arch)
    return export_trained(rec0.result, data, train_cfg, path, version=version)


def retrain(cfg: Config, opts: RetrainOptions) -> RetrainOutcome:
    """Load data, run the protocol, export and register run 0, decide promotion, report."""
    from model.archs import unavailable_reason
    from model.evaluate import PROMOTION_METRICS
    if opts.metric not in PROMOTION_METRICS:
        raise ValueError(f"unknown --metric {opts.metric}; one of {', '.join(PROMOTION_METRICS)}")
    for arch in opts.protocol.archs:
        reason = unavailable_reason(arch)
        if reason:
            raise ValueError(reason)
    from model.distributed import barrier, current_world
    db = Database(cfg.database_url)
    if current_world().main:
        db.create_all()
    barrier()  # under torchrun: rank 0 made the tables, the other ranks only read them
    try:
        return _retrain(cfg, opts, db)
    finally:
        db.dispose()


def _retrain(cfg: Config, opts: RetrainOptions, db: Database) -> RetrainOutcome:
    """The body of retrain() once the database is open."""
    from model.archs import get_arch
    from model.datasets import describe
    from model.distributed import current_world
    from model.evaluate import PromotionDecision, decide_promotion, run_protocol
    from model.report import ReportInputs, write_report
    from model.trainer import default_version
    version = opts.version or default_version()
    if opts.register and version in {r.version for r in list_models(db)}:
        raise RegistryError(f"model version {version} is already registered")
    data = load_data(opts.sources, db)
    data_doc = describe(data)
    log.info("training data: %s", json.dumps(data_doc))
    report_dir = opts.out or cfg.storage_root / "reports" / version
    records = run_protocol(data, opts.protocol, opts.train)
    if not current_world().main:  # under torchrun: rank 0 alone exports, registers, reports
        return RetrainOutcome(version, report_dir, Path(), False, None, records)
    rec0 = next(r for r in records if r.arch == opts.protocol.keep_result_of and r.run == 0)
    model_path = _export_candidate(cfg, opts, rec0, data, version, report_dir)
    decision = None
    if opts.register:
        register_configured_model(cfg, db)
        current = current_model(cfg, db)
        cur_eval = _current_evaluation(current[0], data, rec0) if current else None
        register_model(db, cfg.storage_root, model_path, NewModel(
            version=version, weights_sha256=_weights_sha(model_path),
            data_description=data.description,
            metrics={**rec0.evaluation.headline(),
                     "runs": sum(r.arch == rec0.arch for r in records)},
            name=get_arch(rec0.arch).display, arch=rec0.arch))
        decision = decide_promotion(rec0.evaluation.headline(),
                                    cur_eval.headline() if cur_eval else None, opts.metric,
                                    opts.margin, opts.force_promote)
        gate = None if opts.force_promote else promotion_gate(cfg, db, version)
        if decision.promote and gate:
            decision = PromotionDecision(False, decision.metric, decision.candidate,
                                         decision.current, decision.margin, False,
                                         f"{decision.reason} (but {gate})")
        if decision.promote and opts.allow_promote:
            promote(db, version, note=decision.reason)
        elif decision.promote:
            decision = PromotionDecision(False, decision.metric, decision.candidate,
                                         decision.current, decision.margin, False,
                                         decision.reason + " (but --no-promote)")
        log.info("model %s %s: %s", version,
                 "promoted" if decision.promote else "kept as candidate", decision.reason)
    write_report(report_dir, ReportInputs(
        records=records, config=_config_doc(opts, version), data=data_doc,
        primary=opts.protocol.keep_result_of, promotion=decision,
        extra={"model_version": version, "model_path": str(model_path)}))
    return RetrainOutcome(version, report_dir, model_path, opts.register, decision, records)


def _weights_sha(path: Path) -> str:
    from model.export import load_torchscript
    return load_torchscript(path)[1].weights_sha256


# --- CLI glue ----------------------------------------------------------------------------


def _mapping(text: str | None) -> dict[str, str] | None:
    from model.datasets import parse_mapping
    return parse_mapping(text) if text else None


def _archs(arch: str, compare: str) -> tuple[str, ...]:
    """The exported network first, then the compared ones ('all' = the five baselines)."""
    from model.archs import BASELINE_KEYS, get_arch
    keys = list(BASELINE_KEYS) if compare.strip() == "all" else \
        [k.strip() for k in compare.split(",") if k.strip()]
    for k in (arch, *keys):
        get_arch(k)  # ArchError (a ValueError) naming the valid keys
    return tuple(dict.fromkeys([arch, *keys]))


def add_retrain_arguments(p: argparse.ArgumentParser) -> None:
    """The `retrain` subcommand's options."""
    p.add_argument("--config", type=Path, default=Path("config.toml"))
    d = p.add_argument_group("data (one or more sources)")
    d.add_argument("--phantoms", type=int, default=0, metavar="N", help="N phantom patients")
    d.add_argument("--phantom-seed", type=int, default=0)
    d.add_argument("--difficulty", type=float, default=0.5)
    d.add_argument("--dicom", type=Path, help="folder of DICOM studies (needs --labels)")
    d.add_argument("--from-db", action="store_true", help="studies in the node's database, "
                   "labelled by --labels or else by the physicians' feedback")
    d.add_argument("--labels", type=Path, help="CSV: study_uid (or path), label[, patient_id]")
    d.add_argument("--png", type=Path, help="<class>/<Anterior|Posterior>/A<n>.png folder")
    d.add_argument("--class-map", help="PNG class folders to classes, e.g. yes=bone_metastasis")
    d.add_argument("--bs80k", type=Path, help="BS-80K-style folder of 8-bit views")
    d.add_argument("--bs80k-labels", type=Path, help="list file of '<image> <label>' lines")
    d.add_argument("--label-map", help="BS-80K labels to classes, e.g. 0=normal,1=bone_metastasis")
    t = p.add_argument_group("training (paper Table 5 defaults)")
    t.add_argument("--arch", default="dscint", help="network exported and registered: "
                   "dscint, alexnet, resnet18, vgg16, inception_v4 or densenet121")
    t.add_argument("--compare", default="",
                   help="comma-separated networks trained on the same splits, or 'all'")
    t.add_argument("--runs", type=int, default=10, help="repeated runs (paper: 10)")
    t.add_argument("--folds", type=int, default=None, help="k-fold by patient instead of runs")
    t.add_argument("--epochs", type=int, default=5)
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--test-fraction", type=float, default=0.3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-balance", action="store_true",
                   help="do not sample classes toward Table 3 proportions")
    t.add_argument("--max-shift", type=int, default=5, help="augmentation: ±t pixels")
    t.add_argument("--max-rotation", type=float, default=3.0, help="augmentation: ±r degrees")
    t.add_argument("--mirror-probability", type=float, default=0.5)
    t.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    t.add_argument("--no-channels-last", action="store_true")
    t.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu",
                   help="train on the CPU or a GPU (under torchrun: each process its own)")
    t.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="auto",
                   help="bf16: forward pass under autocast (evaluation and export stay fp32); "
                        "auto: what trains each network fastest here (Dscint fp32, "
                        "baselines bf16)")
    t.add_argument("--no-trivial-baseline", action="store_true")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    o = p.add_argument_group("output and registry")
    o.add_argument("--out", type=Path, help="report folder (default <storage>/reports/<version>)")
    o.add_argument("--version", help="model version (default: UTC time)")
    o.add_argument("--no-register", action="store_true", help="report only; registry untouched")
    o.add_argument("--promote", action="store_true", help="promote even if not better")
    o.add_argument("--no-promote", action="store_true", help="register as candidate only")
    o.add_argument("--metric", default="study_f1",
                   help="promotion metric: study_|image_ + accuracy, precision, recall, "
                   "specificity, f1 or auc")
    o.add_argument("--margin", type=float, default=0.0,
                   help="candidate must reach current + margin")


def options_from_args(args: argparse.Namespace) -> RetrainOptions:
    """Parsed CLI -> RetrainOptions (networks and mapping strings validated here)."""
    from model.augment import AugmentParams
    from model.evaluate import Protocol
    from model.trainer import TrainConfig
    archs = _archs(args.arch, args.compare)
    train = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
        weight_decay=args.weight_decay, test_fraction=args.test_fraction, seed=args.seed,
        augment=AugmentParams(args.max_shift, args.max_rotation, args.mirror_probability),
        threads=args.threads, progress=not args.quiet, arch=args.arch,
        balance_classes=not args.no_balance, channels_last=not args.no_channels_last,
        device=args.device, precision=args.precision)
    sources = DataSources(
        phantoms=args.phantoms, phantom_seed=args.phantom_seed, difficulty=args.difficulty,
        dicom=args.dicom, from_db=args.from_db, labels=args.labels, png=args.png,
        class_map=_mapping(args.class_map), bs80k=args.bs80k, bs80k_labels=args.bs80k_labels,
        label_map=_mapping(args.label_map))
    return RetrainOptions(
        sources=sources, train=train,
        protocol=Protocol(archs=archs, runs=args.runs, folds=args.folds,
                          trivial_baseline=not args.no_trivial_baseline,
                          keep_result_of=args.arch),
        out=args.out, version=args.version, register=not args.no_register,
        force_promote=args.promote, allow_promote=not args.no_promote, metric=args.metric,
        margin=args.margin,
        cli={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})


def print_outcome(out: RetrainOutcome) -> None:
    """What the user reads at the end of a retrain."""
    c = Console()
    c.print(f"report: {out.report_dir / 'metrics.md'}")
    c.print(f"model {out.version}: {out.model_path}")
    if out.decision is not None:
        verdict = "[green]promoted[/]" if out.decision.promote else "[yellow]candidate[/]"
        c.print(f"{verdict}: {out.decision.reason}")


def run_retrain(cfg: Config, args: argparse.Namespace) -> int:
    """The retrain subcommand: errors in the data end with exit code 2 and the reason. Under
    torchrun every process trains its slice of each batch; rank 0 alone writes (see
    model.distributed)."""
    from model.distributed import start_world, stop_world
    try:
        opts = options_from_args(args)
        world = start_world(opts.train.device, os.environ)  # torchrun: join the other ranks
        try:
            out = retrain(cfg, opts)
        finally:
            stop_world()
    except (RegistryError, ValueError) as exc:  # DatasetError and ArchError included
        print(f"retrain: {exc}", file=sys.stderr)
        return 2
    if world.main:
        print_outcome(out)
    return 0
