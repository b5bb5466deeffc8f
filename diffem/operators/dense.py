r"""Explicit matrices: :math:`y_i = A_i x_i + e_i` with :math:`A_i \in \mathbb{R}^{M \times D}`."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from diffem.operators.base import Operator, as_batched

__all__ = ["Dense"]


class Dense(Operator):
    r"""Dense matrices :math:`A_i`, shared ``(M, D)`` or one per sample ``(n, M, D)``.

    The random projections of the paper's low-dimensional experiment are ``Dense`` operators
    with one ``(2, 5)`` matrix per sample.

    Parameters
    ----------
    matrix : array of shape ``(M, D)`` or ``(n, M, D)``
    noise_std : float or array of shape ``(n,)`` or ``(n, M)``
    """

    _batched = ("weight",)

    def __init__(self, matrix: Any, *, noise_std: Any = 0.0) -> None:
        weight = as_batched(matrix, "matrix", 2, "(M, D) or (n, M, D)")
        self.weight = weight
        self._n, self._m, self._d = weight.shape
        self._set_noise(noise_std)
        self.noise_std = self.noise_std.to(weight.dtype)

    def apply(self, x: Tensor) -> Tensor:
        r""":math:`A_i x_i`, shape ``(n, D) -> (n, M)``, computed in ``x``'s dtype."""
        self._check_input(x, self._d, "x")
        weight = self.weight.to(x.dtype)
        if weight.shape[0] == 1:  # shared matrix: one (n, D) x (D, M) product
            return x @ weight[0].T
        return (weight @ x.unsqueeze(-1)).squeeze(-1)

    def adjoint(self, y: Tensor) -> Tensor:
        r""":math:`A_i^\top y_i`, shape ``(n, M) -> (n, D)``, computed in ``y``'s dtype."""
        self._check_input(y, self._m, "y")
        weight = self.weight.to(y.dtype)
        if weight.shape[0] == 1:  # shared matrix: one (n, M) x (M, D) product
            return y @ weight[0]
        return (weight.mT @ y.unsqueeze(-1)).squeeze(-1)

    def matrix(self) -> Tensor:
        """The stored matrices, shape ``(n | 1, M, D)``."""
        return self.weight
