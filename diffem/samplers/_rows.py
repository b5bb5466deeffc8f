"""Row-wise reductions of ``(B, n)`` tensors, shared by the samplers' batched linear algebra."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dot", "finite_rows"]


def dot(a: Tensor, b: Tensor) -> Tensor:
    """:math:`a_i^\\top b_i` for ``(B, n)`` tensors, shape ``(B,)``."""
    return torch.linalg.vecdot(a, b)


def finite_rows(x: Tensor) -> Tensor:
    """``(B,)`` bool: whether the row sum of ``x`` ``(B, n)`` is finite.

    A non-finite entry makes the sum non-finite (``inf - inf`` and ``NaN`` propagate); a sum
    that overflows counts as non-finite too, which is what the samplers want of such rows. One
    reduction, where ``torch.isfinite(x).all(-1)`` takes four element-wise passes.
    """
    return torch.isfinite(x.sum(dim=-1))
