r"""Pseudoinverse-guided diffusion (PiGDM), Song, Vahdat, Mardani & Kautz (2023),
"Pseudoinverse-Guided Diffusion Models for Inverse Problems", ICLR."""

from __future__ import annotations

from diffem.samplers.base import sampler_class
from diffem.samplers.guidance import GaussianLikelihood
from diffem.samplers.mmps import GaussianGuidedSampler

__all__ = ["PiGDM"]


@sampler_class
class PiGDM(GaussianGuidedSampler):
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
    steps : int
    cg_iter : int or None
        Maximum CG iterations (``None``: ``M``).
    sigma_data, cg_rtol
        See :class:`~diffem.samplers.mmps.GaussianGuidedSampler`.
    eta, solver, sigma_min, sigma_max, batch_size, corrector_steps, corrector_snr, verbose
        See :class:`diffem.samplers.base.Sampler`.

    Attributes
    ----------
    diagnostics_ : dict of float
        ``cg_residual``, ``cg_iterations``, ``fallback``, ``evaluations``, ``wall_time``.
    """

    cg_iter: int | None = None

    def guidance(self) -> GaussianLikelihood:
        return GaussianLikelihood(
            covariance="gaussian",
            cg_iter=self.cg_iter,
            cg_rtol=float(self.cg_rtol),
            sigma_data=float(self.sigma_data),
            safeguard=False,
            clip=False,
            residual_guard=False,
        )
