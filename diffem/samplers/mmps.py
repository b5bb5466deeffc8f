r"""Moment-matching posterior sampling (MMPS), Rozet, Andry, Lanusse & Louppe (2024),
"Learning Diffusion Priors from Observations by Expectation Maximization", NeurIPS, eqs. (8)-(9).
"""

from __future__ import annotations

from dataclasses import KW_ONLY, fields
from typing import Any, ClassVar

from diffem._validation import check_int, check_number
from diffem.samplers.base import PosteriorSampler, sampler_class
from diffem.samplers.guidance import GaussianLikelihood

__all__ = ["MMPS", "NO_SAFEGUARDS", "GaussianGuidedSampler", "HeuristicGuidedSampler"]

#: The heuristic samplers run their likelihood without MMPS's safeguards.
NO_SAFEGUARDS: dict[str, Any] = {"safeguard": False, "clip": False, "residual_guard": False}


@sampler_class
class GaussianGuidedSampler(PosteriorSampler):
    r"""A solver on the guidance :class:`~diffem.samplers.guidance.GaussianLikelihood`: the
    parameters common to MMPS, PiGDM and TMPD.

    Parameters
    ----------
    sigma_data : float
        Data scale :math:`\sigma_d` (per-coordinate standard deviation of :math:`x`) of the
        heuristic variance :math:`r_t^2 = \sigma_t^2 \sigma_d^2 / (\sigma_t^2 + \sigma_d^2)`
        and of the safeguard bounds. **It must match the scale of the data**:
        :class:`diffem.DiffusionPriorEM` sets it from the observations.
    cg_rtol : float
        Relative residual at which conjugate gradient stops early.
    """

    _: KW_ONLY
    sigma_data: float = 1.0
    cg_rtol: float = 1e-6

    #: Options of :class:`~diffem.samplers.guidance.GaussianLikelihood` fixed by the sampler;
    #: the others are taken from the sampler's parameters of the same name.
    likelihood: ClassVar[dict[str, Any]] = {}

    def guidance(self) -> GaussianLikelihood:
        names = {f.name for f in fields(GaussianLikelihood)}
        params = {k: v for k, v in self.get_params(deep=False).items() if k in names}
        return GaussianLikelihood(**{**params, **self.likelihood})

    def _validate(self) -> None:
        super()._validate()
        check_number(self.sigma_data, "sigma_data", 0.0, low_open=True)
        check_number(self.cg_rtol, "cg_rtol", 0.0)
        cg_iter = getattr(self, "cg_iter", None)
        if cg_iter is not None:
            check_int(cg_iter, "cg_iter", 1)


@sampler_class
class HeuristicGuidedSampler(GaussianGuidedSampler):
    r"""A Gaussian likelihood with a heuristic covariance (:class:`~diffem.samplers.PiGDM`,
    :class:`~diffem.samplers.TMPD`): the SPD system solved to convergence, without MMPS's
    safeguards.

    Parameters
    ----------
    cg_iter : int or None
        Maximum CG iterations (``None``: ``M``).
    sigma_data, cg_rtol
        See :class:`GaussianGuidedSampler`.
    steps, eta, solver, sigma_min, sigma_max, batch_size, corrector_steps, corrector_snr, verbose
        See :class:`diffem.samplers.base.Sampler`.

    Attributes
    ----------
    diagnostics_ : dict of float
        ``cg_residual``, ``cg_iterations``, ``fallback``, ``evaluations``, ``wall_time``, and
        the sampler's own.
    """

    cg_iter: int | None = None
    likelihood: ClassVar[dict[str, Any]] = NO_SAFEGUARDS


@sampler_class
class MMPS(GaussianGuidedSampler):
    r"""Moment-matching posterior sampling (Rozet et al., 2024).

    Approximates :math:`p(x \mid x_t) \approx \mathcal{N}(\hat{x}, \mathbb{V})` with Tweedie's
    formulae, :math:`\hat{x} = E[x \mid x_t]`, :math:`\mathbb{V} = \sigma_t^2 J`,
    :math:`J = \partial \hat{x} / \partial x_t` (eq. 9), so that for :math:`y = A x + e`,
    :math:`e \sim \mathcal{N}(0, \Sigma_y)` (eq. 8)

    .. math::
        E[x \mid x_t, y] \approx \hat{x} + \sigma_t^2 J^\top A^\top u, \qquad
        (\Sigma_y + A \mathbb{V} A^\top) \, u = y - A \hat{x},

    solved by ``cg_iter`` iterations of batched conjugate gradient whose products
    :math:`\mathbb{V} w = \sigma_t^2 J^\top w` are vector-Jacobian products; the guidance is
    accumulated from them, so ``cg_iter = k`` costs one forward pass with graph and ``k``
    products per step (:mod:`diffem.samplers.guidance`). Shapes: ``x_t`` and :math:`\hat{x}`
    ``(B, D)``, ``y`` and ``u`` ``(B, M)``.

    Robustness. A learned :math:`J` is not symmetric and, at high noise, not positive definite.
    CG checks the Rayleigh quotients of :math:`\mathbb{V}` along :math:`w = A^\top p`,
    :math:`w^\top \mathbb{V} w / \lVert w \rVert^2`, against
    :math:`[\kappa_{\min} r_t^2, \kappa_{\max} r_t^2]` (the exact :math:`\mathbb{V}` of a
    Gaussian prior with eigenvalues :math:`\lambda` lies in :math:`r_t^2 [\min(1,
    \lambda_{\min} / \sigma_d^2), \max(1, \lambda_{\max} / \sigma_d^2)]`),
    ``(kappa_min, kappa_max) = variance_bounds``: a quotient below the range (or NaN) is
    replaced by :math:`r_t^2`, one above by :math:`v_{\max}`, and that element's CG stops after
    the step. The guidance :math:`\delta = \mathbb{V} A^\top u` then satisfies, for any PSD
    :math:`\mathbb{V} \preceq v_{\max} I`, :math:`\lVert \delta \rVert^2 \le v_{\max} (A^\top
    u)^\top \delta`; it is rescaled onto that bound when a bad Jacobian breaks it, and replaced
    by 0 if non-finite; a guidance that moves :math:`A(\hat{x} + \delta)` away from :math:`y`
    is shrunk (:func:`~diffem.samplers.guidance.residual_guard`). For an exact denoiser within
    the bounds and a converged CG the safeguards are inactive.

    Parameters
    ----------
    steps : int
        Number of noise levels.
    cg_iter : int
        Conjugate-gradient iterations per step (the paper uses 1 to 3).
    covariance : {"jacobian", "gaussian", "isotropic"}
        :math:`\mathbb{V}` of the linear system: Tweedie's :math:`\sigma_t^2 J` (MMPS), the
        heuristic :math:`r_t^2 I` or :math:`\sigma_t^2 I` (the paper's ablation). The guidance
        always uses :math:`J^\top`.
    variance_bounds : (float, float)
        ``(kappa_min, kappa_max)``, see above.
    warm_start : bool
        Starts each step's CG from the previous step's solution :math:`u` (the system changes
        little between neighbouring noise levels), at one more vector-Jacobian product per
        step, so that ``cg_iter`` iterations accumulate over the steps. Rows whose start does
        not reduce the residual start from 0.
    sigma_data, cg_rtol
        See :class:`GaussianGuidedSampler`.
    eta, solver, sigma_min, sigma_max, batch_size, corrector_steps, corrector_snr, verbose
        See :class:`diffem.samplers.base.Sampler`.

    Attributes
    ----------
    diagnostics_ : dict of float
        ``cg_residual`` (mean final relative residual), ``cg_iterations``, ``cg_safeguarded``
        (fraction of solves stopped by a curvature safeguard), ``clipped`` (fraction of rescaled
        guidance terms), ``residual_guarded`` (fraction of guidance terms shrunk because they
        moved :math:`A(\hat{x} + \delta)` away from :math:`y`,
        :func:`~diffem.samplers.guidance.residual_guard`), ``fallback``, ``evaluations`` and
        ``wall_time``.
    """

    cg_iter: int = 1
    _: KW_ONLY
    covariance: str = "jacobian"
    variance_bounds: tuple[float, float] = (1e-3, 1e2)
    warm_start: bool = False

    def _validate(self) -> None:
        super()._validate()
        check_int(self.cg_iter, "cg_iter", 1)
        if not isinstance(self.warm_start, bool):
            raise ValueError(f"warm_start must be a bool, got {self.warm_start!r}.")
        if self.covariance not in ("jacobian", "gaussian", "isotropic"):
            raise ValueError(
                "covariance must be one of ('jacobian', 'gaussian', 'isotropic'), got "
                f"{self.covariance!r}."
            )
        bounds = self.variance_bounds
        if not (isinstance(bounds, (tuple, list)) and len(bounds) == 2):
            raise ValueError(f"variance_bounds must be a pair (low, high), got {bounds!r}.")
        low = check_number(bounds[0], "variance_bounds[0]", 0.0, low_open=True)
        check_number(bounds[1], "variance_bounds[1]", low, low_open=True)
