"""A Node in the test's process (node.service.node.Node): its config, where to send to it, and
waiting for what it does (a study's state, an SR at the PACS stand-in)."""

from __future__ import annotations

from pathlib import Path

from pydicom import Dataset

from node.config import Config, load_config, with_overrides
from node.demo.pacs_standin import PacsStandIn
from node.export.scu import Destination
from node.service.node import Node
from storage.db import Database
from storage.reports import StudySummary, study_summaries
from tests.support.wait import wait_for

CALLER = "TEST_CAMERA"


def node_config(root: Path, model: Path, pacs_port: int, **overrides: dict[str, object]
                ) -> Config:
    """A node on a port the OS picks, storing under root, sending to a local PACS.

    It receives in threads of the test's process (`receiver_process` false), so caplog sees
    the handlers' log lines and a node starts quickly; the end-to-end story
    (test_node_e2e.py's `node` fixture), test_receiver_process.py and the interop tests run
    the default two-process topology (`node={"receiver_process": True}`).
    """
    sections: dict[str, dict[str, object]] = {
        "node": {"port": 0, "receiver_process": False},
        "pacs": {"ae_title": "TEST_PACS", "host": "127.0.0.1", "port": pacs_port},
        "storage": {"root": str(root)}, "model": {"path": str(model)},
        "completion": {"quiet_seconds": 1.0, "sweep_seconds": 0.2},
        "export": {"backoff_base_seconds": 0.2, "backoff_cap_seconds": 1.0, "max_attempts": 3},
    }
    for name, values in overrides.items():
        sections[name] = {**sections.get(name, {}), **values}
    return with_overrides(load_config(None), **sections)


def dest(node: Node) -> Destination:
    """Where a modality sends to reach this node."""
    return Destination(node.cfg.node.ae_title, "127.0.0.1", node.port)


def study_row(db: Database, study_uid: str) -> StudySummary | None:
    """The study's line of the status table, None while the node has not seen it."""
    return {s.study_uid: s for s in study_summaries(db)}.get(study_uid)


def wait_study(db: Database, study_uid: str, what: str, timeout: float = 30.0,
               state: str | None = None, export_state: str | None = None,
               min_export_attempts: int = 0) -> StudySummary:
    """Wait until the study's row has `state`, `export_state` and at least
    `min_export_attempts` export attempts (whichever are given); the row."""
    def probe() -> StudySummary | None:
        row = study_row(db, study_uid)
        if row is None or (state is not None and row.state != state) \
                or (export_state is not None and row.export_state != export_state) \
                or (row.export_attempts or 0) < min_export_attempts:
            return None
        return row
    return wait_for(probe, timeout, f"study {study_uid}: {what}")


def wait_sr(pacs: PacsStandIn, study_uid: str, timeout: float = 30.0) -> Dataset:
    """The first SR the PACS stand-in received for the study, once there is one."""
    got = wait_for(lambda: pacs.by_study().get(study_uid), timeout,
                   f"an SR for study {study_uid} at the PACS stand-in")
    return got[0].dataset
