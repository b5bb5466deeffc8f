r"""Diffusion posterior sampling (DPS), Chung, Kim, McCann, Klasky & Ye (2023), "Diffusion
Posterior Sampling for General Noisy Inverse Problems", ICLR."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diffem.operators.base import Operator
from diffem.samplers.base import PosteriorSampler, _check_number, denoise_with_graph, vjp

__all__ = ["DPS"]


class DPS(PosteriorSampler):
    r"""Diffusion posterior sampling (Chung et al., 2023, algorithm 1).

    DPS neglects the covariance of :math:`p(x \mid x_t)` and takes, after each ancestral step
    :math:`x_t \to x_s'`, a normalised gradient step on the residual norm,

    .. math::
        x_s = x_s' - \zeta \, \nabla_{x_t} \lVert y - A \hat{x}(x_t) \rVert
            = x_s' + \zeta \, \frac{J^\top A^\top (y - A \hat{x})}{\lVert y - A \hat{x} \rVert},

    i.e. the step :math:`\zeta / \lVert y - A \hat{x} \rVert` on
    :math:`-\nabla_{x_t} \tfrac12 \lVert y - A \hat{x} \rVert^2`, with
    :math:`\hat{x} = E[x \mid x_t]` and :math:`J = \partial \hat{x} / \partial x_t`. As a guided
    denoiser this is :math:`\hat{x} + \delta` with :math:`\delta = \zeta J^\top A^\top r /
    (\lVert r \rVert (1 - c))`, where :math:`c = \sqrt{\sigma_s^2 - \tau^2} / \sigma_t` is the
    weight of :math:`x_t - \hat{x}` in the ancestral step, which reproduces the update above
    exactly (in a corrector step, :math:`c = 0`). With the other solvers :math:`1 - c` is the
    weight of the evaluation in the update times the number of evaluations of the step
    (:meth:`diffem.samplers.base.Sampler._mean_all`): a Heun step then moves :math:`x_s` by
    :math:`\zeta` times the mean of its two normalised gradients, and a DPM-Solver++(2M)
    step by :math:`\zeta` times the current one (to first order). The noise covariance
    :math:`\Sigma_y` is not used. Shapes: ``x_t`` ``(B, D)``, ``y`` ``(B, M)``.

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
        ``residual_norm`` (mean :math:`\lVert y - A \hat{x} \rVert` over steps and rows),
        ``fallback``, ``wall_time``.
    """

    def __init__(
        self,
        steps: int = 64,
        zeta: float = 1.0,
        eta: float = 1.0,
        *,
        solver: str = "ancestral",
        sigma_min: float = 1e-3,
        sigma_max: float = 1e2,
        batch_size: int = 4096,
        corrector_steps: int = 0,
        corrector_snr: float = 0.1,
        verbose: int = 0,
    ) -> None:
        self.steps = steps
        self.zeta = zeta
        self.eta = eta
        self.solver = solver
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.batch_size = batch_size
        self.corrector_steps = corrector_steps
        self.corrector_snr = corrector_snr
        self.verbose = verbose

    def _validate(self) -> None:
        self._validate_common()
        _check_number(self.zeta, "zeta", 0.0)

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
        residual = y - operator.apply(x_hat.detach())
        norm = torch.linalg.vector_norm(residual, dim=-1, keepdim=True)
        good = norm > 0
        direction = torch.where(good, residual / torch.where(good, norm, 1.0), 0.0)
        grad = vjp(x_hat, x_leaf, operator.adjoint(direction), retain_graph=False)
        if weight is None:
            scale = torch.ones_like(sigma)
        else:
            scale = 1.0 / weight.clamp(min=torch.finfo(sigma.dtype).eps)
        stats.setdefault("residual_norm", []).append(norm.flatten())
        return x_hat.detach(), float(self.zeta) * scale.unsqueeze(-1) * grad
