r"""Tweedie moment projected diffusion (TMPD), Boys, Girolami, Pidstrigach, Reich, Mosca &
Akyildiz (2024), "Tweedie Moment Projected Diffusions for Inverse Problems", TMLR."""

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

__all__ = ["TMPD"]


class TMPD(PosteriorSampler):
    r"""Tweedie moment projected diffusion with a diagonal covariance (Boys et al., 2024).

    Tweedie's covariance :math:`\mathbb{V}[x \mid x_t] = \sigma_t^2 J`,
    :math:`J = \partial \hat{x} / \partial x_t`, is replaced by the diagonal of its row sums,
    obtained with a single vector-Jacobian product,

    .. math::
        \mathbb{V} \approx \operatorname{diag}(v), \qquad
        v = \operatorname{clamp}\big(\sigma_t^2 J^\top \mathbf{1},\ \kappa r_t^2,\
        \sigma_t^2\big),

    (:math:`r_t^2 = \sigma_t^2 \sigma_d^2 / (\sigma_t^2 + \sigma_d^2)`, the clamp keeps it
    positive and no larger than the forward noise), then

    .. math::
        (\Sigma_y + A \operatorname{diag}(v) A^\top) \, u = y - A \hat{x}, \qquad
        E[x \mid x_t, y] \approx \hat{x} + \sigma_t^2 J^\top A^\top u,

    the SPD system being solved to convergence by conjugate gradient. Shapes: ``x_t``, ``v``
    ``(B, D)``; ``y``, ``u`` ``(B, M)``.

    Parameters
    ----------
    steps : int
    sigma_data : float
        Data scale :math:`\sigma_d` of the lower clamp.
    min_variance : float
        :math:`\kappa`, relative lower clamp of the diagonal.
    cg_iter : int or None
        Maximum CG iterations (``None``: ``M``).
    cg_rtol : float
    eta, solver, sigma_min, sigma_max, batch_size, corrector_steps, corrector_snr, verbose
        See :class:`diffem.samplers.base.Sampler`.

    Attributes
    ----------
    diagnostics_ : dict of float
        ``cg_residual``, ``cg_iterations``, ``clamped`` (fraction of clamped diagonal
        entries), ``fallback``, ``wall_time``.
    """

    def __init__(
        self,
        steps: int = 64,
        eta: float = 1.0,
        *,
        sigma_data: float = 1.0,
        min_variance: float = 1e-3,
        cg_iter: int | None = None,
        cg_rtol: float = 1e-6,
        solver: str = "ancestral",
        sigma_min: float = 1e-3,
        sigma_max: float = 1e2,
        batch_size: int = 4096,
        corrector_steps: int = 0,
        corrector_snr: float = 0.1,
        verbose: int = 0,
    ) -> None:
        self.steps = steps
        self.eta = eta
        self.sigma_data = sigma_data
        self.min_variance = min_variance
        self.cg_iter = cg_iter
        self.cg_rtol = cg_rtol
        self.solver = solver
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.batch_size = batch_size
        self.corrector_steps = corrector_steps
        self.corrector_snr = corrector_snr
        self.verbose = verbose

    def _validate(self) -> None:
        self._validate_common()
        _check_number(self.sigma_data, "sigma_data", 0.0, low_open=True)
        _check_number(self.min_variance, "min_variance", 0.0, 1.0, low_open=True)
        if self.cg_iter is not None:
            _check_int(self.cg_iter, "cg_iter", 1)
        _check_number(self.cg_rtol, "cg_rtol", 0.0)

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
        sd2 = float(self.sigma_data) ** 2
        low = float(self.min_variance) * s2 * sd2 / (s2 + sd2)
        raw = s2 * vjp(x_hat, x_leaf, torch.ones_like(x_hat))
        raw = torch.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0)
        v = torch.minimum(torch.maximum(raw, low), s2)
        var = operator.noise_var
        residual = y - operator.apply(x_hat.detach())

        def matvec(p: Tensor) -> Tensor:
            return var * p + operator.apply(v * operator.adjoint(p))

        max_iter = operator.n_measurements if self.cg_iter is None else int(self.cg_iter)
        result = conjugate_gradient(matvec, residual, max_iter=max_iter, rtol=float(self.cg_rtol))
        w = operator.adjoint(result.solution)
        delta = s2 * vjp(x_hat, x_leaf, w, retain_graph=False)
        stats.setdefault("cg_residual", []).append(result.residual)
        stats.setdefault("cg_iterations", []).append(result.iterations.to(x_t.dtype))
        stats.setdefault("clamped", []).append(((raw < low) | (raw > s2)).to(x_t.dtype).mean(-1))
        return x_hat.detach(), delta
