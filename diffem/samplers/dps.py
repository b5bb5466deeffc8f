r"""Diffusion posterior sampling (DPS), Chung, Kim, McCann, Klasky & Ye (2023), "Diffusion
Posterior Sampling for General Noisy Inverse Problems", ICLR."""

from __future__ import annotations

from dataclasses import KW_ONLY

from diffem._validation import check_number
from diffem.samplers.base import PosteriorSampler, sampler_class
from diffem.samplers.guidance import ResidualGradient

__all__ = ["DPS"]


@sampler_class
class DPS(PosteriorSampler):
    r"""Diffusion posterior sampling (Chung et al., 2023, algorithm 1).

    DPS neglects the covariance of :math:`p(x \mid x_t)` and takes, after each ancestral step
    :math:`x_t \to x_s'`, a normalised gradient step on the residual norm,

    .. math::
        x_s = x_s' + \zeta \, \frac{J^\top A^\top (y - A \hat{x})}{\lVert y - A \hat{x} \rVert},

    with :math:`\hat{x} = E[x \mid x_t]`, :math:`J = \partial \hat{x} / \partial x_t`. As a
    guided denoiser this is :math:`\hat{x} + \delta`, :math:`\delta = \zeta J^\top A^\top r /
    (\lVert r \rVert (1 - c))`, with :math:`1 - c` the weight of the evaluation in the step
    (:mod:`diffem.samplers.solvers`), which reproduces the update above exactly; a Heun step
    then moves by :math:`\zeta` times the mean of its two normalised gradients. :math:`\Sigma_y`
    is not used. Shapes: ``x_t`` ``(B, D)``, ``y`` ``(B, M)``.

    Parameters
    ----------
    steps : int
    zeta : float
        Guidance strength :math:`\zeta` (the paper tunes it per task, 0.1 to 1 for images).
    eta, solver, sigma_min, sigma_max, batch_size, corrector_steps, corrector_snr, verbose
        See :class:`diffem.samplers.base.Sampler`.

    Attributes
    ----------
    diagnostics_ : dict of float
        ``residual_norm`` (mean :math:`\lVert y - A \hat{x} \rVert`), ``fallback``,
        ``evaluations``, ``wall_time``.
    """

    _: KW_ONLY
    zeta: float = 1.0

    def _validate(self) -> None:
        super()._validate()
        check_number(self.zeta, "zeta", 0.0)

    def guidance(self) -> ResidualGradient:
        return ResidualGradient(zeta=float(self.zeta))
