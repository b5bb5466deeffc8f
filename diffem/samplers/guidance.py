r"""Guidance: a denoiser turned into a guided denoiser :math:`E[x \mid x_t, y] \approx \hat{x} +
\delta` for observations :math:`y = A x + e`, :math:`e \sim \mathcal{N}(0, \Sigma_y)`.

With :math:`\hat{x} = E[x \mid x_t]` and :math:`J = \partial \hat{x} / \partial x_t`, Tweedie's
formula gives :math:`E[x \mid x_t, y] = \hat{x} + \sigma_t^2 \nabla_{x_t} \log q(y \mid x_t)`.
Every guidance here approximates that likelihood score; shapes: ``x_t``, :math:`\hat{x}`,
:math:`\delta` ``(B, D)``; ``y`` and :math:`u` ``(B, M)``; ``sigma`` ``(B,)``.

:class:`GaussianLikelihood` approximates :math:`p(x \mid x_t) \approx \mathcal{N}(\hat{x},
\mathbb{V})`, so that :math:`q(y \mid x_t) \approx \mathcal{N}(y \mid A \hat{x}, \Sigma_y + A
\mathbb{V} A^\top)` and

.. math::
    \delta = \sigma_t^2 J^\top A^\top u, \qquad (\Sigma_y + A \mathbb{V} A^\top) \, u =
    y - A \hat{x},

the linear system being solved by conjugate gradient (:mod:`diffem.samplers.cg`). The
covariance :math:`\mathbb{V}` is one of

- ``"jacobian"``: Tweedie's :math:`\sigma_t^2 J` (MMPS, Rozet et al., 2024, eq. 9), through
  vector-Jacobian products; CG accumulates :math:`\delta` from the products it already takes, so
  ``cg_iter = k`` costs ``k`` of them;
- ``"gaussian"``: :math:`r_t^2 I`, :math:`r_t^2 = \sigma_t^2 \sigma_d^2 / (\sigma_t^2 +
  \sigma_d^2)` (:func:`diffem.schedule.gaussian_variance`; PiGDM, Song et al., 2023);
- ``"isotropic"``: :math:`\sigma_t^2 I`;
- ``"diagonal"``: :math:`\operatorname{diag}(\operatorname{clamp}(\sigma_t^2 J^\top \mathbf{1},
  \kappa r_t^2, \sigma_t^2))`, the row sums of Tweedie's covariance (TMPD, Boys et al., 2024).

Its :attr:`Guided.log_likelihood` is :math:`-\tfrac12 (y - A\hat{x})^\top u`, the log of the
Gaussian approximation up to a term that does not depend on :math:`x_t` for an exact Gaussian
denoiser; SMC uses it as twisting function.

:class:`ResidualGradient` is DPS (Chung et al., 2023): a normalised gradient step on
:math:`\lVert y - A \hat{x} \rVert`.

A nonlinear operator :math:`y = f(x) + e` (:class:`~diffem.operators.Nonlinear`) is linearised
at :math:`\hat{x}`: the residual is :math:`y - f(\hat{x})` and :math:`A` above is the Jacobian
:math:`\partial f(\hat{x}) / \partial x`, applied by Jacobian-vector and vector-Jacobian
products (``operator.linearize(x_hat)``; a linear operator is its own linearisation).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from diffem.operators.base import Operator
from diffem.samplers.cg import CGResult, conjugate_gradient
from diffem.schedule import gaussian_variance

__all__ = [
    "COVARIANCES",
    "GaussianLikelihood",
    "Guidance",
    "Guided",
    "ResidualGradient",
    "denoise_with_graph",
    "vjp",
]

Denoiser = Callable[[Tensor, Tensor], Tensor]
Stats = dict[str, list[Tensor]]

#: The covariance models of :class:`GaussianLikelihood`.
COVARIANCES = ("jacobian", "gaussian", "isotropic", "diagonal")


class Guided(NamedTuple):
    """A guided estimate for one chunk of rows."""

    x_hat: Tensor
    """``(B, D)`` :math:`E[x \\mid x_t]`, without graph."""
    delta: Tensor
    """``(B, D)`` guidance :math:`\\delta`."""
    log_likelihood: Tensor | None = None
    """``(B,)`` approximate :math:`\\log q(y \\mid x_t)` (up to a per-row constant) or ``None``."""
    solution: Tensor | None = None
    """``(B, M)`` the solution :math:`u` of the linear system, if any (a warm start for the
    next evaluation)."""


def denoise_with_graph(denoiser: Denoiser, x_t: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Runs the denoiser with autograd enabled; returns ``(x_t_leaf, x_hat)``, ``(B, D)`` each.

    Raises ``TypeError`` if the output does not depend differentiably on ``x_t``.
    """
    x_leaf = x_t.detach().requires_grad_(True)
    with torch.enable_grad():
        x_hat = denoiser(x_leaf, sigma)
    if not isinstance(x_hat, Tensor) or x_hat.shape != x_t.shape:
        shape = tuple(x_hat.shape) if isinstance(x_hat, Tensor) else type(x_hat).__name__
        raise ValueError(f"denoiser must return a tensor of shape {tuple(x_t.shape)}, got {shape}.")
    if not x_hat.requires_grad:
        raise TypeError(
            "denoiser output is not differentiable with respect to x_t; guided samplers take "
            "vector-Jacobian products through it (do not wrap it in torch.no_grad)."
        )
    return x_leaf, x_hat


def vjp(x_hat: Tensor, x_leaf: Tensor, v: Tensor) -> Tensor:
    r""":math:`J^\top v` with :math:`J = \partial \hat{x} / \partial x_t`, shape ``(B, D)``."""
    (grad,) = torch.autograd.grad(x_hat, x_leaf, v, retain_graph=True, allow_unused=True)
    return torch.zeros_like(x_leaf) if grad is None else grad


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return torch.linalg.vecdot(a, b)


def _record(stats: Stats, key: str, value: Tensor) -> None:
    stats.setdefault(key, []).append(value.detach())


class Guidance(ABC):
    """Turns ``denoiser`` into a guided estimate at ``(x_t, sigma)`` for ``(y, operator)``."""

    @abstractmethod
    def __call__(
        self,
        denoiser: Denoiser,
        x_t: Tensor,
        sigma: Tensor,
        weight: Tensor | None,
        y: Tensor,
        operator: Operator,
        stats: Stats,
        initial: Tensor | None = None,
    ) -> Guided:
        """``weight`` ``(B,)`` is the solver's weight of this evaluation
        (:mod:`diffem.samplers.solvers`); ``stats`` collects ``(B,)`` diagnostics; ``initial``
        ``(B, M)`` is a starting point of the linear solve (the previous evaluation's
        :attr:`Guided.solution`), used by guidances that solve one."""


@dataclass(frozen=True)
class GaussianLikelihood(Guidance):
    r"""Gaussian likelihood :math:`\mathcal{N}(y \mid A \hat{x}, \Sigma_y + A \mathbb{V} A^\top)`
    (module docstring), with the safeguards of MMPS.

    Parameters
    ----------
    covariance : one of :data:`COVARIANCES`
    cg_iter : int or None
        CG iterations (``None``: ``M``, i.e. to convergence).
    cg_rtol : float
        Relative residual at which CG stops early.
    sigma_data : float
        :math:`\sigma_d` of :math:`r_t^2`.
    variance_bounds : (float, float)
        ``(kappa_min, kappa_max)``: with ``safeguard``, the Rayleigh quotients of
        :math:`\mathbb{V} = \sigma_t^2 J` along CG's directions must lie in
        :math:`[\kappa_{\min} r_t^2, \kappa_{\max} r_t^2]` (see :class:`diffem.samplers.MMPS`).
    min_variance : float
        :math:`\kappa` of the ``"diagonal"`` covariance.
    safeguard : bool
        Curvature safeguard of the ``"jacobian"`` CG.
    clip : bool
        Rescales :math:`\delta` onto the bound that holds for every PSD
        :math:`\mathbb{V} \preceq v_{\max} I`.
    residual_guard : bool
        Shrinks a :math:`\delta` that moves :math:`A(\hat{x} + \delta)` away from :math:`y`
        (:func:`residual_guard`).
    """

    covariance: str = "jacobian"
    cg_iter: int | None = 1
    cg_rtol: float = 1e-6
    sigma_data: float = 1.0
    variance_bounds: tuple[float, float] = (1e-3, 1e2)
    min_variance: float = 1e-3
    safeguard: bool = True
    clip: bool = True
    residual_guard: bool = True

    def __call__(
        self,
        denoiser: Denoiser,
        x_t: Tensor,
        sigma: Tensor,
        weight: Tensor | None,
        y: Tensor,
        operator: Operator,
        stats: Stats,
        initial: Tensor | None = None,
    ) -> Guided:
        x_leaf, x_hat = denoise_with_graph(denoiser, x_t, sigma)
        s2 = (sigma**2).unsqueeze(-1)
        r2 = gaussian_variance(sigma, float(self.sigma_data))
        v_min = float(self.variance_bounds[0]) * r2
        v_max = float(self.variance_bounds[1]) * r2
        var = operator.noise_var
        residual = y - operator.apply(x_hat.detach())
        operator = operator.linearize(x_hat.detach())  # the Jacobian at x_hat if nonlinear
        max_iter = operator.n_measurements if self.cg_iter is None else int(self.cg_iter)
        start, start_image, rhs = None, None, residual
        if initial is not None and self.covariance == "jacobian":
            start, start_image, rhs = self._warm_start(
                initial, x_hat, x_leaf, s2, var, residual, operator
            )
        result = self._solve(
            x_hat, x_leaf, s2, r2, v_min, v_max, var, rhs, operator, max_iter, stats
        )
        solution = result.solution if start is None else start + result.solution
        w = operator.adjoint(solution)
        if self.covariance == "jacobian":  # no image: CG took no step (zero residual)
            delta = torch.zeros_like(x_t) if result.image is None else result.image
            if start_image is not None:
                delta = delta + start_image
        else:
            delta = s2 * vjp(x_hat, x_leaf, w)
        if self.clip:
            delta, clipped = _clip_guidance(delta, w, v_min, v_max)
            _record(stats, "clipped", clipped.to(x_t.dtype))
        if self.residual_guard:
            delta, guarded = residual_guard(delta, residual, operator)
            _record(stats, "residual_guarded", guarded.to(x_t.dtype))
        relative = result.residual
        if start is not None:  # relative to the cold-start residual y - A x_hat
            scale = torch.linalg.vector_norm(rhs, dim=-1)
            base = torch.linalg.vector_norm(torch.nan_to_num(residual), dim=-1)
            relative = torch.where(base > 0, relative * scale / torch.where(base > 0, base, 1), 0)
        _record(stats, "cg_residual", relative)
        _record(stats, "cg_iterations", result.iterations.to(x_t.dtype))
        if self.safeguard and self.covariance == "jacobian":
            _record(stats, "cg_safeguarded", result.safeguarded.to(x_t.dtype))
        finite = torch.where(torch.isfinite(residual), residual, 0.0)
        log_likelihood = -0.5 * _dot(finite, solution)
        return Guided(x_hat.detach(), delta.detach(), log_likelihood.detach(), solution.detach())

    def _warm_start(
        self,
        initial: Tensor,
        x_hat: Tensor,
        x_leaf: Tensor,
        s2: Tensor,
        var: Tensor,
        residual: Tensor,
        operator: Operator,
    ) -> tuple[Tensor, Tensor, Tensor]:
        r"""Starts CG from :math:`u_0` (one product, which also gives :math:`\sigma_t^2 J^\top
        A^\top u_0`); rows where :math:`u_0` is not finite or does not reduce the residual
        start from 0. Returns :math:`u_0`, its image and the residual :math:`b - M u_0`."""
        image = s2 * vjp(x_hat, x_leaf, operator.adjoint(initial))
        rhs = residual - var * initial - operator.apply(image)
        good = torch.isfinite(rhs).all(-1) & torch.isfinite(image).all(-1)
        good = good & (_dot(rhs, rhs) < _dot(residual, residual))
        keep = good.unsqueeze(-1)
        return (
            torch.where(keep, initial, 0.0),
            torch.where(keep, image, 0.0),
            torch.where(keep, rhs, residual),
        )

    def _solve(
        self,
        x_hat: Tensor,
        x_leaf: Tensor,
        s2: Tensor,
        r2: Tensor,
        v_min: Tensor,
        v_max: Tensor,
        var: Tensor,
        residual: Tensor,
        operator: Operator,
        max_iter: int,
        stats: Stats,
    ) -> CGResult:
        rtol = float(self.cg_rtol)
        if self.covariance != "jacobian":
            if self.covariance == "diagonal":
                raw = s2 * vjp(x_hat, x_leaf, torch.ones_like(x_hat))
                raw = torch.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0)
                low = float(self.min_variance) * r2.unsqueeze(-1)
                diagonal = torch.minimum(torch.maximum(raw, low), s2)
                _record(stats, "clamped", ((raw < low) | (raw > s2)).to(raw.dtype).mean(-1))
            else:
                diagonal = r2.unsqueeze(-1) if self.covariance == "gaussian" else s2

            def linear(p: Tensor) -> Tensor:
                return var * p + operator.apply(diagonal * operator.adjoint(p))

            return conjugate_gradient(linear, residual, max_iter=max_iter, rtol=rtol)

        # The covariance part A V A^T p of the last product, kept for the safeguard.
        last: dict[str, Tensor] = {}

        def matvec(p: Tensor) -> tuple[Tensor, Tensor]:
            last["w"] = operator.adjoint(p)
            image = s2 * vjp(x_hat, x_leaf, last["w"])
            last["cov"] = operator.apply(image)
            return var * p + last["cov"], image

        def safeguard(p: Tensor, curvature: Tensor) -> tuple[Tensor, Tensor]:
            w = last["w"]
            ww = _dot(w, w)
            base = _dot(p, var * p)
            # Rayleigh quotient of V alone: w^T V w = p^T (A V A^T p), not the difference
            # curvature - p^T Sigma_y p, in which the noise term swamps a small covariance term
            # in float32 (low noise levels with sigma_y ~ 1).
            quad = torch.where(torch.isfinite(curvature), _dot(p, last["cov"]), torch.nan)
            rho = quad / torch.where(ww > 0, ww, 1.0)
            low = ~(rho >= v_min) & (ww > 0)  # also NaN
            high = (rho > v_max) & (ww > 0)
            used = torch.where(low, base + r2 * ww, curvature)
            used = torch.where(high, base + v_max * ww, used)
            return used, low | high

        return conjugate_gradient(
            matvec,
            residual,
            max_iter=max_iter,
            rtol=rtol,
            safeguard=safeguard if self.safeguard else None,
        )


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


def residual_guard(delta: Tensor, residual: Tensor, operator: Operator) -> tuple[Tensor, Tensor]:
    r"""Shrinks guidance that moves :math:`A(\hat{x} + \delta)` farther from :math:`y` than
    :math:`A \hat{x}` in the noise-weighted norm :math:`\lVert v \rVert_{\Sigma_y^{-1}}`.

    For an SPD system solved exactly, :math:`r - A \delta = \Sigma_y u` with :math:`u = M^{-1}
    r`, :math:`r = y - A \hat{x}`, and :math:`\lVert \Sigma_y M^{-1} r \rVert_{\Sigma_y^{-1}} \le
    \lVert r \rVert_{\Sigma_y^{-1}}` since :math:`M \succeq \Sigma_y`: the guard is inactive on
    an exact denoiser once CG has converged. A learned, non-symmetric Jacobian can make
    :math:`A \mathbb{V} A^\top` nearly singular along a direction where no curvature safeguard
    fires; CG then returns a huge :math:`u` and :math:`\delta` throws the sample far off the
    data (the cause of the divergence of EM with more CG iterations, see the docs). Such a
    :math:`\delta` is scaled by the residual-minimising :math:`t \in [0, 1]`. Variances are
    floored at machine epsilon, so noiseless entries weigh equally. Shapes: ``delta``
    ``(B, D)``, ``residual`` ``(B, M)``; returns the guidance and a ``(B,)`` flag.
    """
    residual = torch.nan_to_num(residual)
    precision = 1.0 / torch.as_tensor(operator.noise_var, dtype=delta.dtype, device=delta.device)
    precision = precision.clamp_max(1.0 / torch.finfo(delta.dtype).eps)
    a_delta = operator.apply(delta)
    before = (residual**2 * precision).sum(-1)
    after = ((residual - a_delta) ** 2 * precision).sum(-1)
    bad = after > 1.001 * before + torch.finfo(delta.dtype).tiny
    num = (residual * a_delta * precision).sum(-1)
    den = (a_delta**2 * precision).sum(-1)
    t = (num / torch.where(den > 0, den, 1.0)).clamp(0.0, 1.0)
    return delta * torch.where(bad, t, 1.0).unsqueeze(-1), bad


@dataclass(frozen=True)
class ResidualGradient(Guidance):
    r"""DPS (Chung et al., 2023, algorithm 1): after the solver's step, a step
    :math:`\zeta \, J^\top A^\top r / \lVert r \rVert`, :math:`r = y - A \hat{x}`, i.e. the guided
    denoiser :math:`\hat{x} + \zeta J^\top A^\top r / (\lVert r \rVert \, w)` with the solver's
    weight :math:`w` of the evaluation (1 in a corrector step). :math:`\Sigma_y` is not used."""

    zeta: float = 1.0

    def __call__(
        self,
        denoiser: Denoiser,
        x_t: Tensor,
        sigma: Tensor,
        weight: Tensor | None,
        y: Tensor,
        operator: Operator,
        stats: Stats,
        initial: Tensor | None = None,
    ) -> Guided:
        x_leaf, x_hat = denoise_with_graph(denoiser, x_t, sigma)
        residual = y - operator.apply(x_hat.detach())
        operator = operator.linearize(x_hat.detach())  # the Jacobian at x_hat if nonlinear
        norm = torch.linalg.vector_norm(residual, dim=-1, keepdim=True)
        good = norm > 0
        direction = torch.where(good, residual / torch.where(good, norm, 1.0), 0.0)
        grad = vjp(x_hat, x_leaf, operator.adjoint(direction))
        if weight is None:
            scale = torch.ones_like(sigma)
        else:
            scale = 1.0 / weight.clamp(min=torch.finfo(sigma.dtype).eps)
        _record(stats, "residual_norm", norm.flatten())
        return Guided(x_hat.detach(), (float(self.zeta) * scale.unsqueeze(-1) * grad).detach())
