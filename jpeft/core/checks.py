"""Hyper-parameter checks shared by the methods: each raises one ``ValueError`` naming the
method, the argument and the value (``"lora: alpha must be a finite number > 0, got nan"``)."""

from __future__ import annotations

import math
import numbers
from typing import Any


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive(method: str, name: str, value: Any) -> float:
    """``value``, a finite number ``> 0``."""
    if not _number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{method}: {name} must be a finite number > 0, got {value!r}")
    return value


def non_negative(method: str, name: str, value: Any) -> float:
    """``value``, a finite number ``>= 0``."""
    if not _number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{method}: {name} must be a finite number >= 0, got {value!r}")
    return value


def finite(method: str, name: str, value: Any) -> float:
    """``value``, a finite number."""
    if not _number(value) or not math.isfinite(value):
        raise ValueError(f"{method}: {name} must be a finite number, got {value!r}")
    return value


def positive_int(method: str, name: str, value: Any) -> int:
    """``value``, an int ``>= 1`` (not a bool)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{method}: {name} must be a positive integer, got {value!r}")
    return value


def unit_interval(method: str, name: str, value: Any, *, low_open: bool = False,
                  high_open: bool = True) -> float:
    """``value`` in ``[0, 1)`` (default), ``(0, 1]`` (``low_open=True, high_open=False``), ..."""
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
    ok = _number(value) and math.isfinite(value) and (
        (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1))
    if not ok:
        raise ValueError(f"{method}: {name} must be in {lo}0, 1{hi}, got {value!r}")
    return value
