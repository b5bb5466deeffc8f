"""Helpers shared by the data sets."""

from __future__ import annotations

import numpy as np

__all__ = ["to_unit_range"]


def to_unit_range(values: np.ndarray, vmax: float) -> np.ndarray:
    r"""Maps :math:`[0, v_{\max}]` linearly onto :math:`[-1, 1]`, as float32."""
    scaled = np.asarray(values, dtype=np.float64) * (2.0 / vmax) - 1.0
    return np.clip(scaled, -1.0, 1.0).astype(np.float32)


class _Unpackable:
    """Dataclass mix-in: iterating yields the fields listed in ``_unpack``."""

    _unpack: tuple[str, ...] = ()

    def __iter__(self):
        return iter(tuple(getattr(self, name) for name in self._unpack))
