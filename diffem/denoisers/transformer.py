r"""Diffusion-transformer backbone and the :class:`TransformerDenoiser` for images and vectors."""

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

__all__ = ["Transformer", "TransformerDenoiser"]


def _modulate(h: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    r""":math:`h \odot (1 + \gamma) + \beta`, conditioning ``(B, d)``, tokens ``(B, N, d)``."""
    return h * (1 + scale[:, None]) + shift[:, None]


class _Block(nn.Module):
    r"""Transformer block with adaLN-Zero conditioning (Peebles & Xie, 2023, "Scalable
    Diffusion Models with Transformers", sec. 3.2).

    .. math::
        (\beta_1, \gamma_1, \alpha_1, \beta_2, \gamma_2, \alpha_2) = W \, e, \\
        h \leftarrow h + \alpha_1 \odot \text{Attn}\big(\text{LN}(h) \odot (1 + \gamma_1)
            + \beta_1\big), \quad
        h \leftarrow h + \alpha_2 \odot \text{MLP}\big(\text{LN}(h) \odot (1 + \gamma_2)
            + \beta_2\big),

    with :math:`W` zero-initialised, so that every block starts as the identity.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, emb: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        hidden = max(1, round(mlp_ratio * width))
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width)
        )
        self.modulation = nn.Linear(emb, 6 * width)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(emb).chunk(6, dim=-1)
        b, n, d = h.shape
        qkv = self.qkv(_modulate(self.norm1(h), shift1, scale1))
        q, k, v = qkv.reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        h = h + gate1[:, None] * self.proj(a)
        return h + gate2[:, None] * self.mlp(_modulate(self.norm2(h), shift2, scale2))


class Transformer(nn.Module):
    r"""Noise-conditioned diffusion transformer :math:`F_\theta(x, c_{\text{noise}})` (DiT,
    Peebles & Xie, 2023) for images or vectors.

    Tokens: an image ``(C, H, W)`` is cut into non-overlapping ``p x p`` patches
    (``p = patch_size``; ``C p^2`` values each, ``H`` and ``W`` padded with zeros to multiples
    of ``p``); a vector ``(D,)`` (``image_shape=None``) into groups of ``p`` consecutive
    features (the last one zero-padded). Each token is embedded linearly, plus a learned
    position embedding; ``n_blocks`` transformer blocks with adaptive layer norm
    (adaLN-Zero) conditioned on an embedding :math:`e` of :math:`c_{\text{noise}}`; a final
    adaptive layer norm and a zero-initialised linear map back to the patch values, so that
    the untrained preconditioned denoiser is :math:`c_{\text{skip}}(\sigma) x_t`.

    Parameters
    ----------
    features : int
        Data dimension ``D`` (``C * H * W`` for images).
    image_shape : tuple of int or None
        ``(C, H, W)`` of images, or ``None`` for vectors.
    patch_size : int
        Patch side ``p`` (images) or features per token (vectors).
    hidden_features : int
        Token width.
    n_blocks : int
        Transformer blocks.
    heads : int
        Attention heads (must divide ``hidden_features``).
    mlp_ratio : float
        Hidden width of the blocks' MLPs, as a multiple of ``hidden_features``.
    emb_features : int
        Size of the noise-level embedding.
    dropout : float
        Dropout probability inside the blocks' MLPs.

    Shapes
    ------
    ``forward(x (B, D), c_noise (B,)) -> (B, D)``.
    """

    def __init__(
        self,
        features: int,
        image_shape: Sequence[int] | None = None,
        patch_size: int = 2,
        hidden_features: int = 128,
        n_blocks: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        emb_features: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in [
            ("features", features),
            ("patch_size", patch_size),
            ("hidden_features", hidden_features),
            ("n_blocks", n_blocks),
            ("heads", heads),
        ]:
            check_int(value, name, 1)
        if hidden_features % heads:
            raise ValueError(f"heads ({heads}) must divide hidden_features ({hidden_features}).")
        check_number(mlp_ratio, "mlp_ratio", 0.0, low_open=True)
        check_number(dropout, "dropout", 0.0, 1.0, high_open=True)
        p = patch_size
        if image_shape is None:
            self.image_shape = None
            self.grid = (math.ceil(features / p),)
            token = p
        else:
            c, h, w = check_image_shape(image_shape)
            if features != c * h * w:
                raise ValueError(
                    f"features must equal C*H*W = {c * h * w} for image_shape "
                    f"{(c, h, w)}, got {features}."
                )
            self.image_shape = (c, h, w)
            self.grid = (math.ceil(h / p), math.ceil(w / p))
            token = c * p * p
        self.features = features
        self.patch_size = p
        tokens = math.prod(self.grid)
        self.embedding = NoiseEmbedding(emb_features)
        self.patch = nn.Linear(token, hidden_features)
        self.position = nn.Parameter(0.02 * torch.randn(tokens, hidden_features))
        self.blocks = nn.ModuleList(
            _Block(hidden_features, heads, mlp_ratio, emb_features, dropout)
            for _ in range(n_blocks)
        )
        self.norm = nn.LayerNorm(hidden_features, elementwise_affine=False)
        self.final_modulation = nn.Linear(emb_features, 2 * hidden_features)
        self.output = nn.Linear(hidden_features, token)
        for layer in (self.final_modulation, self.output):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def tokens(self, x: Tensor) -> Tensor:
        """``(B, D)`` data to ``(B, N, token)`` patches (zero-padded)."""
        b, p = x.shape[0], self.patch_size
        if self.image_shape is None:
            x = F.pad(x, (0, self.grid[0] * p - self.features))
            return x.reshape(b, self.grid[0], p)
        c, h, w = self.image_shape
        gh, gw = self.grid
        x = F.pad(x.reshape(b, c, h, w), (0, gw * p - w, 0, gh * p - h))
        x = x.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, gh * gw, c * p * p)

    def untokens(self, t: Tensor) -> Tensor:
        """Inverse of :meth:`tokens`: ``(B, N, token)`` to ``(B, D)`` (padding dropped)."""
        b, p = t.shape[0], self.patch_size
        if self.image_shape is None:
            return t.reshape(b, -1)[:, : self.features]
        c, h, w = self.image_shape
        gh, gw = self.grid
        x = t.reshape(b, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, gh * p, gw * p)[:, :, :h, :w].reshape(b, -1)

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        emb = F.silu(self.embedding(c_noise))
        h = self.patch(self.tokens(x)) + self.position
        for block in self.blocks:
            h = block(h, emb)
        shift, scale = self.final_modulation(emb).chunk(2, dim=-1)
        return self.untokens(self.output(_modulate(self.norm(h), shift, scale)))


class TransformerDenoiser(Denoiser):
    r"""Learned denoiser :math:`E[x \mid x_t]` with a diffusion-transformer backbone
    (:class:`Transformer`): patch tokens for images, tokens over groups of features for
    vectors, noise-level conditioning by adaptive layer norm (adaLN-Zero).

    Parameters
    ----------
    image_shape : tuple of int or None
        ``(C, H, W)`` of images flattened channel-major to ``C*H*W`` columns
        (``x.reshape(C, H, W)``), or ``None`` for vectors (the size is inferred from ``X``).
    module : torch.nn.Module class
        Backbone, default :class:`Transformer`; receives ``features`` and ``image_shape``.
    **kwargs
        As :class:`~diffem.denoisers.base.Denoiser`; the backbone's parameters are
        ``module__patch_size``, ``module__hidden_features``, ``module__n_blocks``,
        ``module__heads``, ``module__mlp_ratio``, ``module__emb_features`` and
        ``module__dropout``.

    Examples
    --------
    >>> import torch
    >>> net = TransformerDenoiser(image_shape=(1, 4, 4), max_epochs=1,
    ...                           module__hidden_features=16, module__n_blocks=1)
    >>> net = net.fit(torch.randn(64, 16))
    >>> net(torch.randn(2, 16), 0.5).shape
    torch.Size([2, 16])
    """

    default_module = Transformer
    _injected_module_args = ("features", "image_shape")

    def __init__(
        self,
        image_shape: Sequence[int] | None = None,
        module: type[nn.Module] | nn.Module = Transformer,
        **kwargs: Any,
    ) -> None:
        super().__init__(module, **kwargs)
        self.image_shape = image_shape

    def _default_features(self) -> int | None:
        if self.image_shape is None:
            return None
        return math.prod(check_image_shape(self.image_shape))

    def _extra_module_kwargs(self) -> dict[str, Any]:
        shape = None if self.image_shape is None else check_image_shape(self.image_shape)
        return {"image_shape": shape}
