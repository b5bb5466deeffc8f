r"""Residual MLP backbone and the :class:`MLPDenoiser` for vector data."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .._validation import check_int, check_number
from .base import Denoiser
from .layers import NoiseEmbedding

__all__ = ["MLP", "MLPDenoiser"]


class _ResidualBlock(nn.Module):
    r"""Pre-norm residual block with adaptive scale and shift from the noise embedding.

    .. math::
        h = \text{LN}(x) \odot (1 + \gamma(e)) + \beta(e), \qquad
        x \leftarrow x + W_2 \, \text{Dropout}(\text{SiLU}(W_1 \, \text{SiLU}(h)))
    """

    def __init__(self, hidden: int, emb: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.modulation = nn.Linear(emb, 2 * hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.modulation(emb).chunk(2, dim=-1)
        h = self.norm(x) * (1 + scale) + shift
        h = self.fc1(nn.functional.silu(h))
        h = self.fc2(self.dropout(nn.functional.silu(h)))
        return x + h


class MLP(nn.Module):
    r"""Noise-conditioned residual MLP :math:`F_\theta(x, c_{\text{noise}})` for vectors.

    Input projection, ``n_blocks`` residual blocks (LayerNorm, SiLU, adaptive scale/shift
    conditioned on an embedding of :math:`c_{\text{noise}}`), LayerNorm, output projection.
    The output projection starts at zero, so that the untrained preconditioned denoiser is
    :math:`D(x_t, \sigma) = c_{\text{skip}}(\sigma) x_t`, the exact denoiser of
    :math:`\mathcal{N}(0, \sigma_{\text{data}}^2 I)` data.

    Parameters
    ----------
    features : int
        Data dimension ``D`` (set by the denoiser from the training data).
    hidden_features : int
        Width of the residual stream.
    n_blocks : int
        Number of residual blocks.
    emb_features : int
        Size of the noise-level embedding.
    dropout : float
        Dropout probability inside the residual blocks.

    Shapes
    ------
    ``forward(x (B, D), c_noise (B,)) -> (B, D)``.
    """

    def __init__(
        self,
        features: int,
        hidden_features: int = 256,
        n_blocks: int = 3,
        emb_features: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_int(features, "features", 1)
        check_int(hidden_features, "hidden_features", 1)
        check_int(n_blocks, "n_blocks", 0)
        check_number(dropout, "dropout", 0.0, 1.0, high_open=True)
        self.features = features
        self.embedding = NoiseEmbedding(emb_features)
        self.input = nn.Linear(features, hidden_features)
        self.blocks = nn.ModuleList(
            _ResidualBlock(hidden_features, emb_features, dropout) for _ in range(n_blocks)
        )
        self.norm = nn.LayerNorm(hidden_features)
        self.output = nn.Linear(hidden_features, features)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        emb = nn.functional.silu(self.embedding(c_noise))
        h = self.input(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.output(self.norm(h))


class MLPDenoiser(Denoiser):
    r"""Learned denoiser :math:`E[x \mid x_t]` for vectors, with an :class:`MLP` backbone.

    See :class:`~diffem.denoisers.base.Denoiser` for the training objective, the parameters
    and the callable protocol. The backbone's parameters are searchable as
    ``module__hidden_features``, ``module__n_blocks``, ``module__emb_features`` and
    ``module__dropout``; the input size ``module__features`` is inferred from ``X`` at fit.

    Examples
    --------
    >>> import torch
    >>> net = MLPDenoiser(max_epochs=2, module__hidden_features=32)
    >>> net = net.fit(torch.randn(512, 3))
    >>> net(torch.randn(4, 3), 0.5).shape
    torch.Size([4, 3])
    """

    default_module = MLP

    def __init__(self, module: type[nn.Module] | nn.Module = MLP, **kwargs: Any) -> None:
        super().__init__(module, **kwargs)
