r"""Learned denoisers :math:`E[x \mid x_t]` trained by denoising score matching through skorch.

- :class:`MLPDenoiser` — vectors, residual MLP backbone (:class:`MLP`).
- :class:`UNetDenoiser` — images flattened to ``C*H*W``, residual U-Net backbone (:class:`UNet`).

Both are :class:`Denoiser` subclasses (skorch ``NeuralNet``\ s) with EDM preconditioning
(Karras et al., 2022), and callables ``net(x_t, sigma) -> E[x | x_t]``.
"""

from .base import Denoiser, DivergenceError, WeightedMSELoss
from .layers import NoiseEmbedding
from .mlp import MLP, MLPDenoiser
from .unet import UNet, UNetDenoiser

__all__ = [
    "MLP",
    "Denoiser",
    "DivergenceError",
    "MLPDenoiser",
    "NoiseEmbedding",
    "UNet",
    "UNetDenoiser",
    "WeightedMSELoss",
]
