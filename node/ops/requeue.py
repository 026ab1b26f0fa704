"""`python -m node requeue`: failed studies back in the classification queue, once the cause
(an unreadable file, a full disk, a broken model) is fixed. A running node picks them up
within a second; each gets a fresh attempt budget.
"""

from __future__ import annotations

import logging

from node.config import Config
from storage.db import Database
from storage.jobs import requeue_studies

log = logging.getLogger(__name__)


def requeue(cfg: Config, study_uid: str | None) -> int:
    """Re-queue one study (failed, or waiting for a retry: then due now) or every failed
    one; prints what it did. Exit code 0, or 1 when a named study was not re-queued."""
    db = Database(cfg.database_url)
    db.create_all()
    try:
        if study_uid is None:
            uids = requeue_studies(db)
            print(f"re-queued {len(uids)} failed study(ies); a running node classifies them "
                  "next")
            return 0
        uids = requeue_studies(db, study_uid)
    finally:
        db.dispose()
    if not uids:
        print(f"study {study_uid} not re-queued: it is not failed nor waiting for a retry "
              "(`python -m node status` shows its state)")
        return 1
    print(f"re-queued study {study_uid}; a running node classifies it next")
    return 0
