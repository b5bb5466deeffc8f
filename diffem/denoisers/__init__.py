r"""Learned denoisers :math:`E[x \mid x_t]` trained by denoising score matching through skorch.

- :class:`MLPDenoiser` — vectors, residual MLP backbone (:class:`MLP`).
- :class:`UNetDenoiser` — images flattened to ``C*H*W``, residual U-Net backbone (:class:`UNet`).
- :class:`TransformerDenoiser` — images (patch tokens) or vectors (tokens over groups of
  features), diffusion-transformer backbone with adaLN-Zero conditioning (:class:`Transformer`).

All are :class:`Denoiser` subclasses (skorch ``NeuralNet``\ s) with EDM preconditioning
(Karras et al., 2022), and callables ``net(x_t, sigma) -> E[x | x_t]``.
"""

from .base import Denoiser, DivergenceError, WeightedMSELoss
from .layers import NoiseEmbedding
from .mlp import MLP, MLPDenoiser
from .transformer import Transformer, TransformerDenoiser
from .unet import UNet, UNetDenoiser

__all__ = [
    "MLP",
    "Denoiser",
    "DivergenceError",
    "MLPDenoiser",
    "NoiseEmbedding",
    "Transformer",
    "TransformerDenoiser",
    "UNet",
    "UNetDenoiser",
    "WeightedMSELoss",
]
