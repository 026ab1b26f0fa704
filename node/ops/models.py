"""`python -m node models`: the registry (list, promote, rollback) and shadow trials.

`models shadow VERSION` runs a registered candidate on every live study beside the serving
model; its results are stored and never sent. `models` shows, for the version in shadow (and
the last trial of any other), how often it agreed with the serving model, the confusion
between the two, its latency and, on studies a physician labelled (`storage.feedback`), the
accuracy of both. Promotion can be made to wait for a trial: [model].promote_min_shadow_studies
and [model].promote_min_agreement; `promote --force` overrides them, and says so.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from model.calibration import INDETERMINATE
from node.config import Config
from storage.db import Database
from storage.feedback import Agreement, agreement, feedback_labels
from storage.registry import (
    ModelState,
    RegistryError,
    get_model,
    list_models,
    promote,
    rollback,
    verify_model_file,
)
from storage.shadow import (
    ShadowSummary,
    active_shadow,
    shadow_summary,
    shadow_versions,
    start_shadow,
    stop_shadow,
)

log = logging.getLogger(__name__)

SHOWN_TRIALS = 3  # shadow trials summarised by `models` (the running one first)


def promotion_gate(cfg: Config, db: Database, version: str) -> str | None:
    """Why `version` may not be promoted yet under [model].promote_min_shadow_studies and
    promote_min_agreement; None when it may (or no gate is configured)."""
    m = cfg.model
    if m.promote_min_shadow_studies <= 0 and m.promote_min_agreement <= 0:
        return None
    s = shadow_summary(db, version)
    if s.studies < m.promote_min_shadow_studies:
        return (f"model {version} has {s.studies} shadow stud{'y' if s.studies == 1 else 'ies'}"
                f"; [model].promote_min_shadow_studies is {m.promote_min_shadow_studies} "
                f"(run `models shadow {version}` first, or promote --force)")
    if m.promote_min_agreement > 0 and (s.agreement or 0.0) < m.promote_min_agreement:
        return (f"model {version} agreed with the serving model on {_pct(s.agreement)} of "
                f"{s.studies} shadow studies; [model].promote_min_agreement is "
                f"{m.promote_min_agreement:.0%} (or promote --force)")
    return None


def models_table(db: Database, shadow: str | None = None) -> Table:
    """Every registered version, oldest first; the serving one in bold green, the one in
    shadow marked."""
    table = Table(title="dscint-node models")
    served = {a.version: a for a in agreement(db, INDETERMINATE) if not a.shadow}
    for col in ("version", "state", "network", "study F1", "vs feedback", "file sha256"):
        table.add_column(col, no_wrap=True)
    for col in ("promoted (UTC)", "training data / note"):
        table.add_column(col, overflow="fold")
    for r in list_models(db):
        state = f"{r.state} + shadow" if r.version == shadow else r.state
        table.add_row(
            r.version, state, r.name, _fmt(r.metrics.get("study_f1")),
            _agreement(served.get(r.version)), r.file_sha256[:12],
            r.promoted_at.strftime("%Y-%m-%d %H:%M") if r.promoted_at else "-",
            escape(f"{r.data_description[:70]}" + (f" — {r.note[:70]}" if r.note else "")),
            style="bold green" if r.state == ModelState.SERVING else None)
    return table


def shadow_report(s: ShadowSummary, running: bool) -> Group:
    """One trial against the serving model: its figures, then the confusion between the two
    (rows: what the serving model said, columns: what the shadow said)."""
    head = Text(f"\nshadow {s.version} ({'running' if running else 'stopped'}) vs the "
                "serving model", style="bold")
    shadow_classes = sorted({b for _, b in s.confusion})
    table = Table()
    table.add_column("serving \\ shadow", no_wrap=True)
    for c in shadow_classes:
        table.add_column(c, justify="right")
    for a in sorted({a for a, _ in s.confusion}):
        table.add_row(a, *[str(s.confusion.get((a, b), 0)) for b in shadow_classes])
    if not s.confusion:
        return Group(head, Text(_figures(s)))
    return Group(head, Text(_figures(s)),
                 Text("  confusion (rows: serving model, columns: shadow model):"), table)


def _figures(s: ShadowSummary) -> str:
    lines = [f"  studies {s.studies} (failed {s.failed}), agreement with serving "
             f"{_pct(s.agreement)} ({s.agreed} of {s.studies})",
             f"  shadow latency per study: median {_ms(s.median_ms)}, p95 {_ms(s.p95_ms)}"]
    if s.with_feedback:
        lines.append(f"  against feedback ({s.with_feedback} labelled): shadow "
                     f"{_pct(s.shadow_accuracy)}, serving {_pct(s.serving_accuracy)}")
    else:
        lines.append("  against feedback: no labelled study yet")
    return "\n".join(lines)


def _agreement(a: Agreement | None) -> str:
    """The served findings against feedback: "agree/compared (rate)", "-" when none."""
    if a is None or a.rate is None:
        return "-"
    return f"{a.agree}/{a.compared} ({a.rate:.1%})"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f} ms"


def _fmt(v: object) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "-"


def listing(db: Database) -> Group:
    """What `models` prints: the registry, then the recent shadow trials."""
    running = active_shadow(db)
    parts: list[Table | Group] = [models_table(db, running)]
    trials = shadow_versions(db)[:SHOWN_TRIALS]
    if trials:
        labels = feedback_labels(db)
        parts += [shadow_report(shadow_summary(db, v, labels), v == running) for v in trials]
    return Group(*parts)


def add_models_arguments(p: argparse.ArgumentParser) -> None:
    """`models [list | rollback | promote VERSION [--force] | shadow VERSION | shadow --stop]`."""
    p.add_argument("action", nargs="?", default="list",
                   choices=["list", "rollback", "promote", "shadow"])
    p.add_argument("version", nargs="?", help="for promote and shadow: the version")
    p.add_argument("--stop", action="store_true", help="shadow: stop the running trial")
    p.add_argument("--force", action="store_true",
                   help="promote: even if the shadow requirements are not met")
    p.add_argument("--config", type=Path, default=Path("config.toml"))


def run_models(cfg: Config, args: argparse.Namespace) -> int:
    """List, roll back, promote or shadow; a running node follows within seconds."""
    db = Database(cfg.database_url)
    db.create_all()
    console = Console()
    try:
        if args.action == "rollback":
            rec = rollback(db)
            console.print(f"serving {rec.version} again (rolled back)")
        elif args.action == "promote":
            return _promote(cfg, db, args, console)
        elif args.action == "shadow":
            return _shadow(cfg, db, args, console)
        else:
            console.print(listing(db))
    except RegistryError as exc:
        print(f"registry: {exc}", file=sys.stderr)
        return 1
    finally:
        db.dispose()
    return 0


def _promote(cfg: Config, db: Database, args: argparse.Namespace, console: Console) -> int:
    """Promote by hand, through the shadow gate unless --force; a trial of the promoted
    version ends (it now serves)."""
    if not args.version:
        console.print("models promote needs a VERSION", style="red")
        return 2
    get_model(db, args.version)  # RegistryError for an unknown version
    reason = promotion_gate(cfg, db, args.version)
    if reason and not args.force:
        print(f"not promoted: {reason}", file=sys.stderr)
        return 1
    note = "promoted by hand" + (f" (--force: {reason})" if reason else "")
    rec = promote(db, args.version, note=note)
    if active_shadow(db) == rec.version:
        stop_shadow(db)
    console.print(f"serving {rec.version}" + (" (forced past the shadow requirements)"
                                              if reason else ""))
    return 0


def _shadow(cfg: Config, db: Database, args: argparse.Namespace, console: Console) -> int:
    """Start a trial of a registered, verified, non-serving version, or stop the one
    running."""
    if args.stop:
        stopped = stop_shadow(db)
        console.print(f"shadow trial of {stopped} stopped" if stopped
                      else "no shadow trial was running")
        return 0
    if not args.version:
        console.print("models shadow needs a VERSION (or --stop)", style="red")
        return 2
    rec = get_model(db, args.version)
    if rec.state == ModelState.SERVING:
        print(f"registry: model {rec.version} is serving: nothing to compare it with",
              file=sys.stderr)
        return 1
    verify_model_file(cfg.storage_root, rec)  # ModelFileMismatch: refused before any node
    previous = start_shadow(db, rec.version)
    console.print(f"model {rec.version} runs in shadow on every new study (results stored, "
                  "never sent)" + (f"; {previous} stopped" if previous and
                                   previous != rec.version else ""))
    return 0
