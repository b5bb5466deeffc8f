"""Helpers shared by the data sets."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.utils import check_random_state

__all__ = ["check_fraction", "check_noise_std", "check_positive_int", "rng_from", "to_unit_range"]


def rng_from(random_state: Any) -> np.random.RandomState:
    """A ``numpy.random.RandomState`` from an int, ``None`` or a ``RandomState``."""
    return check_random_state(random_state)


def check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def check_fraction(value: Any, name: str, *, upper_open: bool = True) -> float:
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = 0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0
    if not ok:
        bound = "[0, 1)" if upper_open else "[0, 1]"
        raise ValueError(f"{name} must be a number in {bound}, got {value!r}.")
    return value


def check_noise_std(value: Any) -> float:
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
    if not ok or not np.isfinite(value) or value < 0:
        raise ValueError(f"noise_std must be a finite non-negative number, got {value!r}.")
    return float(value)


def to_unit_range(values: np.ndarray, vmax: float) -> np.ndarray:
    r"""Maps :math:`[0, v_{\max}]` linearly onto :math:`[-1, 1]`, as float32."""
    scaled = np.asarray(values, dtype=np.float64) * (2.0 / vmax) - 1.0
    return np.clip(scaled, -1.0, 1.0).astype(np.float32)


class _Unpackable:
    """Dataclass mix-in: iterating yields the fields listed in ``_unpack``."""

    _unpack: tuple[str, ...] = ()

    def __iter__(self):
        return iter(tuple(getattr(self, name) for name in self._unpack))
