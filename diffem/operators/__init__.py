r"""Batched linear-Gaussian observation operators :math:`y_i = A_i x_i + e_i`."""

from diffem.operators.base import Operator
from diffem.operators.blur import Blur
from diffem.operators.dense import Dense
from diffem.operators.downsample import Downsample
from diffem.operators.fourier import FourierMask
from diffem.operators.grayscale import Grayscale
from diffem.operators.identity import Identity
from diffem.operators.mask import Mask

__all__ = [
    "Blur",
    "Dense",
    "Downsample",
    "FourierMask",
    "Grayscale",
    "Identity",
    "Mask",
    "Operator",
]
