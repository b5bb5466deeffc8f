r"""Analytic priors with exact posteriors, and closed-form EM to fit them from observations.

- :class:`GaussianPrior` (full or low-rank-plus-diagonal covariance) and
  :class:`GaussianMixturePrior`: exact posterior samples, means and log-evidences under any
  linear :class:`~diffem.operators.Operator`, and exact denoisers
  ``prior(x_t, sigma) -> E[x | x_t]``.
- :class:`Prior`: the protocol they share with :class:`diffem.em.DiffusionPrior` (``sample``,
  ``sample_posterior``, ``posterior_mean``, ``log_evidence``).
- :func:`fit_gaussian` (exact EM, optionally low-rank) and :func:`fit_gaussian_mixture`
  (extreme deconvolution).
- :mod:`diffem.priors.linearize`: a Gaussian prior observed through a
  :class:`~diffem.operators.Nonlinear` operator, by iterated linearisation (the Laplace
  approximation of its posteriors, and linearised EM in :func:`fit_gaussian`).
"""

from diffem.priors.base import Prior
from diffem.priors.em import fit_gaussian, fit_gaussian_mixture
from diffem.priors.gaussian import GaussianPrior
from diffem.priors.mixture import GaussianMixturePrior

__all__ = [
    "GaussianMixturePrior",
    "GaussianPrior",
    "Prior",
    "fit_gaussian",
    "fit_gaussian_mixture",
]
