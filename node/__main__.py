"""`python -m node ...`: serve (or one role: receive, worker), status, resend, requeue, demo,
phantoms, train, retrain, models, feedback (`status --drift`: the drift comparison)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from node.config import Config, ConfigError, load_config
from node.logs import setup_logging

if TYPE_CHECKING:
    from node.service.node import Node, Role

log = logging.getLogger("node")


def _open_node(cfg: Config, role: Role) -> Node | None:
    """The node of one role; None (logged) when its model cannot load. Only a classifying
    role imports torch and the model: a receiver's process never maps libtorch."""
    from node.service.node import Node
    if not role.classifies:
        from node.runtime import tune_malloc
        tune_malloc()  # fewer malloc arenas, as the classifier process (before our threads)
        return Node(cfg, role=role)
    from model.export import ModelFileError
    from node.service.startup import prepare_classifier_process, settle_after_model_load
    prepare_classifier_process(cfg)
    try:
        node = Node(cfg, role=role)
    except ModelFileError as exc:
        log.error("cannot start: model %s: %s", cfg.model_path, exc)
        return None
    settle_after_model_load()
    return node


def _cmd_serve(args: argparse.Namespace) -> int:
    """serve, receive or worker: the node, or one of its roles (node.service.node.Role)."""
    cfg = load_config(args.config)
    setup_logging(cfg.logging.level)
    from node.service.node import Role
    node = _open_node(cfg, Role(args.command))
    if node is None:
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    from node.receive.process import ReceiverStartError
    try:
        node.start()
    except ReceiverStartError as exc:  # the receiver logged why (port in use, say)
        log.error("cannot start: %s", exc)
        return 2
    try:
        stop.wait()
    finally:
        node.stop()
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    if args.drift:
        from node.ops.drift import print_drift
        return print_drift(cfg, as_json=args.json)
    from node.ops.status import StatusFilter, parse_since, print_status
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    print_status(cfg, StatusFilter(state=args.state, since=since, study=args.study,
                                   limit=args.limit), wide=args.wide, as_data=args.json)
    return 0


def _cmd_resend(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    from storage.db import Database
    from storage.exports import requeue_dead_exports
    db = Database(cfg.database_url)
    db.create_all()
    n = requeue_dead_exports(db)
    print(f"re-queued {n} dead-lettered export(s); a running node delivers them next")
    return 0


def _cmd_requeue(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    from node.ops.requeue import requeue
    return requeue(cfg, args.study)


def _cmd_demo(args: argparse.Namespace) -> int:
    from node.demo.run import run_demo
    cfg = load_config(args.config) if args.config else None
    level = "INFO" if args.verbose else "WARNING"
    setup_logging(level)
    return run_demo(cfg, n_per_class=args.per_class, workdir=args.workdir, log_level=level)


def _cmd_phantoms(args: argparse.Namespace) -> int:
    from node.ops.phantoms import write_phantoms
    write_phantoms(args.out, args.per_class, args.seed, args.difficulty, args.layout)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from node.ops.phantoms import train_on_phantoms
    setup_logging("INFO")
    train_on_phantoms(args.out, patients=args.patients, epochs=args.epochs, seed=args.seed,
                      difficulty=args.difficulty, baseline=not args.no_baseline)
    return 0


def _cmd_retrain(args: argparse.Namespace) -> int:
    from node.ops.retrain import run_retrain
    cfg = load_config(args.config)
    setup_logging("INFO")
    return run_retrain(cfg, args)


def _cmd_feedback(args: argparse.Namespace) -> int:
    from node.ops.feedback import run_feedback
    cfg = load_config(args.config)
    setup_logging(cfg.logging.level)
    return run_feedback(cfg, args)


def _cmd_models(args: argparse.Namespace) -> int:
    from node.ops.models import run_models
    cfg = load_config(args.config)
    return run_models(cfg, args)


def _version() -> str:
    """The installed distribution's version (the source tree's when not installed)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("dscint-node")
    except PackageNotFoundError:
        return "0.1.0 (not installed)"


def _add_status_parser(sp: argparse.ArgumentParser) -> None:
    """`status`: compact table by default; --wide, --json; filters."""
    sp.add_argument("--config", type=Path, default=Path("config.toml"))
    shape = sp.add_mutually_exclusive_group()
    shape.add_argument("--wide", action="store_true", help="every column")
    shape.add_argument("--json", action="store_true", help="rows, queue and health as JSON")
    sp.add_argument("--state", choices=["receiving", "complete", "classifying", "classified",
                                        "failed", "not_applicable"], help="only this state")
    sp.add_argument("--since", metavar="AGE", help="last instance within AGE (90s, 15m, 2h, "
                    "7d)")
    sp.add_argument("--study", metavar="UID", help="this study (its UID's ending suffices)")
    sp.add_argument("--limit", type=int, default=200, help="at most this many studies")
    sp.add_argument("--drift", action="store_true", help="this window's classes and input "
                    "characteristics against the previous windows (exit status 1 on drift)")


def build_parser() -> argparse.ArgumentParser:
    """All subcommands; `--config` defaults to embedded defaults."""
    p = argparse.ArgumentParser(prog=Path(sys.argv[0]).name if sys.argv[0].endswith(
        "dscint-node") else "python -m node", description=__doc__)
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    for name, helptext in (("serve", "run the DICOM node"),
                           ("receive", "receiver role only: the SCP, no model (shared queue)"),
                           ("worker", "worker role only: classify and export, no SCP"),
                           ("resend", "re-queue dead-lettered result exports (SR, image, PDF)")):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("--config", type=Path, default=Path("config.toml"))
    _add_status_parser(sub.add_parser("status", help="table of studies and their states"))
    rq = sub.add_parser("requeue", help="put failed studies back in the classification queue")
    rq.add_argument("--config", type=Path, default=Path("config.toml"))
    which = rq.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", metavar="UID", help="this study (failed, or waiting for a "
                       "retry: then due now)")
    which.add_argument("--failed", action="store_true", help="every failed study")
    d = sub.add_parser("demo", help="whole loop on phantoms with an in-process PACS stand-in")
    d.add_argument("--config", type=Path, default=None,
                   help="use this config's [model].path if that file exists")
    d.add_argument("--per-class", type=int, default=2)
    d.add_argument("--workdir", type=Path, default=None)
    d.add_argument("--verbose", action="store_true")
    ph = sub.add_parser("phantoms", help="write phantom DICOM studies and a PNG contact sheet")
    ph.add_argument("--out", type=Path, required=True)
    ph.add_argument("--per-class", type=int, default=2)
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--difficulty", type=float, default=0.5)
    ph.add_argument("--layout", default="multiframe",
                    choices=["multiframe", "per_view", "secondary_capture"])
    t = sub.add_parser("train", help="train Dscint on phantoms and export TorchScript")
    t.add_argument("--out", type=Path, required=True, help="model file to write (.pt)")
    t.add_argument("--patients", type=int, default=400)
    t.add_argument("--epochs", type=int, default=5)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--difficulty", type=float, default=0.5)
    t.add_argument("--no-baseline", action="store_true")
    from node.ops.models import add_models_arguments
    from node.ops.retrain import add_retrain_arguments
    add_retrain_arguments(sub.add_parser(
        "retrain", help="paper protocol on your data: report, registry, promotion"))
    from node.ops.feedback import add_feedback_arguments
    add_feedback_arguments(sub.add_parser(
        "feedback", help="record physicians' conclusions (--study UID --label CLASS, --csv)"))
    add_models_arguments(sub.add_parser(
        "models", help="list registered models and shadow trials; 'rollback'; "
        "'promote VERSION'; 'shadow VERSION' | 'shadow --stop'"))
    return p


COMMANDS = {"serve": _cmd_serve, "receive": _cmd_serve, "worker": _cmd_serve,
            "status": _cmd_status, "resend": _cmd_resend,
            "requeue": _cmd_requeue,
            "demo": _cmd_demo, "phantoms": _cmd_phantoms, "train": _cmd_train,
            "retrain": _cmd_retrain, "models": _cmd_models, "feedback": _cmd_feedback}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; configuration errors end with exit code 2 and the key named."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
