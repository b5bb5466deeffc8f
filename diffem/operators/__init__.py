r"""Batched observation operators with Gaussian noise: linear, :math:`y_i = A_i x_i + e_i`, and
differentiable nonlinear, :math:`y_i = f(x_i; \theta_i) + e_i` (:class:`Nonlinear`)."""

from diffem.operators.base import Operator
from diffem.operators.blur import Blur
from diffem.operators.dense import Dense
from diffem.operators.downsample import Downsample
from diffem.operators.fourier import FourierMask
from diffem.operators.grayscale import Grayscale
from diffem.operators.identity import Identity
from diffem.operators.mask import Mask
from diffem.operators.nonlinear import Linearized, Nonlinear

__all__ = [
    "Blur",
    "Dense",
    "Downsample",
    "FourierMask",
    "Grayscale",
    "Identity",
    "Linearized",
    "Mask",
    "Nonlinear",
    "Operator",
]
