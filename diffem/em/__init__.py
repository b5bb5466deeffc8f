r"""Expectation-maximisation for diffusion priors: :class:`DiffusionPriorEM`, the learned
prior :class:`DiffusionPrior` and their helpers (input validation, checkpoints, log-evidence
estimation)."""

from diffem.em.estimator import (
    DiffusionPriorEM,
    default_sampler,
    recipe_denoiser,
    recipe_evidence_sampler,
    recipe_sampler,
    recipe_warmup_sampler,
)
from diffem.em.evidence import importance_log_evidence, ode_log_density
from diffem.em.prior import DiffusionPrior

__all__ = [
    "DiffusionPrior",
    "DiffusionPriorEM",
    "default_sampler",
    "importance_log_evidence",
    "ode_log_density",
    "recipe_denoiser",
    "recipe_evidence_sampler",
    "recipe_sampler",
    "recipe_warmup_sampler",
]
