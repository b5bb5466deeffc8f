r"""Undersampled 2-D Fourier transform (accelerated MRI): :math:`y_i = M_i F x_i + e_i`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffem._validation import check_image_shape
from diffem.operators.base import Operator, _as_bool_tensor

__all__ = ["FourierMask"]


def _self_conjugate(h: int, w: int, device: torch.device) -> Tensor:
    """Bool ``(H, W)``: frequencies :math:`k = -k \\bmod (H, W)`, whose coefficient is real."""
    rows = torch.zeros(h, dtype=torch.bool, device=device)
    cols = torch.zeros(w, dtype=torch.bool, device=device)
    rows[0] = cols[0] = True
    if h % 2 == 0:
        rows[h // 2] = True
    if w % 2 == 0:
        cols[w // 2] = True
    return rows[:, None] & cols[None, :]


class FourierMask(Operator):
    r"""Sampled frequencies of the orthonormal 2-D discrete Fourier transform of each channel.

    For :math:`x \in \mathbb{R}^{C \times H \times W}` (flattened to ``D = C*H*W``), let
    :math:`z = F x` with :math:`F` the orthonormal 2-D DFT of each channel
    (``torch.fft.fft2(..., norm="ortho")``) and :math:`m_i \in \{0, 1\}^{H \times W}` the
    sampling mask of sample :math:`i`. The measurements are the real then the imaginary parts,

    .. math::

        A_i x = \big(m_i \odot \operatorname{Re} z,\ m_i \odot \operatorname{Im} z\big)
        \in \mathbb{R}^{2 C H W}, \qquad
        A_i^\top (a, b) = \operatorname{Re}\, F^{-1}\big(m_i \odot (a + \mathrm{i}\, b)\big),

    each part flattened as ``C*H*W``, so ``M = 2*C*H*W`` and, with a full mask,
    :math:`A^\top A = I`. Entries of unsampled frequencies are *pinned* (see
    :mod:`diffem.operators.base`), and so are the imaginary parts of the self-conjugate
    frequencies (:math:`k \equiv -k`: the mean, and the Nyquist lines of even sizes), which are
    identically zero for a real :math:`x` and carry no information. :attr:`observed` marks both.
    For a real image, frequencies :math:`k` and :math:`-k` carry the same information
    (:math:`z_{-k} = \bar z_k`); sampling both counts the measurement twice, with independent
    noise.

    Parameters
    ----------
    mask : bool array of shape ``(H, W)`` (shared) or ``(n, H, W)`` (one per sample)
        ``True`` where a frequency is sampled, in ``torch.fft.fft2`` order (zero frequency at
        ``[0, 0]``; use ``torch.fft.ifftshift`` on a centred mask).
    image_shape : tuple ``(C, H, W)``, optional
        Defaults to ``(1, H, W)``.
    noise_std : float or array of shape ``(n,)`` or ``(n, 2*C*H*W)``
        Noise standard deviation (of each real and imaginary part).
    """

    _batched = ("mask",)

    def __init__(self, mask: Any, image_shape: Any = None, *, noise_std: Any = 0.0) -> None:
        mask = _as_bool_tensor(mask, "mask")
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if mask.ndim != 3 or 0 in mask.shape:
            raise ValueError(f"mask must have shape (H, W) or (n, H, W), got {tuple(mask.shape)}.")
        if image_shape is None:
            image_shape = (1, *mask.shape[-2:])
        self.image_shape = check_image_shape(image_shape)
        c, h, w = self.image_shape
        if tuple(mask.shape[-2:]) != (h, w):
            raise ValueError(
                f"mask must have shape (H, W) = ({h}, {w}) or (n, H, W) = (n, {h}, {w}) for "
                f"image_shape {self.image_shape}, got {tuple(mask.shape)}."
            )
        self.mask = mask
        self._n = mask.shape[0]
        self._d = c * h * w
        self._m = 2 * self._d
        self._set_noise(noise_std)
        self.mask = self.mask.to(self.device)

    def _masks(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Masks ``(n | 1, 1, H, W)`` of the observed real and imaginary parts."""
        _, h, w = self.image_shape
        real = self.mask.to(device).unsqueeze(1)
        return real, real & ~_self_conjugate(h, w, device)

    @property
    def observed(self) -> Tensor:
        """Bool ``(n | 1, 2*C*H*W)``: sampled frequencies, less zero imaginary parts."""
        c = self.image_shape[0]
        real, imag = self._masks(self.mask.device)
        batch = real.shape[0]
        real = real.expand(-1, c, -1, -1).reshape(batch, self._d)
        imag = imag.expand(-1, c, -1, -1).reshape(batch, self._d)
        return torch.cat([real, imag], dim=-1)

    def apply(self, x: Tensor) -> Tensor:
        """Sampled real and imaginary parts, shape ``(n, C*H*W) -> (n, 2*C*H*W)``."""
        self._check_input(x, self._d, "x")
        c, h, w = self.image_shape
        if x.shape[0] == 0:  # MKL's FFT rejects empty batches
            return x.new_zeros(0, self._m)
        z = torch.fft.fft2(x.reshape(x.shape[0], c, h, w), norm="ortho")
        real_mask, imag_mask = self._masks(x.device)
        real = torch.where(real_mask, z.real, 0.0)
        imag = torch.where(imag_mask, z.imag, 0.0)
        batch = real.shape[0]
        return torch.cat([real.reshape(batch, self._d), imag.reshape(batch, self._d)], dim=-1)

    def adjoint(self, y: Tensor) -> Tensor:
        r""":math:`\operatorname{Re} F^{-1}(m \odot (a + \mathrm{i} b))`.

        Shape ``(n, 2*C*H*W) -> (n, C*H*W)``; ``a`` and ``b`` are the two halves of ``y``.
        """
        self._check_input(y, self._m, "y")
        c, h, w = self.image_shape
        if y.shape[0] == 0:
            return y.new_zeros(0, self._d)
        a, b = y.reshape(y.shape[0], 2, c, h, w).unbind(dim=1)
        real_mask, imag_mask = self._masks(y.device)
        a = torch.where(real_mask, a, 0.0)
        b = torch.where(imag_mask, b, 0.0)
        x = torch.fft.ifft2(torch.complex(a, b), norm="ortho").real
        return x.reshape(x.shape[0], self._d)
