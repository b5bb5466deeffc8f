r"""Average pooling (super-resolution): :math:`y_i = P x_i + e_i`."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from diffem._validation import check_image_shape, check_int
from diffem.operators.base import Operator

__all__ = ["Downsample"]


class Downsample(Operator):
    r"""Average pooling of every channel over non-overlapping ``f x f`` blocks.

    For an image :math:`x \in \mathbb{R}^{C \times H \times W}` (flattened to ``D = C*H*W``),

    .. math::

        (A x)_{c,u,v} = \frac{1}{f^2} \sum_{a=0}^{f-1} \sum_{b=0}^{f-1} x_{c,\, fu + a,\, fv + b},

    of shape ``(C, H/f, W/f)``, so ``M = C*(H/f)*(W/f)``. The adjoint is nearest-neighbour
    upsampling divided by :math:`f^2`: :math:`(A^\top y)_{c,u,v} = y_{c,\lfloor u/f \rfloor,
    \lfloor v/f \rfloor} / f^2`, and :math:`A A^\top = I / f^2`.

    Parameters
    ----------
    factor : int
        The pooling factor ``f``; ``H`` and ``W`` must be divisible by it.
    image_shape : tuple ``(C, H, W)``
    noise_std : float or array of shape ``(n,)`` or ``(n, M)``
        Noise standard deviation; a vector makes a batch of ``n`` operators.
    """

    def __init__(self, factor: int, image_shape: Any, *, noise_std: Any = 0.0) -> None:
        self.factor = check_int(factor, "factor", 1)
        self.image_shape = check_image_shape(image_shape)
        c, h, w = self.image_shape
        if h % self.factor or w % self.factor:
            raise ValueError(
                f"image_shape (C, H, W) = {self.image_shape} must have H and W divisible by "
                f"factor = {self.factor}."
            )
        self._n = 1
        self._d = c * h * w
        self._m = c * (h // self.factor) * (w // self.factor)
        self._set_noise(noise_std)

    def apply(self, x: Tensor) -> Tensor:
        """Block averages, shape ``(n, C*H*W) -> (n, C*(H/f)*(W/f))``."""
        self._check_input(x, self._d, "x")
        c, h, w = self.image_shape
        pooled = F.avg_pool2d(x.reshape(x.shape[0], c, h, w), self.factor)
        return pooled.reshape(x.shape[0], self._m)

    def adjoint(self, y: Tensor) -> Tensor:
        r"""Nearest upsampling over :math:`f^2`, shape ``(n, C*(H/f)*(W/f)) -> (n, C*H*W)``."""
        self._check_input(y, self._m, "y")
        c, h, w = self.image_shape
        f = self.factor
        small = y.reshape(y.shape[0], c, h // f, w // f)
        big = small.repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1)
        return big.reshape(y.shape[0], self._d) / f**2
