"""Pickling of fitted estimators holding tensors.

Tensors go through ``torch.save`` so that a model fitted on CUDA loads on a CPU-only machine
(``map_location="cpu"`` when CUDA is unavailable, :func:`diffem._device.loadable_device`).
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import torch

__all__ = ["dumps", "loads"]


def _map_location() -> str | None:
    """``"cpu"`` when CUDA is unavailable (so CUDA tensors load on the CPU), else ``None``."""
    return None if torch.cuda.is_available() else "cpu"


def dumps(obj: Any) -> bytes:
    """``obj`` serialised by ``torch.save``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def loads(blob: bytes) -> Any:
    """The object of :func:`dumps`, its tensors mapped to the CPU when CUDA is unavailable."""
    from skorch.exceptions import DeviceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeviceWarning)
        return torch.load(io.BytesIO(blob), map_location=_map_location(), weights_only=False)
