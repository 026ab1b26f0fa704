"""Header values as they arrive: any type after a malformed transfer, so every reader here
converts defensively and returns None (or empty) instead of raising."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from pydicom import Dataset
from pydicom.valuerep import PersonName


def as_int(value: Any) -> int | None:
    """An integer from an int/IS/str value, None when it is not one (bools and floats too)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"[+-]?[0-9]{1,10}", text):
            return int(text)
    return None


def as_float(value: Any) -> float | None:
    """A finite float from a DS/number/str value, None otherwise."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def text_of(value: Any) -> str:
    """Any text-like element value (including multi-valued) as one string."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, PersonName):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("latin-1", "replace")
    if isinstance(value, Iterable):
        return " ".join(text_of(v) for v in value)
    return str(value)


def values_of(value: Any) -> list[Any]:
    """A multi-valued element as a list (a single value becomes a one-item list)."""
    if value is None:
        return []
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        return [value]
    return list(value)


def sequence_items(ds: Dataset, keyword: str) -> list[Dataset]:
    """Items of a sequence, or [] when it is absent or not a sequence of datasets."""
    value = ds.get(keyword)
    if value is None or isinstance(value, str | bytes) or not isinstance(value, Iterable):
        return []
    return [item for item in value if isinstance(item, Dataset)]

