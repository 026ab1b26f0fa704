"""Logging for every process of the node, and the one place that keeps patient data out of it.

Log lines carry UIDs, AE titles, addresses and statuses, never names or IDs. Library loggers
that quote element values are capped, their warnings ignored, and exception messages (which may
quote a value: a name typed into a UID field) are redacted wherever they are logged or stored.
"""

from __future__ import annotations

import logging
import re
import traceback
import warnings

# Loggers that quote element values and the most they may say: pynetdicom.utils reports
# "non-conformant" UIDs with their value at WARNING/ERROR, and pynetdicom's DEBUG/INFO dumps
# print request fields. No PHI in logs, at any level.
VALUE_QUOTING_LOGGERS = {"pydicom": logging.CRITICAL, "highdicom": logging.CRITICAL,
                         "pynetdicom.utils": logging.CRITICAL, "pynetdicom": logging.WARNING}
QUIET_LOGGERS = ("pynetdicom", "apscheduler")  # routine chatter at INFO
OUR_PACKAGES = ("node", "storage", "model")
# pydicom quotes element values in its messages ('DOE^JOHN' typed into a UID field, say)
_QUOTED = re.compile(r"""b?'[^']*'?|b?"[^"]*"?""")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str) -> None:
    """Configure logging once per process (CLI, receiver process), PHI caps included."""
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=_FORMAT)
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    keep_phi_out_of_logs()


def keep_phi_out_of_logs() -> None:
    """Cap the value-quoting loggers, ignore pydicom's and highdicom's warnings and redact
    tracebacks of our loggers (idempotent); our own refusal reasons say what was wrong without
    quoting values."""
    for name, level in VALUE_QUOTING_LOGGERS.items():
        logger = logging.getLogger(name)
        logger.setLevel(max(level, logger.level))
    for name in ("pydicom", "highdicom"):
        warnings.filterwarnings("ignore", module=rf"{name}(\..*)?")
    ours = [logging.getLogger(n) for n in list(logging.Logger.manager.loggerDict)
            if n.split(".")[0] in OUR_PACKAGES]
    for logger in ours:
        if not any(isinstance(f, RedactedTracebacks) for f in logger.filters):
            logger.addFilter(RedactedTracebacks())


def redacted(exc: BaseException) -> str:
    """An exception in one line with quoted values blanked, for logs and stored reasons."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {_QUOTED.sub('<value>', lines[0] if lines else '')}"[:300]


def redacted_traceback(exc: BaseException) -> str:
    """Frames of a traceback and its redacted message."""
    return ("Traceback (most recent call last):\n"
            + "".join(traceback.format_tb(exc.__traceback__)) + redacted(exc))


class RedactedTracebacks(logging.Filter):
    """Exception messages may quote element values (a name typed into the character set
    field, say): a logged traceback keeps its frames, its message loses quoted values."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's exception text; never drops a record."""
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            record.exc_text = redacted_traceback(exc)
            record.exc_info = None
        return True
