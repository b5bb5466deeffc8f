r"""Moment-matching posterior sampling (MMPS), Rozet, Andry, Lanusse & Louppe (2024),
"Learning Diffusion Priors from Observations by Expectation Maximization", NeurIPS, eqs. (8)-(9).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diffem.operators.base import Operator
from diffem.samplers.base import (
    PosteriorSampler,
    _check_int,
    _check_number,
    denoise_with_graph,
    vjp,
)
from diffem.samplers.cg import conjugate_gradient

__all__ = ["MMPS"]

_COVARIANCES = ("jacobian", "gaussian", "isotropic")


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(dim=-1)


class MMPS(PosteriorSampler):
    r"""Moment-matching posterior sampling (Rozet et al., 2024).

    Approximates :math:`p(x \mid x_t) \approx \mathcal{N}(\hat{x}, \mathbb{V})` with Tweedie's
    formulae, :math:`\hat{x} = E[x \mid x_t]` and
    :math:`\mathbb{V} = \mathbb{V}[x \mid x_t] = \sigma_t^2 J`, :math:`J = \partial \hat{x} /
    \partial x_t` (eq. 9), so that for :math:`y = A x + e`, :math:`e \sim \mathcal{N}(0,
    \Sigma_y)` (eq. 8),

    .. math::
        \nabla_{x_t} \log q(y \mid x_t) \approx J^\top A^\top u, \qquad
        (\Sigma_y + A \mathbb{V} A^\top) \, u = y - A \hat{x},

    and the guided denoiser is :math:`E[x \mid x_t, y] \approx \hat{x} + \sigma_t^2 J^\top A^\top
    u`. The linear system is solved by ``cg_iter`` iterations of batched conjugate gradient
    (:func:`diffem.samplers.cg.conjugate_gradient`) in which :math:`\mathbb{V} w = \sigma_t^2
    J^\top w` is a vector-Jacobian product (no Jacobian is ever formed). Shapes: ``x_t`` and
    :math:`\hat{x}` ``(B, D)``, ``y`` and ``u`` ``(B, M)``.

    .. important::
        Set ``sigma_data`` to the per-coordinate standard deviation of the data (see the
        parameter below). The default 1 suits unit-scale data only; on data of another scale
        the covariance safeguards fire even on an exact denoiser.

    Robustness. A learned denoiser's :math:`J` is not symmetric and, at high noise, not positive
    definite, so the "SPD" system may be indefinite. CG checks the Rayleigh quotients of
    :math:`\mathbb{V}` along its search directions, :math:`w^\top \mathbb{V} w / \lVert w
    \rVert^2` with :math:`w = A^\top p` (computed from the covariance term alone, not from the
    total curvature :math:`p^\top (\Sigma_y + A \mathbb{V} A^\top) p`), against
    :math:`[v_{\min}, v_{\max}] = [\kappa_{\min} r_t^2, \kappa_{\max} r_t^2]`,
    :math:`r_t^2 = \sigma_t^2 \sigma_d^2 / (\sigma_t^2 + \sigma_d^2)` (the variance of
    :math:`x \mid x_t` under a :math:`\mathcal{N}(0, \sigma_d^2 I)` prior; the exact
    :math:`\mathbb{V}` of a Gaussian prior with eigenvalues :math:`\lambda` lies in
    :math:`r_t^2 [\min(1, \lambda_{\min} / \sigma_d^2), \max(1, \lambda_{\max} / \sigma_d^2)]`),
    ``(kappa_min, kappa_max) = variance_bounds``. A quotient below the range (in particular a
    negative one) is replaced by the Gaussian heuristic :math:`r_t^2`, one above by
    :math:`v_{\max}`, and that element's CG stops after the step. The guidance
    :math:`\delta = \mathbb{V} A^\top u` then satisfies, for any PSD
    :math:`\mathbb{V} \preceq v_{\max} I`, :math:`\lVert \delta \rVert^2 \le v_{\max} \,
    (A^\top u)^\top \delta`; it is rescaled onto that bound when a bad Jacobian breaks it, and
    replaced by 0 if non-finite. For an exact denoiser whose covariance lies within the bounds
    these safeguards are inactive.

    Parameters
    ----------
    steps : int
        Number of noise levels.
    cg_iter : int
        Conjugate-gradient iterations per step (the paper uses 1 to 3).
    eta : float in [0, 1]
        1: DDPM ancestral steps, 0: DDIM (the stochasticity of the other solvers).
    solver : {"ancestral", "heun", "dpmpp_2m"}
        Solver applied to the guided denoiser :math:`E[x \mid x_t, y]` (accuracy table in
        :class:`diffem.samplers.base.Sampler`); ``"ancestral"`` is the paper's.
    covariance : {"jacobian", "gaussian", "isotropic"}
        :math:`\mathbb{V}` used in the linear system: Tweedie's :math:`\sigma_t^2 J` (MMPS),
        the heuristic :math:`r_t^2 I` or :math:`\sigma_t^2 I` (the paper's covariance
        ablation). The guidance always uses :math:`J^\top`.
    sigma_data : float
        Data scale :math:`\sigma_d` (per-coordinate standard deviation of :math:`x`) of the
        heuristics and of the safeguard bounds. **It must match the scale of the data.**
        :class:`diffem.DiffusionPriorEM` sets it from the observations; a standalone user must
        set it. The bounds :math:`[v_{\min}, v_{\max}]` scale with :math:`r_t^2`, which
        saturates at :math:`\sigma_d^2`: with the default 1 on data of scale ~10, the true
        covariance of an exact denoiser exceeds :math:`v_{\max}` at high noise and the
        safeguards (``cg_safeguarded``, ``clipped``) fire and bias the samples.
    cg_rtol : float
        Relative residual at which CG stops early.
    variance_bounds : (float, float)
        ``(kappa_min, kappa_max)``, see above.
    sigma_min, sigma_max, batch_size, corrector_steps, corrector_snr, verbose
        See :class:`diffem.samplers.base.Sampler`.

    Attributes
    ----------
    diagnostics_ : dict of float
        ``cg_residual`` (mean final relative residual), ``cg_iterations`` (mean),
        ``cg_safeguarded`` (fraction of solves stopped by a curvature safeguard),
        ``clipped`` (fraction of rescaled guidance terms), ``fallback`` (fraction of
        non-finite guidance terms replaced by 0), averaged over steps and rows;
        ``evaluations`` (guided-denoiser evaluations per sample) and ``wall_time``.
    """

    def __init__(
        self,
        steps: int = 64,
        cg_iter: int = 1,
        eta: float = 1.0,
        covariance: str = "jacobian",
        *,
        sigma_data: float = 1.0,
        cg_rtol: float = 1e-6,
        variance_bounds: tuple[float, float] = (1e-3, 1e2),
        solver: str = "ancestral",
        sigma_min: float = 1e-3,
        sigma_max: float = 1e2,
        batch_size: int = 4096,
        corrector_steps: int = 0,
        corrector_snr: float = 0.1,
        verbose: int = 0,
    ) -> None:
        self.steps = steps
        self.cg_iter = cg_iter
        self.eta = eta
        self.covariance = covariance
        self.sigma_data = sigma_data
        self.cg_rtol = cg_rtol
        self.variance_bounds = variance_bounds
        self.solver = solver
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.batch_size = batch_size
        self.corrector_steps = corrector_steps
        self.corrector_snr = corrector_snr
        self.verbose = verbose

    def _validate(self) -> None:
        self._validate_common()
        _check_int(self.cg_iter, "cg_iter", 1)
        if self.covariance not in _COVARIANCES:
            raise ValueError(f"covariance must be one of {_COVARIANCES}, got {self.covariance!r}.")
        _check_number(self.sigma_data, "sigma_data", 0.0, low_open=True)
        _check_number(self.cg_rtol, "cg_rtol", 0.0)
        bounds = self.variance_bounds
        if not (isinstance(bounds, (tuple, list)) and len(bounds) == 2):
            raise ValueError(f"variance_bounds must be a pair (low, high), got {bounds!r}.")
        low = _check_number(bounds[0], "variance_bounds[0]", 0.0, low_open=True)
        _check_number(bounds[1], "variance_bounds[1]", low, low_open=True)

    def _variance_range(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-row bounds ``(v_min, v_max)`` on the Rayleigh quotients of V and the fallback
        value :math:`r_t^2`, shapes ``(B,)``."""
        s2 = sigma**2
        sd2 = float(self.sigma_data) ** 2
        r2 = s2 * sd2 / (s2 + sd2)
        return float(self.variance_bounds[0]) * r2, float(self.variance_bounds[1]) * r2, r2

    def _correction(
        self,
        denoiser: Callable[[Tensor, Tensor], Tensor],
        x_t: Tensor,
        sigma: Tensor,
        weight: Tensor | None,
        y: Tensor,
        operator: Operator,
        stats: dict[str, list[Tensor]],
    ) -> tuple[Tensor, Tensor]:
        x_leaf, x_hat = denoise_with_graph(denoiser, x_t, sigma)
        s2 = (sigma**2).unsqueeze(-1)
        var = operator.noise_var
        v_min, v_max, fallback = self._variance_range(sigma)
        residual = y - operator.apply(x_hat.detach())

        if self.covariance == "jacobian":
            # The covariance part A V A^T p of the last product, kept for the safeguard.
            last: dict[str, Tensor] = {}

            def matvec(p: Tensor) -> Tensor:
                w = operator.adjoint(p)
                last["cov"] = operator.apply(s2 * vjp(x_hat, x_leaf, w))
                return var * p + last["cov"]

            def safeguard(p: Tensor, curvature: Tensor) -> tuple[Tensor, Tensor]:
                w = operator.adjoint(p)
                ww = _dot(w, w)
                base = _dot(p, var * p)
                # Rayleigh quotient of V alone: w^T V w = p^T (A V A^T p), not the difference
                # curvature - p^T Sigma_y p, in which the noise term swamps a small covariance
                # term in float32 (low noise levels with sigma_y ~ 1).
                quad = torch.where(torch.isfinite(curvature), _dot(p, last["cov"]), torch.nan)
                rho = quad / torch.where(ww > 0, ww, 1.0)
                low = ~(rho >= v_min) & (ww > 0)  # also NaN
                high = (rho > v_max) & (ww > 0)
                used = torch.where(low, base + fallback * ww, curvature)
                used = torch.where(high, base + v_max * ww, used)
                return used, low | high

            result = conjugate_gradient(
                matvec,
                residual,
                max_iter=int(self.cg_iter),
                rtol=float(self.cg_rtol),
                safeguard=safeguard,
            )
        else:
            if self.covariance == "gaussian":
                sd2 = float(self.sigma_data) ** 2
                scale = s2 * sd2 / (s2 + sd2)
            else:
                scale = s2

            def matvec(p: Tensor) -> Tensor:
                return var * p + scale * operator.apply(operator.adjoint(p))

            result = conjugate_gradient(
                matvec, residual, max_iter=int(self.cg_iter), rtol=float(self.cg_rtol)
            )

        w = operator.adjoint(result.solution)
        delta = s2 * vjp(x_hat, x_leaf, w, retain_graph=False)
        delta, clipped = _clip_guidance(delta, w, v_min, v_max)
        stats.setdefault("cg_residual", []).append(result.residual)
        stats.setdefault("cg_iterations", []).append(result.iterations.to(x_t.dtype))
        stats.setdefault("cg_safeguarded", []).append(result.safeguarded.to(x_t.dtype))
        stats.setdefault("clipped", []).append(clipped.to(x_t.dtype))
        return x_hat.detach(), delta


def _clip_guidance(delta: Tensor, w: Tensor, v_min: Tensor, v_max: Tensor) -> tuple[Tensor, Tensor]:
    r"""Rescales :math:`\delta = \mathbb{V} w` onto :math:`\lVert \delta \rVert^2 \le v_{\max}
    \operatorname{clamp}(w^\top \delta, v_{\min} \lVert w \rVert^2, v_{\max} \lVert w
    \rVert^2)`, which holds for every PSD :math:`\mathbb{V}` with eigenvalues in
    :math:`[v_{\min}, v_{\max}]`. Returns the clipped ``(B, D)`` guidance and a ``(B,)`` flag.
    """
    delta = torch.where(torch.isfinite(delta), delta, torch.zeros_like(delta))
    ww = _dot(w, w)
    q = torch.minimum(torch.maximum(_dot(w, delta), v_min * ww), v_max * ww)
    cap = torch.sqrt(v_max * q)
    norm = torch.linalg.vector_norm(delta, dim=-1)
    # Clip only beyond a rounding margin, so that exact denoisers are never clipped.
    clipped = norm > 1.001 * cap
    scale = torch.where(clipped, cap / torch.where(clipped, norm, 1.0), 1.0)
    return delta * scale.unsqueeze(-1), clipped
