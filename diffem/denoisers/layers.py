r"""Building blocks shared by the denoiser backbones.

The backbones are the networks :math:`F_\theta(c_{\text{in}} x_t, c_{\text{noise}})` of the EDM
preconditioning (Karras et al., 2022); they see the noise level only through
:math:`c_{\text{noise}}(\sigma) = \log(\sigma) / 4`, which :class:`NoiseEmbedding` maps to a
feature vector that modulates every residual block (adaptive scale and shift).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["NoiseEmbedding"]


class NoiseEmbedding(nn.Module):
    r"""Sinusoidal features of the noise level followed by a small MLP.

    .. math::
        e(c) = \text{MLP}\big([\sin(\omega_k c), \cos(\omega_k c)]_{k=1}^{K}\big),
        \qquad \omega_k = \exp\big(\tfrac{k - 1}{K - 1} \log \omega_{\max}\big)

    with :math:`K = \lceil \text{features} / 2 \rceil` log-spaced frequencies in
    :math:`[1, \omega_{\max}]` (Vaswani et al., 2017; Ho et al., 2020).

    Parameters
    ----------
    features : int
        Size of the embedding.
    max_frequency : float
        Largest angular frequency :math:`\omega_{\max}`. The default resolves the range of
        :math:`c_{\text{noise}} \in [\log(10^{-3}) / 4, \log(10^2) / 4] \approx [-1.7, 1.2]`.

    Shapes
    ------
    ``c_noise`` ``(B,)`` -> ``(B, features)``.
    """

    def __init__(self, features: int = 64, max_frequency: float = 100.0) -> None:
        super().__init__()
        if features < 2:
            raise ValueError(f"emb_features must be an integer >= 2, got {features!r}.")
        half = (features + 1) // 2
        freqs = torch.exp(torch.linspace(0.0, math.log(max_frequency), half))
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(
            nn.Linear(2 * half, features),
            nn.SiLU(),
            nn.Linear(features, features),
        )

    def forward(self, c_noise: Tensor) -> Tensor:
        angles = c_noise.reshape(-1, 1).to(self.freqs.dtype) * self.freqs
        return self.mlp(torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1))
