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
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from diffem.operators.base import Operator
from diffem.samplers._rows import dot, finite_rows
from diffem.samplers.cg import CGResult, conjugate_gradient
from diffem.schedule import gaussian_variance

__all__ = [
    "COVARIANCES",
    "Evaluation",
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


def _record(stats: Stats, key: str, value: Tensor) -> None:
    stats.setdefault(key, []).append(value.detach())


class Evaluation(NamedTuple):
    """The denoiser evaluated, with its graph, on one chunk of rows, and the residual of the
    observations there: what a guidance works from."""

    x_leaf: Tensor
    """``(B, D)`` :math:`x_t`, an autograd leaf."""
    x_hat: Tensor
    r"""``(B, D)`` :math:`\hat{x} = E[x \mid x_t]`, with its graph."""
    sigma: Tensor
    """``(B,)`` noise levels."""
    weight: Tensor | None
    """``(B,)`` the solver's weight of this evaluation (:mod:`diffem.samplers.solvers`)."""
    residual: Tensor
    r"""``(B, M)`` :math:`y - A \hat{x}` (rows with a non-finite entry set to 0)."""
    operator: Operator
    """The observation operators of the rows."""

    def vjp(self, v: Tensor) -> Tensor:
        """:math:`J^\top v` for ``v`` ``(B, D)`` (:func:`vjp`)."""
        return vjp(self.x_hat, self.x_leaf, v)


class Guidance(ABC):
    """Turns ``denoiser`` into a guided estimate at ``(x_t, sigma)`` for ``(y, operator)``."""

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
        """``x_t`` ``(B, D)``, ``sigma`` ``(B,)``, ``y`` ``(B, M)``; ``weight`` ``(B,)`` is the
        solver's weight of this evaluation (:mod:`diffem.samplers.solvers`); ``stats`` collects
        ``(B,)`` diagnostics; ``initial`` ``(B, M)`` is a starting point of the linear solve
        (the previous evaluation's :attr:`Guided.solution`), used by guidances that solve one.
        """
        x_leaf, x_hat = denoise_with_graph(denoiser, x_t, sigma)
        residual = zero_nonfinite_rows(y - operator.apply(x_hat.detach()))
        evaluation = Evaluation(x_leaf, x_hat, sigma, weight, residual, operator)
        return self.guide(evaluation, stats, initial)

    @abstractmethod
    def guide(self, e: Evaluation, stats: Stats, initial: Tensor | None) -> Guided:
        """The guided estimate from the evaluation ``e``."""


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

    def guide(self, e: Evaluation, stats: Stats, initial: Tensor | None) -> Guided:
        s2 = (e.sigma**2).unsqueeze(-1)
        r2 = gaussian_variance(e.sigma, float(self.sigma_data))
        v_min = float(self.variance_bounds[0]) * r2
        v_max = float(self.variance_bounds[1]) * r2
        var = e.operator.noise_var
        jacobian = self.covariance == "jacobian"
        start, start_image, rhs = None, None, e.residual
        if initial is not None and jacobian:
            start, start_image, rhs = self._warm_start(e, initial, s2, var)
        result = self._solve(e, rhs, s2, r2, v_min, v_max, var, stats)
        solution = result.solution if start is None else start + result.solution
        if jacobian:  # [V A^T u, A^T u]; no image: CG took no step (zero residual)
            image = start_image if result.image is None else result.image
            if result.image is not None and start_image is not None:
                image = image + start_image
            if image is None:
                delta, w = torch.zeros_like(e.x_leaf), torch.zeros_like(e.x_leaf)
            else:
                delta, w = image.split(e.x_leaf.shape[-1], dim=-1)
            # A delta = (b - r) - Sigma_y u (cg.py), with b = residual - A(start image) - var start
            a_delta = e.residual - result.remainder - var * solution
        else:
            w = e.operator.adjoint(solution)
            delta = s2 * e.vjp(w)
            a_delta = None
        scale = None
        if self.clip:
            scale, clipped = _clip_scale(delta, w, v_min, v_max)
            _record(stats, "clipped", clipped.to(delta.dtype))
        if self.residual_guard:
            if a_delta is None:
                a_delta = e.operator.apply(delta)
            shrink, guarded = residual_guard(e.residual, a_delta, var, scale)
            scale = shrink if scale is None else scale * shrink
            _record(stats, "residual_guarded", guarded.to(delta.dtype))
        if scale is not None and not bool((scale == 1).all()):
            delta = delta * scale.unsqueeze(-1)
        relative = result.residual
        if start is not None:  # relative to the cold-start residual y - A x_hat
            scale_rhs = torch.linalg.vector_norm(rhs, dim=-1)
            base = torch.linalg.vector_norm(e.residual, dim=-1)
            relative = torch.where(
                base > 0, relative * scale_rhs / torch.where(base > 0, base, 1), 0
            )
        _record(stats, "cg_residual", relative)
        _record(stats, "cg_iterations", result.iterations.to(delta.dtype))
        if self.safeguard and jacobian:
            _record(stats, "cg_safeguarded", result.safeguarded.to(delta.dtype))
        log_likelihood = -0.5 * dot(e.residual, solution)
        return Guided(e.x_hat.detach(), delta.detach(), log_likelihood.detach(), solution.detach())

    def _warm_start(
        self, e: Evaluation, initial: Tensor, s2: Tensor, var: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        r"""Starts CG from :math:`u_0` (one product, which also gives :math:`\sigma_t^2 J^\top
        A^\top u_0`); rows where :math:`u_0` is not finite or does not reduce the residual
        start from 0. Returns :math:`u_0`, its image :math:`[\sigma_t^2 J^\top A^\top u_0,
        A^\top u_0]` and the residual :math:`b - M u_0`."""
        w = e.operator.adjoint(initial)
        image = s2 * e.vjp(w)
        rhs = e.residual - var * initial - e.operator.apply(image)
        good = finite_rows(image) & (dot(rhs, rhs) < dot(e.residual, e.residual))
        image = torch.cat([image, w], dim=-1)
        if bool(good.all()):
            return initial, image, rhs
        keep = good.unsqueeze(-1)
        return (
            torch.where(keep, initial, 0.0),
            torch.where(keep, image, 0.0),
            torch.where(keep, rhs, e.residual),
        )

    def _solve(
        self,
        e: Evaluation,
        rhs: Tensor,
        s2: Tensor,
        r2: Tensor,
        v_min: Tensor,
        v_max: Tensor,
        var: Tensor,
        stats: Stats,
    ) -> CGResult:
        operator = e.operator
        max_iter = operator.n_measurements if self.cg_iter is None else int(self.cg_iter)
        rtol = float(self.cg_rtol)
        if self.covariance != "jacobian":
            if self.covariance == "diagonal":
                raw = s2 * e.vjp(torch.ones_like(e.x_leaf))
                raw = torch.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0)
                low = float(self.min_variance) * r2.unsqueeze(-1)
                diagonal = torch.minimum(torch.maximum(raw, low), s2)
                _record(stats, "clamped", ((raw < low) | (raw > s2)).to(raw.dtype).mean(-1))
            else:
                diagonal = r2.unsqueeze(-1) if self.covariance == "gaussian" else s2

            def linear(p: Tensor) -> Tensor:
                return var * p + operator.apply(diagonal * operator.adjoint(p))

            return conjugate_gradient(linear, rhs, max_iter=max_iter, rtol=rtol)

        # The adjoint A^T p and covariance part A V A^T p of the last product, for the safeguard.
        last: dict[str, Tensor] = {}

        def matvec(p: Tensor) -> tuple[Tensor, Tensor]:
            # B p = [V A^T p, A^T p]: CG accumulates the guidance V A^T u and A^T u together.
            last["w"] = operator.adjoint(p)
            image = s2 * e.vjp(last["w"])
            last["cov"] = operator.apply(image)
            return var * p + last["cov"], torch.cat([image, last["w"]], dim=-1)

        def safeguard(p: Tensor, curvature: Tensor) -> tuple[Tensor, Tensor]:
            w = last["w"]
            ww = dot(w, w)
            # Rayleigh quotient of V alone: w^T V w = p^T (A V A^T p), not the difference
            # curvature - p^T Sigma_y p, in which the noise term swamps a small covariance term
            # in float32 (low noise levels with sigma_y ~ 1).
            quad = torch.where(torch.isfinite(curvature), dot(p, last["cov"]), torch.nan)
            rho = quad / torch.where(ww > 0, ww, 1.0)
            low = ~(rho >= v_min) & (ww > 0)  # also NaN
            high = (rho > v_max) & (ww > 0)
            flagged = low | high
            if not bool(flagged.any()):
                return curvature, flagged
            base = dot(p, var * p)
            used = torch.where(low, base + r2 * ww, curvature)
            used = torch.where(high, base + v_max * ww, used)
            return used, flagged

        return conjugate_gradient(
            matvec,
            rhs,
            max_iter=max_iter,
            rtol=rtol,
            safeguard=safeguard if self.safeguard else None,
        )


def _clip_scale(delta: Tensor, w: Tensor, v_min: Tensor, v_max: Tensor) -> tuple[Tensor, Tensor]:
    r"""The factor that rescales :math:`\delta = \mathbb{V} w` onto :math:`\lVert \delta
    \rVert^2 \le v_{\max} \operatorname{clamp}(w^\top \delta, v_{\min} \lVert w \rVert^2,
    v_{\max} \lVert w \rVert^2)`, which holds for every PSD :math:`\mathbb{V}` with eigenvalues
    in :math:`[v_{\min}, v_{\max}]`. Shapes: ``delta``, ``w`` ``(B, D)``; returns the ``(B,)``
    factor (1 where the bound holds) and a ``(B,)`` flag.
    """
    ww = dot(w, w)
    q = torch.minimum(torch.maximum(dot(w, delta), v_min * ww), v_max * ww)
    cap2 = v_max * q
    norm2 = dot(delta, delta)
    # Clip only beyond a rounding margin (1.001 on the norm), so that exact denoisers never are.
    clipped = norm2 > 1.002001 * cap2
    scale = torch.where(clipped, torch.sqrt(cap2 / torch.where(clipped, norm2, 1.0)), 1.0)
    return scale, clipped


def residual_guard(
    residual: Tensor, a_delta: Tensor, noise_var: Tensor, scale: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    r"""The factor that shrinks guidance moving :math:`A(\hat{x} + \delta)` farther from
    :math:`y` than :math:`A \hat{x}` in the noise-weighted norm
    :math:`\lVert v \rVert_{\Sigma_y^{-1}}`.

    For an SPD system solved exactly, :math:`r - A \delta = \Sigma_y u` with :math:`u = M^{-1}
    r`, :math:`r = y - A \hat{x}`, and :math:`\lVert \Sigma_y M^{-1} r \rVert_{\Sigma_y^{-1}} \le
    \lVert r \rVert_{\Sigma_y^{-1}}` since :math:`M \succeq \Sigma_y`: the guard is inactive on
    an exact denoiser once CG has converged. A learned, non-symmetric Jacobian can make
    :math:`A \mathbb{V} A^\top` nearly singular along a direction where no curvature safeguard
    fires; CG then returns a huge :math:`u` and :math:`\delta` throws the sample far off the
    data (the cause of the divergence of EM with more CG iterations, see the docs). Such a
    :math:`\delta` is scaled by the residual-minimising :math:`t \in [0, 1]`. Variances are
    floored at machine epsilon, so noiseless entries weigh equally.

    Shapes: ``residual`` :math:`r` and ``a_delta`` :math:`A \delta` ``(B, M)``, ``noise_var``
    broadcastable to them, ``scale`` ``(B,)`` a factor already applied to :math:`\delta` (or
    ``None``); returns the ``(B,)`` factor :math:`t` (1 where the guard is inactive) and a
    ``(B,)`` flag.
    """
    eps = torch.finfo(a_delta.dtype).eps
    precision = 1.0 / torch.as_tensor(noise_var, dtype=a_delta.dtype, device=a_delta.device)
    weighted = residual * precision.clamp_max(1.0 / eps)
    before = dot(residual, weighted)
    num = dot(a_delta, weighted)
    den = dot(a_delta, a_delta * precision.clamp_max(1.0 / eps))
    if scale is not None:
        num, den = scale * num, scale**2 * den
    after = before - 2.0 * num + den
    bad = after > 1.001 * before + torch.finfo(a_delta.dtype).tiny
    t = (num / torch.where(den > 0, den, 1.0)).clamp(0.0, 1.0)
    return torch.where(bad, t, 1.0), bad


def zero_nonfinite_rows(x: Tensor) -> Tensor:
    """``x`` ``(B, n)`` with its rows that hold a non-finite entry set to 0."""
    finite = finite_rows(x)
    return x if bool(finite.all()) else torch.where(finite.unsqueeze(-1), x, 0.0)


def fallback(delta: Tensor, stats: Stats) -> Tensor:
    """Guidance ``delta`` ``(B, D)`` with non-finite rows replaced by 0 (no guidance), their
    fraction recorded in ``stats["fallback"]``."""
    finite = finite_rows(delta)
    stats.setdefault("fallback", []).append((~finite).to(delta.dtype))
    return delta if bool(finite.all()) else torch.where(finite.unsqueeze(-1), delta, 0.0)


@dataclass(frozen=True)
class ResidualGradient(Guidance):
    r"""DPS (Chung et al., 2023, algorithm 1): after the solver's step, a step
    :math:`\zeta \, J^\top A^\top r / \lVert r \rVert`, :math:`r = y - A \hat{x}`, i.e. the guided
    denoiser :math:`\hat{x} + \zeta J^\top A^\top r / (\lVert r \rVert \, w)` with the solver's
    weight :math:`w` of the evaluation (1 in a corrector step). :math:`\Sigma_y` is not used."""

    zeta: float = 1.0

    def guide(self, e: Evaluation, stats: Stats, initial: Tensor | None) -> Guided:
        norm = torch.linalg.vector_norm(e.residual, dim=-1, keepdim=True)
        good = norm > 0
        direction = torch.where(good, e.residual / torch.where(good, norm, 1.0), 0.0)
        grad = e.vjp(e.operator.adjoint(direction))
        if e.weight is None:
            scale = torch.ones_like(e.sigma)
        else:
            scale = 1.0 / e.weight.clamp(min=torch.finfo(e.sigma.dtype).eps)
        _record(stats, "residual_norm", norm.flatten())
        delta = float(self.zeta) * scale.unsqueeze(-1) * grad
        return Guided(e.x_hat.detach(), delta.detach())
