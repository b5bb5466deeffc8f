r"""Missing entries (inpainting): :math:`y_i = M_i x_i + e_i` with a binary diagonal :math:`M_i`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffem._validation import as_float_tensor
from diffem.operators.base import Operator, _as_bool_tensor

__all__ = ["Mask"]


class Mask(Operator):
    r""":math:`A_i = \operatorname{diag}(m_i)` with a boolean mask :math:`m_i \in \{0, 1\}^D`.

    Observations keep the full length ``D``; hidden entries are *pinned* (see
    :mod:`diffem.operators.base`): their values are ignored and may be NaN.

    Parameters
    ----------
    mask : bool array of shape ``(n, D)`` (one mask per sample) or ``(D,)`` (shared)
        ``True`` where an entry is observed.
    noise_std : float or array of shape ``(n,)`` or ``(n, D)``
        Noise standard deviation of the observed entries.
    """

    _batched = ("mask",)

    def __init__(self, mask: Any, *, noise_std: Any = 0.0) -> None:
        mask = _as_bool_tensor(mask, "mask")
        if mask.ndim == 1:
            mask = mask.unsqueeze(0)
        if mask.ndim != 2 or mask.shape[-1] == 0:
            raise ValueError(f"mask must have shape (n, D) or (D,), got {tuple(mask.shape)}.")
        self.mask = mask
        self._n, self._d = mask.shape
        self._m = self._d
        self._set_noise(noise_std)
        self.mask = self.mask.to(self.device)

    @classmethod
    def from_nan(cls, Y: Any, *, noise_std: Any = 0.0) -> Mask:
        """The mask of the finite entries of ``Y`` (shape ``(n, D)``): NaN marks a missing value."""
        Y = as_float_tensor(Y, "Y")
        if Y.ndim != 2:
            raise ValueError(f"Y must have shape (n, D), got {tuple(Y.shape)}.")
        if torch.isinf(Y).any():
            raise ValueError("Y contains inf; only NaN marks a missing entry.")
        return cls(~torch.isnan(Y), noise_std=noise_std)

    @property
    def observed(self) -> Tensor:
        """The mask, shape ``(n | 1, D)``."""
        return self.mask

    def apply(self, x: Tensor) -> Tensor:
        r""":math:`m_i \odot x_i`, shape ``(n, D) -> (n, D)``."""
        self._check_input(x, self._d, "x")
        return torch.where(self.mask, x, 0.0)

    def adjoint(self, y: Tensor) -> Tensor:
        r""":math:`m_i \odot y_i` (the map is self-adjoint), shape ``(n, D) -> (n, D)``."""
        self._check_input(y, self._m, "y")
        # ``where`` rather than a product, so that NaN in hidden entries does not propagate.
        return torch.where(self.mask, y, 0.0)

    def matrix(self) -> Tensor:
        r""":math:`\operatorname{diag}(m_i)`, shape ``(n | 1, D, D)``."""
        return torch.diag_embed(self.mask.to(self.dtype))

    def as_diagonal(self) -> Tensor:
        r""":math:`A_i = \operatorname{diag}(m_i)`: the mask as numbers, shape ``(n | 1, D)``."""
        return self.mask.to(self.dtype)
