r"""Colour to gray conversion (colourisation): :math:`y_i = \sum_c w_c x_{i,c} + e_i`."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from diffem._validation import as_float_tensor, check_finite, check_image_shape
from diffem.operators.base import Operator

__all__ = ["Grayscale"]


class Grayscale(Operator):
    r"""Weighted sum of the channels of an image, e.g. RGB to luma.

    For :math:`x \in \mathbb{R}^{C \times H \times W}` (flattened to ``D = C*H*W``),

    .. math::

        (A x)_{u,v} = \sum_{c=1}^{C} w_c \, x_{c,u,v}, \qquad
        (A^\top y)_{c,u,v} = w_c \, y_{u,v},

    so ``M = H*W``. The default weights are ITU-R BT.601 luma for ``C = 3``.

    Parameters
    ----------
    image_shape : tuple ``(C, H, W)``
        Usually ``(3, H, W)``.
    noise_std : float or array of shape ``(n,)`` or ``(n, H*W)``
        Noise standard deviation; a vector makes a batch of ``n`` operators.
    weights : array of shape ``(C,)``
        The channel weights :math:`w`, shared by all samples.
    """

    _buffers = ("weights",)

    def __init__(
        self,
        image_shape: Any,
        *,
        noise_std: Any = 0.0,
        weights: Any = (0.299, 0.587, 0.114),
    ) -> None:
        self.image_shape = check_image_shape(image_shape)
        c, h, w = self.image_shape
        weight = as_float_tensor(weights, "weights")
        if weight.shape != (c,):
            raise ValueError(
                f"weights must have shape (C,) = ({c},) for image_shape {self.image_shape}, got "
                f"shape {tuple(weight.shape)}; the default weights are for RGB images (C = 3)."
            )
        check_finite(weight, "weights")
        self._n = 1
        self._d = c * h * w
        self._m = h * w
        self._set_noise(noise_std)
        self.noise_std = self.noise_std.to(weight.dtype)
        self.weights = weight.to(self.device)

    def apply(self, x: Tensor) -> Tensor:
        """Channel-weighted sum, shape ``(n, C*H*W) -> (n, H*W)``."""
        self._check_input(x, self._d, "x")
        c = self.image_shape[0]
        weights = self.weights.to(dtype=x.dtype, device=x.device)
        return (x.reshape(x.shape[0], c, self._m) * weights[:, None]).sum(dim=1)

    def adjoint(self, y: Tensor) -> Tensor:
        r""":math:`w \otimes y`, shape ``(n, H*W) -> (n, C*H*W)``."""
        self._check_input(y, self._m, "y")
        weights = self.weights.to(dtype=y.dtype, device=y.device)
        return (weights[:, None] * y[:, None, :]).reshape(y.shape[0], self._d)
