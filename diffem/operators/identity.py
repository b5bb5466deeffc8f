r"""Identity observations :math:`y_i = x_i + e_i` (denoising)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffem._validation import check_int
from diffem.operators.base import Operator

__all__ = ["Identity"]


class Identity(Operator):
    r""":math:`A_i = I_D`: the latents are observed directly, with noise.

    Parameters
    ----------
    n_features : int
        ``D``.
    noise_std : float or array of shape ``(n,)`` or ``(n, D)``
        Noise standard deviation; a vector makes a batch of ``n`` operators.
    """

    def __init__(self, n_features: int, *, noise_std: Any = 0.0) -> None:
        self._d = self._m = check_int(n_features, "n_features", 1)
        self._n = 1
        self._set_noise(noise_std)

    def apply(self, x: Tensor) -> Tensor:
        """:math:`x_i`, shape ``(n, D) -> (n, D)``."""
        self._check_input(x, self._d, "x")
        return x

    def adjoint(self, y: Tensor) -> Tensor:
        """:math:`y_i`, shape ``(n, D) -> (n, D)``."""
        self._check_input(y, self._m, "y")
        return y

    def matrix(self) -> Tensor:
        """:math:`I_D`, shape ``(1, D, D)``."""
        return torch.eye(self._d, dtype=self.dtype, device=self.device).unsqueeze(0)

    def as_diagonal(self) -> Tensor:
        """:math:`A_i = I_D`: ones of shape ``(1, D)``."""
        return torch.ones(1, self._d, dtype=self.dtype, device=self.device)
