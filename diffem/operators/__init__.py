r"""Batched linear-Gaussian observation operators :math:`y_i = A_i x_i + e_i`."""

from diffem.operators.base import Operator
from diffem.operators.dense import Dense
from diffem.operators.identity import Identity
from diffem.operators.mask import Mask

__all__ = ["Dense", "Identity", "Mask", "Operator"]
