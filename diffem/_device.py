"""Where saved tensors go when an object is unpickled."""

from __future__ import annotations

import torch

__all__ = ["loadable_device"]


def loadable_device(saved: str) -> torch.device:
    """The device an object was saved from, or the CPU when it is a CUDA device and CUDA is
    unavailable here (so that a model fitted on a GPU loads on a CPU-only machine)."""
    device = torch.device(saved)
    if device.type == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu")
    return device
