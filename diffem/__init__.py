"""diffem: learn diffusion-model priors from corrupted observations by expectation-maximisation.

Rozet, Andry, Lanusse & Louppe (2024), "Learning Diffusion Priors from Observations by
Expectation Maximization", NeurIPS.

The estimator is :class:`DiffusionPriorEM`; its building blocks live in the subpackages
:mod:`diffem.operators` (observation models), :mod:`diffem.priors` (analytic priors),
:mod:`diffem.samplers` (posterior samplers) and :mod:`diffem.denoisers` (learned denoisers).
"""

__version__ = "0.1.0"

from diffem import denoisers, em, operators, priors, samplers
from diffem.em import DiffusionPriorEM

__all__ = [
    "DiffusionPriorEM",
    "__version__",
    "denoisers",
    "em",
    "operators",
    "priors",
    "samplers",
]
