"""Devices: the one place that turns a user's ``device`` into a ``torch.device``."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["loadable_device", "resolve_device"]


def resolve_device(device: Any) -> torch.device:
    """``"auto"`` (or ``None``) gives CUDA when available, else the CPU; anything else goes to
    ``torch.device``.

    Raises ``ValueError`` for an unknown device string, or for CUDA when it is unavailable.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda', 'cuda:<index>' or a torch.device, got "
            f"{device!r}."
        ) from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available.")
    return resolved


def loadable_device(saved: str) -> torch.device:
    """The device an object was saved from, or the CPU when it is a CUDA device and CUDA is
    unavailable here (so that a model fitted on a GPU loads on a CPU-only machine)."""
    device = torch.device(saved)
    if device.type == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu")
    return device
