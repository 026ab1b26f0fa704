"""SR export retry policy: capped exponential backoff and when to give up (dead-letter).

Pure functions of the configured policy and the attempt just made, kept apart from the
delivery loop and from storage (which only stores the ``retry_at`` decided here).
"""

from __future__ import annotations

import logging
import math
from datetime import datetime, timedelta

from node.config import ExportSection
from node.export.scu import SendOutcome

log = logging.getLogger(__name__)


def backoff_delay(attempts: int, base_seconds: float, cap_seconds: float) -> float:
    """Seconds before retry number ``attempts + 1``: base * 2**(attempts-1), capped.

    Pure, never overflows, non-decreasing in ``attempts``; attempts <= 1 gives the base.
    """
    if not (base_seconds >= 0 and cap_seconds >= 0):  # also rejects NaN
        raise ValueError("backoff base and cap must be non-negative numbers")
    exponent = min(max(attempts - 1, 0), 1000)
    return min(cap_seconds, base_seconds * math.ldexp(1.0, exponent))


def next_attempt(policy: ExportSection, attempts: int, outcome: SendOutcome, now: datetime
                 ) -> datetime | None:
    """When to try again, or None to dead-letter: a permanent refusal never succeeds on a
    retry, and after ``max_attempts`` an admin must look (``python -m node resend``)."""
    if outcome.permanent or attempts >= policy.max_attempts:
        return None
    delay = backoff_delay(attempts, policy.backoff_base_seconds, policy.backoff_cap_seconds)
    return now + timedelta(seconds=delay)
