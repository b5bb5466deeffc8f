r"""Posterior and prior samplers for variance-exploding diffusion models.

:class:`MMPS` (Rozet et al., 2024) is the default posterior sampler of
:class:`diffem.DiffusionPriorEM`; :class:`DPS`, :class:`PiGDM` and :class:`TMPD` are the
classical alternatives, :class:`Unconditional` samples the prior. All share the solvers
(``SOLVERS``: ancestral DDPM/DDIM, EDM's Heun, DPM-Solver++(2M)) of
:class:`diffem.samplers.base.Sampler`; :func:`conjugate_gradient` is the batched, safeguarded
solver they use.
"""

from diffem.samplers.base import SOLVERS, PosteriorSampler, Sampler, ancestral_step
from diffem.samplers.cg import CGResult, conjugate_gradient
from diffem.samplers.dps import DPS
from diffem.samplers.mmps import MMPS
from diffem.samplers.pigdm import PiGDM
from diffem.samplers.tmpd import TMPD
from diffem.samplers.unconditional import Unconditional

__all__ = [
    "DPS",
    "MMPS",
    "SOLVERS",
    "TMPD",
    "CGResult",
    "PiGDM",
    "PosteriorSampler",
    "Sampler",
    "Unconditional",
    "ancestral_step",
    "conjugate_gradient",
]
