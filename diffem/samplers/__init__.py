r"""Posterior and prior samplers for variance-exploding diffusion models.

A posterior sampler composes a guidance (:mod:`diffem.samplers.guidance`: the denoiser turned
into :math:`E[x \mid x_t, y] \approx \hat{x} + \delta`) with a solver
(:mod:`diffem.samplers.solvers`: ancestral DDPM/DDIM, EDM's Heun, DPM-Solver++(2M), the
Langevin corrector). :class:`MMPS` (Rozet et al., 2024) is the default of
:class:`diffem.DiffusionPriorEM`; :class:`DPS`, :class:`PiGDM` and :class:`TMPD` are the
classical alternatives; :class:`SMC` is asymptotically exact; :class:`Unconditional` samples the
prior. :func:`conjugate_gradient` is the batched, safeguarded solver of the linear systems.
Nonlinear observation models (:class:`~diffem.operators.Nonlinear`) are linearised at the
denoiser's estimate of each step. :func:`random_walk_metropolis` is the black-box reference
for posteriors whose prior density is known.
"""

from diffem.samplers.base import SOLVERS, PosteriorSampler, Sampler
from diffem.samplers.cg import CGResult, conjugate_gradient
from diffem.samplers.dps import DPS
from diffem.samplers.guidance import GaussianLikelihood, Guidance, Guided, ResidualGradient
from diffem.samplers.metropolis import MetropolisResult, random_walk_metropolis
from diffem.samplers.mmps import MMPS
from diffem.samplers.pigdm import PiGDM
from diffem.samplers.smc import SMC
from diffem.samplers.solvers import ancestral_step
from diffem.samplers.tmpd import TMPD
from diffem.samplers.unconditional import Unconditional

__all__ = [
    "DPS",
    "MMPS",
    "SMC",
    "SOLVERS",
    "TMPD",
    "CGResult",
    "GaussianLikelihood",
    "Guidance",
    "Guided",
    "MetropolisResult",
    "PiGDM",
    "PosteriorSampler",
    "ResidualGradient",
    "Sampler",
    "Unconditional",
    "ancestral_step",
    "conjugate_gradient",
    "random_walk_metropolis",
]
