r"""Tweedie moment projected diffusion (TMPD), Boys, Girolami, Pidstrigach, Reich, Mosca &
Akyildiz (2024), "Tweedie Moment Projected Diffusions for Inverse Problems", TMLR."""

from __future__ import annotations

from dataclasses import KW_ONLY
from typing import Any, ClassVar

from diffem._validation import check_number
from diffem.samplers.base import sampler_class
from diffem.samplers.mmps import NO_SAFEGUARDS, HeuristicGuidedSampler

__all__ = ["TMPD"]


@sampler_class
class TMPD(HeuristicGuidedSampler):
    r"""Tweedie moment projected diffusion with a diagonal covariance (Boys et al., 2024).

    Tweedie's covariance :math:`\sigma_t^2 J` is replaced by the diagonal of its row sums, one
    vector-Jacobian product,
    :math:`\mathbb{V} \approx \operatorname{diag}(\operatorname{clamp}(\sigma_t^2 J^\top
    \mathbf{1}, \kappa r_t^2, \sigma_t^2))` (positive, at most the forward noise), then

    .. math::
        (\Sigma_y + A \mathbb{V} A^\top) \, u = y - A \hat{x}, \qquad
        E[x \mid x_t, y] \approx \hat{x} + \sigma_t^2 J^\top A^\top u,

    solved to convergence by conjugate gradient. Shapes: ``x_t`` ``(B, D)``; ``y``, ``u``
    ``(B, M)``.

    Parameters
    ----------
    min_variance : float
        :math:`\kappa`, relative lower clamp of the diagonal.
    cg_iter, sigma_data, cg_rtol, steps, eta, solver, sigma_min, sigma_max, batch_size, ...
        See :class:`~diffem.samplers.mmps.HeuristicGuidedSampler`.

    Attributes
    ----------
    diagnostics_ : dict of float
        ``clamped`` (fraction of clamped diagonal entries) and those of
        :class:`~diffem.samplers.mmps.HeuristicGuidedSampler`.
    """

    likelihood: ClassVar[dict[str, Any]] = {"covariance": "diagonal"} | NO_SAFEGUARDS
    _: KW_ONLY
    min_variance: float = 1e-3

    def _validate(self) -> None:
        super()._validate()
        check_number(self.min_variance, "min_variance", 0.0, 1.0, low_open=True)
