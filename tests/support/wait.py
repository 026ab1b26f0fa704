"""Waiting for a condition with a deadline, instead of sleeping a guessed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError, TimeoutError):
    """A condition not met in time: an assertion failure in a test (pytest shows `what`), a
    TimeoutError to code that retries (a node that did not come up)."""


def wait_for(probe: Callable[[], T | None], timeout: float, what: str,
             interval: float = 0.05) -> T:
    """Call `probe` every `interval` seconds until it returns something other than None or
    False, and return that; after `timeout` seconds raise WaitTimeout naming `what`.

    The probe runs at least once, so a condition already true costs no wait. An exception
    from the probe propagates at once (a server that died while we waited for it fails fast
    with its own message).
    """
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got is not None and got is not False:
            return got
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
