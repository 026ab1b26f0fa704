"""node.export.policy: the SR retry schedule (capped doubling) and when to dead-letter.

Pure unit tests: no database, no network.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.config import ExportSection
from node.export.policy import backoff_delay, next_attempt
from node.export.scu import SendOutcome

T0 = datetime(2025, 3, 1, 8, 0, 0, tzinfo=UTC)
POLICY = ExportSection(max_attempts=5, backoff_base_seconds=2.0, backoff_cap_seconds=10.0)
TRANSIENT = SendOutcome(acknowledged=False, status=None, error="association rejected",
                        permanent=False)
PERMANENT = SendOutcome(acknowledged=False, status=0xA900,
                        error="C-STORE refused (permanent): status 0xA900", permanent=True)


# --- backoff_delay -------------------------------------------------------------------------


def test_backoff_delay_examples() -> None:
    assert [backoff_delay(a, 2.0, 60.0) for a in range(0, 8)] == \
        [2.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    assert backoff_delay(10**9, 1.0, 300.0) == 300.0
    with pytest.raises(ValueError):
        backoff_delay(1, -1.0, 10.0)
    with pytest.raises(ValueError):
        backoff_delay(1, float("nan"), 10.0)


@given(attempts=st.integers(min_value=-10, max_value=10**6),
       base=st.floats(min_value=0.0, max_value=1e6),
       cap=st.floats(min_value=0.0, max_value=1e9))
def test_backoff_delay_capped_and_monotonic(attempts: int, base: float, cap: float) -> None:
    d = backoff_delay(attempts, base, cap)
    assert 0.0 <= d <= cap
    assert backoff_delay(attempts + 1, base, cap) >= d
    if attempts <= 1:
        assert d == min(base, cap)


# --- next_attempt --------------------------------------------------------------------------


def test_permanent_refusal_is_dead_lettered_at_once() -> None:
    assert next_attempt(POLICY, 1, PERMANENT, T0) is None


@pytest.mark.parametrize("attempts", [5, 6, 100])
def test_attempt_budget_spent_is_dead_lettered(attempts: int) -> None:
    assert next_attempt(POLICY, attempts, TRANSIENT, T0) is None


@pytest.mark.parametrize(("attempts", "delay"), [(1, 2.0), (2, 4.0), (3, 8.0), (4, 10.0)])
def test_transient_failure_retries_after_capped_backoff(attempts: int, delay: float) -> None:
    assert next_attempt(POLICY, attempts, TRANSIENT, T0) == T0 + timedelta(seconds=delay)


def test_single_attempt_policy_never_retries() -> None:
    once = ExportSection(max_attempts=1, backoff_base_seconds=2.0, backoff_cap_seconds=10.0)
    assert next_attempt(once, 1, TRANSIENT, T0) is None


@given(attempts=st.integers(min_value=0, max_value=10**6))
def test_retry_is_never_later_than_the_cap(attempts: int) -> None:
    policy = ExportSection(max_attempts=10**7, backoff_base_seconds=30.0,
                           backoff_cap_seconds=600.0)
    at = next_attempt(policy, attempts, TRANSIENT, T0)
    assert at is not None and T0 < at <= T0 + timedelta(seconds=600)
