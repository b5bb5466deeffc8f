r"""Pseudoinverse-guided diffusion (PiGDM), Song, Vahdat, Mardani & Kautz (2023),
"Pseudoinverse-Guided Diffusion Models for Inverse Problems", ICLR."""

from __future__ import annotations

from typing import Any, ClassVar

from diffem.samplers.base import sampler_class
from diffem.samplers.mmps import NO_SAFEGUARDS, HeuristicGuidedSampler

__all__ = ["PiGDM"]


@sampler_class
class PiGDM(HeuristicGuidedSampler):
    r"""Pseudoinverse-guided diffusion (Song et al., 2023): MMPS with the isotropic heuristic
    covariance :math:`p(x \mid x_t) \approx \mathcal{N}(\hat{x}, r_t^2 I)`,
    :math:`r_t^2 = \sigma_t^2 \sigma_d^2 / (\sigma_t^2 + \sigma_d^2)`,

    .. math::
        E[x \mid x_t, y] \approx \hat{x} + \sigma_t^2 J^\top A^\top u, \qquad
        (\Sigma_y + r_t^2 A A^\top) \, u = y - A \hat{x},

    the SPD system solved to convergence by conjugate gradient (``cg_iter=None``: up to ``M``
    iterations, stopping at ``cg_rtol``); one vector-Jacobian product per step. Shapes: ``x_t``
    ``(B, D)``, ``y`` and ``u`` ``(B, M)``.

    Parameters
    ----------
    cg_iter, sigma_data, cg_rtol, steps, eta, solver, sigma_min, sigma_max, batch_size, ...
        See :class:`~diffem.samplers.mmps.HeuristicGuidedSampler`.
    """

    likelihood: ClassVar[dict[str, Any]] = {"covariance": "gaussian"} | NO_SAFEGUARDS
