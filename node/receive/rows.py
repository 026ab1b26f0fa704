"""Group commit of queue rows: C-STOREs of several associations share one transaction.

On SQLite one writer at a time holds the database, and every commit waits for an fsync of the
write-ahead log. With four associations the receiver's handlers spent a third of their time
queued for that turn (py-spy, issue 18). Here the handler that gets the turn commits the rows
of every handler waiting behind it too, in one transaction and one fsync (storage.intake
.record_instances); those find their row committed when the turn reaches them. Alone (one
association) a handler commits its own row at once, as before: nothing waits for company.

Durability is unchanged: a handler returns only once the transaction holding its row has
committed, and each row still goes in only after its file is durable (the caller's order).
A refused row rolls back alone (a savepoint); a failure of the transaction is every waiting
handler's (nothing of theirs was written), and a turn not had within the wait is
DatabaseBusy for that handler only (its row is taken out of the queue first).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from storage.db import Database, DatabaseBusy
from storage.intake import (
    InstanceRecord,
    RecordOutcome,
    StudyLimits,
    record_instances,
    validate_record,
)

log = logging.getLogger(__name__)

MAX_BATCH = 64  # rows in one transaction at most (the turn is held while they are written)


@dataclass
class _Waiting:
    """One handler's row, and what became of it."""

    record: InstanceRecord
    done: threading.Event = field(default_factory=threading.Event)
    outcome: RecordOutcome | None = None
    error: BaseException | None = None


@dataclass
class GroupCommit:
    """Rows of concurrent C-STOREs, committed together by whichever handler holds `turn`
    (the receiver's SQLite write turn, shared with the completion check)."""

    db: Database
    limits: StudyLimits
    turn: threading.Lock
    wait_seconds: float  # [node].store_db_wait_seconds: the longest a handler waits its turn
    max_batch: int = MAX_BATCH
    _queue: list[_Waiting] = field(default_factory=list)
    _queue_lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, rec: InstanceRecord) -> RecordOutcome:
        """Commit `rec`'s row (alone or with others waiting) and return its outcome; raises
        what recording raised (DatabaseBusy when the turn or the database stayed taken)."""
        validate_record(rec)  # a bad record fails alone, never a transaction of others
        mine = _Waiting(rec)
        with self._queue_lock:
            self._queue.append(mine)
        deadline = time.monotonic() + self.wait_seconds
        while not mine.done.is_set():
            if self.turn.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
                try:
                    if not mine.done.is_set():  # else the holder before us committed it
                        self._commit_waiting()
                finally:
                    self.turn.release()
            elif self._withdraw(mine):
                raise DatabaseBusy("waited [node].store_db_wait_seconds for the receiver's "
                                   "write turn")
            else:  # in a transaction under way: its outcome comes soon
                mine.done.wait()
        if mine.error is not None:
            raise mine.error
        assert mine.outcome is not None
        return mine.outcome

    def _withdraw(self, mine: _Waiting) -> bool:
        """Take a row no holder has taken out of the queue; False if one has."""
        with self._queue_lock:
            if mine in self._queue:
                self._queue.remove(mine)
                return True
            return False

    def _commit_waiting(self) -> None:
        """With the turn held: every row waiting (up to max_batch) in one transaction."""
        with self._queue_lock:
            batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
        try:
            outcomes = record_instances(self.db, [w.record for w in batch],
                                        limits=self.limits)
        except BaseException as exc:  # nothing was written: each handler answers for itself
            for w in batch:
                w.error = exc
                w.done.set()
            return
        if len(batch) > 1:
            log.debug("group commit: %d queue rows in one transaction", len(batch))
        for w, outcome in zip(batch, outcomes, strict=True):
            w.outcome = outcome
            w.done.set()
