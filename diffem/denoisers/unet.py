r"""Residual U-Net backbone and the :class:`UNetDenoiser` for flattened images."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .._validation import check_image_shape, check_int, check_number
from .base import Denoiser
from .layers import NoiseEmbedding

__all__ = ["UNet", "UNetDenoiser"]


def _groups(channels: int, max_groups: int = 8) -> int:
    return math.gcd(channels, max_groups)


class _ResBlock(nn.Module):
    r"""Convolutional residual block with noise-level modulation.

    .. math::
        h = \text{Conv}(\text{SiLU}(\text{GN}(x))), \quad
        h = \text{GN}(h) \odot (1 + \gamma(e)) + \beta(e), \quad
        x \leftarrow \text{Skip}(x) + \text{Conv}(\text{Dropout}(\text{SiLU}(h)))
    """

    def __init__(self, c_in: int, c_out: int, emb: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.modulation = nn.Linear(emb, 2 * c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out, affine=False)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.modulation(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class _Attention(nn.Module):
    r"""Multi-head self-attention over pixels, residual: :math:`x + W_o \,
    \text{softmax}(Q K^\top / \sqrt{d}) V` (Vaswani et al., 2017)."""

    def __init__(self, channels: int, heads: int = 1) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention heads ({heads}) must divide channels ({channels}).")
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        y = F.scaled_dot_product_attention(
            q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)
        )
        return x + self.out(y.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    r"""Noise-conditioned residual U-Net :math:`F_\theta(x, c_{\text{noise}})` for images.

    Input convolution; per resolution level ``n_res_blocks`` residual blocks (GroupNorm,
    SiLU, 3x3 convolutions, scale/shift from the noise embedding), then a stride-2
    convolution; a middle block (with self-attention if ``attention``); a mirrored decoder
    with skip connections and nearest-neighbour upsampling to the skip's exact size; a
    zero-initialised output convolution (the untrained preconditioned denoiser is
    :math:`c_{\text{skip}} x_t`). Odd sizes work (stride-2 convolutions round up, the
    decoder upsamples to the encoder's sizes); the image must be at least
    :math:`2^{L-1}` pixels on each side for ``L = len(channels)`` levels.

    Parameters
    ----------
    features : int
        ``C * H * W`` (checked against ``image_shape``).
    image_shape : tuple of int
        ``(C, H, W)``.
    channels : sequence of int
        Channels per resolution level (``len(channels)`` levels).
    n_res_blocks : int
        Residual blocks per level in the encoder and in the decoder.
    emb_features : int
        Size of the noise-level embedding.
    attention : bool
        Self-attention in the middle (lowest-resolution) block.
    heads : int
        Attention heads.
    dropout : float
        Dropout probability inside the residual blocks.

    Shapes
    ------
    ``forward(x (B, C*H*W), c_noise (B,)) -> (B, C*H*W)``.
    """

    def __init__(
        self,
        features: int,
        image_shape: Sequence[int],
        channels: Sequence[int] = (32, 64),
        n_res_blocks: int = 1,
        emb_features: int = 64,
        attention: bool = False,
        heads: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        shape = check_image_shape(image_shape)
        c, h, w = shape
        if features != c * h * w:
            raise ValueError(
                f"features must equal C*H*W = {c * h * w} for image_shape {shape}, got {features}."
            )
        chans = tuple(int(ch) for ch in channels)
        if not chans or any(ch < 1 for ch in chans):
            raise ValueError(
                f"channels must be a non-empty sequence of positive ints, got {channels!r}."
            )
        levels = len(chans)
        if min(h, w) < 2 ** (levels - 1):
            raise ValueError(
                f"image_shape {shape} is too small for {levels} resolution levels: H and W "
                f"must be at least {2 ** (levels - 1)}; use fewer channels entries."
            )
        check_int(n_res_blocks, "n_res_blocks", 1)
        check_number(dropout, "dropout", 0.0, 1.0, high_open=True)
        self.image_shape = shape
        self.embedding = NoiseEmbedding(emb_features)
        self.conv_in = nn.Conv2d(c, chans[0], 3, padding=1)

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        ch = chans[0]
        for i, ch_out in enumerate(chans):
            blocks = nn.ModuleList()
            for _ in range(n_res_blocks):
                blocks.append(_ResBlock(ch, ch_out, emb_features, dropout))
                ch = ch_out
            self.down.append(blocks)
            if i < levels - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))

        self.mid1 = _ResBlock(ch, ch, emb_features, dropout)
        self.mid_attention = _Attention(ch, heads) if attention else None
        self.mid2 = _ResBlock(ch, ch, emb_features, dropout)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(levels)):
            if i < levels - 1:
                self.upsample.append(nn.Conv2d(ch, chans[i], 3, padding=1))
                ch = chans[i]
            blocks = nn.ModuleList()
            c_in = ch + chans[i]
            for _ in range(n_res_blocks):
                blocks.append(_ResBlock(c_in, chans[i], emb_features, dropout))
                c_in = chans[i]
            ch = chans[i]
            self.up.append(blocks)

        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = nn.Conv2d(ch, c, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        b = x.shape[0]
        emb = F.silu(self.embedding(c_noise))
        h = self.conv_in(x.reshape(b, *self.image_shape))
        skips = []
        for i, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid1(h, emb)
        if self.mid_attention is not None:
            h = self.mid_attention(h)
        h = self.mid2(h, emb)
        for j, blocks in enumerate(self.up):
            skip = skips[-1 - j]
            if j > 0:
                h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
                h = self.upsample[j - 1](h)
            h = torch.cat([h, skip], dim=1)
            for block in blocks:
                h = block(h, emb)
        return self.conv_out(F.silu(self.norm_out(h))).reshape(b, -1)


class UNetDenoiser(Denoiser):
    r"""Learned denoiser :math:`E[x \mid x_t]` for images flattened to ``C*H*W``, with a
    :class:`UNet` backbone.

    Parameters
    ----------
    image_shape : tuple of int
        ``(C, H, W)`` of the images; ``X`` must have ``C*H*W`` columns (channel-major,
        ``x.reshape(C, H, W)``).
    module : torch.nn.Module class
        Backbone, default :class:`UNet`; receives ``features`` and ``image_shape``.
    **kwargs
        As :class:`~diffem.denoisers.base.Denoiser`; the backbone's parameters are
        ``module__channels``, ``module__n_res_blocks``, ``module__emb_features``,
        ``module__attention``, ``module__heads``, ``module__dropout``.
    """

    default_module = UNet
    _injected_module_args = ("features", "image_shape")

    def __init__(
        self,
        image_shape: Sequence[int],
        module: type[nn.Module] | nn.Module = UNet,
        **kwargs: Any,
    ) -> None:
        super().__init__(module, **kwargs)
        self.image_shape = image_shape

    def _default_features(self) -> int | None:
        c, h, w = check_image_shape(self.image_shape)
        return c * h * w

    def _extra_module_kwargs(self) -> dict[str, Any]:
        return {"image_shape": check_image_shape(self.image_shape)}
