r"""Expectation-maximisation for diffusion priors: :class:`DiffusionPriorEM` and its helpers
(input validation, checkpoints, log-evidence estimation)."""

from diffem.em.estimator import DiffusionPriorEM, default_sampler
from diffem.em.evidence import importance_log_evidence, ode_log_density

__all__ = ["DiffusionPriorEM", "default_sampler", "importance_log_evidence", "ode_log_density"]
