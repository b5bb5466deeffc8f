r"""Image blur (deconvolution problems): :math:`y_i = k_i * x_i + e_i`."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from diffem._validation import as_float_tensor, check_image_shape, check_int
from diffem.operators.base import Operator, as_batched

__all__ = ["Blur"]


class Blur(Operator):
    r"""2-D convolution of every channel with a kernel, zero padding, same-size output.

    For an image :math:`x \in \mathbb{R}^{C \times H \times W}` (flattened to ``D = C*H*W``) and
    a kernel :math:`k \in \mathbb{R}^{k_h \times k_w}` with odd sizes and centre
    :math:`(r_h, r_w) = (\lfloor k_h/2 \rfloor, \lfloor k_w/2 \rfloor)`,

    .. math::

        (A x)_{c,u,v} = \sum_{a,b} k_{a,b} \, x_{c,\, u + r_h - a,\, v + r_w - b},

    with :math:`x = 0` outside the image: the true convolution ``k * x`` (as
    ``scipy.signal.convolve2d(x, k, mode="same")``), so ``M = D``. Its exact adjoint, borders
    included, is the correlation with :math:`k` (the convolution with the flipped kernel),

    .. math::

        (A^\top y)_{c,u,v} = \sum_{a,b} k_{a,b} \, y_{c,\, u - r_h + a,\, v - r_w + b}.

    For symmetric kernels (e.g. :meth:`gaussian`) convolution and correlation coincide.

    Parameters
    ----------
    kernel : array of shape ``(k_h, k_w)`` (shared) or ``(n, k_h, k_w)`` (one per sample)
        Odd sizes; usually square ``(k, k)`` and summing to 1.
    image_shape : tuple ``(C, H, W)``
        Shape of the images, flattened as ``C*H*W`` in ``x`` and ``y``.
    noise_std : float or array of shape ``(n,)`` or ``(n, C*H*W)``
        Noise standard deviation.
    """

    _batched = ("kernel",)

    def __init__(self, kernel: Any, image_shape: Any, *, noise_std: Any = 0.0) -> None:
        self.image_shape = check_image_shape(image_shape)
        weight = as_batched(kernel, "kernel", 2, "(k, k) or (n, k, k) with odd k")
        if weight.shape[-2] % 2 == 0 or weight.shape[-1] % 2 == 0:
            raise ValueError(
                f"kernel must have odd sizes, shape (k, k) or (n, k, k) with odd k; got "
                f"{tuple(weight.shape[-2:])}."
            )
        self.kernel = weight
        c, h, w = self.image_shape
        self._n = weight.shape[0]
        self._d = self._m = c * h * w
        self._set_noise(noise_std)
        self.noise_std = self.noise_std.to(weight.dtype)

    @classmethod
    def gaussian(cls, width: Any, size: int, image_shape: Any, *, noise_std: Any = 0.0) -> Blur:
        r"""A normalised Gaussian blur, :math:`k_{a,b} \propto \exp(-(a^2 + b^2) / 2 w^2)`.

        Parameters
        ----------
        width : float or array of shape ``(n,)``
            Standard deviation :math:`w > 0` of the Gaussian, in pixels; a vector gives one
            kernel per sample.
        size : int
            Odd kernel size ``k``; offsets :math:`a, b \in \{-\lfloor k/2 \rfloor, \dots,
            \lfloor k/2 \rfloor\}`.
        image_shape : tuple ``(C, H, W)``
        noise_std : float or array of shape ``(n,)`` or ``(n, C*H*W)``
        """
        size = check_int(size, "size", 1)
        if size % 2 == 0:
            raise ValueError(f"size must be an odd positive integer, got {size}.")
        widths = as_float_tensor(width, "width")
        if widths.ndim > 1 or widths.numel() == 0:
            raise ValueError(
                f"width must be a scalar or of shape (n,), got shape {tuple(widths.shape)}."
            )
        if not torch.isfinite(widths).all() or (widths <= 0).any():
            raise ValueError("width must be positive and finite.")
        widths = widths.reshape(-1, 1, 1)
        offsets = torch.arange(size, dtype=widths.dtype) - size // 2
        squared = offsets[:, None] ** 2 + offsets[None, :] ** 2
        kernel = torch.exp(-squared / (2 * widths**2))
        kernel = kernel / kernel.sum(dim=(-2, -1), keepdim=True)
        return cls(kernel, image_shape, noise_std=noise_std)

    def _correlate(self, x: Tensor, kernel: Tensor) -> Tensor:
        """Zero-padded correlation of each channel of ``x`` ``(B, D)`` with ``kernel``.

        ``kernel`` has shape ``(n | 1, kh, kw)``; the result has shape ``(max(B, n), D)``.
        """
        c, h, w = self.image_shape
        kernel = kernel.to(dtype=x.dtype, device=x.device)
        batch = max(x.shape[0], kernel.shape[0]) if x.shape[0] else 0
        if batch == 0:
            return x.new_zeros(0, c * h * w)
        images = x.expand(batch, -1).reshape(batch, c, h, w)
        kh, kw = kernel.shape[-2:]
        padding = (kh // 2, kw // 2)
        if kernel.shape[0] == 1:
            out = F.conv2d(
                images.reshape(batch * c, 1, h, w), kernel.reshape(1, 1, kh, kw), padding=padding
            )
        else:
            weight = kernel.repeat_interleave(c, dim=0).unsqueeze(1)  # (n*C, 1, kh, kw)
            out = F.conv2d(
                images.reshape(1, batch * c, h, w), weight, padding=padding, groups=batch * c
            )
        return out.reshape(batch, c * h * w)

    def apply(self, x: Tensor) -> Tensor:
        r""":math:`k_i * x_i` (convolution), shape ``(n, C*H*W) -> (n, C*H*W)``."""
        self._check_input(x, self._d, "x")
        return self._correlate(x, self.kernel.flip(-2, -1))

    def adjoint(self, y: Tensor) -> Tensor:
        r""":math:`A_i^\top y_i`, the correlation with :math:`k_i`, shape ``(n, M) -> (n, D)``."""
        self._check_input(y, self._m, "y")
        return self._correlate(y, self.kernel)
