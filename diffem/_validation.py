"""Validation of scalar parameters: one home for the checks, with messages that name the
parameter."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_int", "check_number"]


def check_number(
    value: Any, name: str, low: float, high: float = math.inf, low_open: bool = False
) -> float:
    """``float(value)`` if it is a finite real in ``[low, high]`` (``(low, high]`` with
    ``low_open``); ``ValueError`` naming ``name`` otherwise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be a number in {bracket}{low}, {high}], got {value!r}.")
    return float(value)


def check_int(value: Any, name: str, low: int) -> int:
    """``value`` if it is an integer ``>= low``; ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
    return value
