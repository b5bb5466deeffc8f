r"""Pseudoinverse-guided diffusion (PiGDM), Song, Vahdat, Mardani & Kautz (2023),
"Pseudoinverse-Guided Diffusion Models for Inverse Problems", ICLR."""

from __future__ import annotations

from collections.abc import Callable

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

__all__ = ["PiGDM"]


class PiGDM(PosteriorSampler):
    r"""Pseudoinverse-guided diffusion (Song et al., 2023).

    Approximates :math:`p(x \mid x_t) \approx \mathcal{N}(\hat{x}, r_t^2 I)` with the isotropic
    variance :math:`r_t^2 = \sigma_t^2 \sigma_d^2 / (\sigma_t^2 + \sigma_d^2)` (the posterior
    variance under a :math:`\mathcal{N}(0, \sigma_d^2 I)` prior), so that

    .. math::
        \nabla_{x_t} \log q(y \mid x_t) \approx J^\top A^\top u, \qquad
        (\Sigma_y + r_t^2 A A^\top) \, u = y - A \hat{x},

    with :math:`\hat{x} = E[x \mid x_t]`, :math:`J = \partial \hat{x} / \partial x_t`, and the
    guided denoiser :math:`\hat{x} + \sigma_t^2 J^\top A^\top u`. The system is SPD and solved
    to convergence by conjugate gradient (``cg_iter=None``: up to ``M`` iterations, stopping at
    relative residual ``cg_rtol``). Shapes: ``x_t`` ``(B, D)``, ``y`` and ``u`` ``(B, M)``.

    Parameters
    ----------
    steps : int
    sigma_data : float
        Data scale :math:`\sigma_d`.
    cg_iter : int or None
        Maximum CG iterations (``None``: ``M``).
    cg_rtol : float
    eta, solver, sigma_min, sigma_max, batch_size, corrector_steps, corrector_snr, verbose
        See :class:`diffem.samplers.base.Sampler`.

    Attributes
    ----------
    diagnostics_ : dict of float
        ``cg_residual``, ``cg_iterations``, ``fallback``, ``wall_time``.
    """

    def __init__(
        self,
        steps: int = 64,
        sigma_data: float = 1.0,
        eta: float = 1.0,
        *,
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
        self.sigma_data = sigma_data
        self.eta = eta
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
        r2 = s2 * sd2 / (s2 + sd2)
        var = operator.noise_var
        residual = y - operator.apply(x_hat.detach())

        def matvec(p: Tensor) -> Tensor:
            return var * p + r2 * operator.apply(operator.adjoint(p))

        max_iter = operator.n_measurements if self.cg_iter is None else int(self.cg_iter)
        result = conjugate_gradient(matvec, residual, max_iter=max_iter, rtol=float(self.cg_rtol))
        w = operator.adjoint(result.solution)
        delta = s2 * vjp(x_hat, x_leaf, w, retain_graph=False)
        stats.setdefault("cg_residual", []).append(result.residual)
        stats.setdefault("cg_iterations", []).append(result.iterations.to(x_t.dtype))
        return x_hat.detach(), delta
