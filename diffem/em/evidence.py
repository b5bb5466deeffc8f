r"""Log-densities and log-evidences of a diffusion prior.

**Log-density by the probability-flow ODE** (Song et al., 2021, "Score-Based Generative Modeling
through Stochastic Differential Equations", ICLR, appendix D.2). For the variance-exploding
process :math:`x_\sigma = x + \sigma z` with denoiser :math:`D(x, \sigma) = E[x \mid x_\sigma]`,
the probability-flow ODE is

.. math:: \frac{\mathrm{d} x}{\mathrm{d} \sigma} = \frac{x - D(x, \sigma)}{\sigma}
    \quad\Longleftrightarrow\quad \frac{\mathrm{d} x}{\mathrm{d} s} = x - D(x, e^s),
    \qquad s = \log \sigma,

and along its trajectories :math:`\frac{\mathrm{d}}{\mathrm{d}s} \log p_s(x_s) =
-\nabla \cdot (x - D) = -(d - \operatorname{tr} \partial_x D)`. Integrating from
:math:`\sigma_{\min}` (the data end) to :math:`\sigma_{\max}`:

.. math:: \log q(x) \approx \log p_{\sigma_{\min}}(x_{\sigma_{\min}}) =
    \log p_{\sigma_{\max}}(x_{\sigma_{\max}}) + \int_{\log\sigma_{\min}}^{\log\sigma_{\max}}
    \big(d - \operatorname{tr} \partial_x D(x_s, e^s)\big)\,\mathrm{d}s,

with the classical Runge-Kutta method (or Heun's) on a uniform grid in :math:`s` and the
terminal density :math:`p_{\sigma_{\max}} \approx \mathcal{N}(m, \Sigma + \sigma_{\max}^2 I)`
(a Gaussian fitted to the data; exact for a Gaussian prior, and
:math:`\mathcal{N}(0, \sigma_{\max}^2 I)` when none is given). The trace is exact (one
vector-Jacobian product per dimension) up to ``exact_max_dim`` dimensions, and estimated above
by Hutchinson's estimator
:math:`\operatorname{tr} J \approx \frac1P \sum_p \varepsilon_p^\top J \varepsilon_p` with
Rademacher probes :math:`\varepsilon_p` drawn once per trajectory (Grathwohl et al., 2019,
FFJORD).

**Log-evidence by importance sampling.** For :math:`y = A x + e`,
:math:`e \sim \mathcal{N}(0, \Sigma_y)`,

.. math:: \log q(y) = \log \int p(y \mid x)\, q(x)\, \mathrm{d}x \approx
    \operatorname{logsumexp}_{k=1}^{K}\big[\log q(x_k) + \log p(y \mid x_k)
    - \log r(x_k \mid y)\big] - \log K, \qquad x_k \sim r(x \mid y),

with the proposal :math:`r(x \mid y) = \mathcal{N}(\mu_{y}, c\, \Sigma_{y}^{\text{post}})`: the
exact posterior of a Gaussian prior (the EM initialisation) with its covariance inflated by
:math:`c > 1`, so that the proposal's tails are heavier than the target's. For a nonlinear
operator :math:`y = f(x) + e` the proposal is the Gaussian prior's linearised (Laplace)
posterior (:mod:`diffem.priors.linearize`) and :math:`p(y \mid x_k)` the exact likelihood with
:math:`f(x_k)`, so the estimate stays consistent; only its variance depends on how well the
linearisation fits. By default
:math:`c = 1 + \sqrt{2 \ln 2 / D}`: inflating all :math:`D` directions costs a factor
:math:`(c^2 / (2c - 1))^{D/2}` in the weights' second moment, about 2 with this choice.
The estimator is consistent: it converges to :math:`\log q(y)` as :math:`K \to \infty` (the
importance weights have finite variance when the proposal is heavier-tailed), with a negative
bias of order
:math:`\operatorname{Var}[w] / (2 K\, E[w]^2)`; with exact traces it is also consistent in the
number of ODE steps. With Hutchinson traces the log-density estimates are unbiased but noisy,
which adds a bias that does not vanish with :math:`K` (it shrinks with the number of probes).

Only observed measurements count in :math:`\log p(y \mid x)` (pinned entries of a mask carry no
information). Noiseless observations make :math:`p(y \mid x)` degenerate; their noise standard
deviation is floored at ``min_noise_std``, i.e. the estimate is that of :math:`y` observed with
that (small) noise.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diffem.operators import Operator

__all__ = ["importance_log_evidence", "ode_log_density"]

LOG_2PI = math.log(2 * math.pi)

Denoiser = Callable[[Tensor, Tensor], Tensor]


class GaussianDensity:
    r"""Log-density of :math:`\mathcal{N}(m, \Sigma + s^2 I)` for any :math:`s`, from the
    eigendecomposition of :math:`\Sigma` (float64)."""

    def __init__(
        self, mean: Tensor | None, cov: Tensor | None, n_features: int, device: torch.device
    ) -> None:
        if mean is None:
            mean = torch.zeros(n_features, dtype=torch.float64, device=device)
        self.mean = mean.to(dtype=torch.float64, device=device)
        if cov is None:
            self.eigvals = torch.zeros(n_features, dtype=torch.float64, device=device)
            self.eigvecs = None
        else:
            cov = cov.to(dtype=torch.float64, device=device)
            vals, vecs = torch.linalg.eigh(0.5 * (cov + cov.mT))
            self.eigvals, self.eigvecs = vals.clamp_min(0.0), vecs

    def log_prob(self, x: Tensor, sigma: float) -> Tensor:
        """``(B, D) -> (B,)``."""
        v = x.to(torch.float64) - self.mean
        if self.eigvecs is not None:
            v = v @ self.eigvecs
        var = self.eigvals + sigma**2
        return -0.5 * ((v**2 / var).sum(-1) + torch.log(var).sum() + x.shape[-1] * LOG_2PI)


def _divergence(
    denoiser: Denoiser, x: Tensor, sigma: Tensor, probes: Tensor | None
) -> tuple[Tensor, Tensor]:
    r"""``D(x, sigma)`` ``(B, D)`` and :math:`\operatorname{tr} \partial_x D` ``(B,)`` in float64:
    exact when ``probes`` is None (``D`` vector-Jacobian products, batched with ``vmap`` when the
    denoiser supports it), otherwise Hutchinson's estimate with the probes ``(P, B, D)``."""
    b, d = x.shape
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = denoiser(x, sigma)
        if probes is None:
            vectors = torch.eye(d, dtype=out.dtype, device=out.device)[:, None, :].expand(d, b, d)
        else:
            vectors = probes
        try:
            (grads,) = torch.autograd.grad(out, x, grad_outputs=vectors, is_grads_batched=True)
        except RuntimeError:  # a denoiser that vmap cannot batch: one product at a time
            grads = torch.stack(
                [torch.autograd.grad(out, x, grad_outputs=v, retain_graph=True)[0] for v in vectors]
            )
    if probes is None:
        trace = grads.diagonal(dim1=0, dim2=2).sum(-1)
    else:
        trace = (grads * probes).sum(-1).mean(0)
    return out.detach(), trace.detach().to(torch.float64)


def log_sigma_grid(sigma_min: float, sigma_max: float, steps: int) -> list[float]:
    r"""``steps + 1`` noise levels, uniform in :math:`\log \sigma`, increasing."""
    grid = torch.linspace(math.log(sigma_min), math.log(sigma_max), steps + 1, dtype=torch.float64)
    return grid.tolist()


def ode_log_density(
    denoiser: Denoiser,
    x: Tensor,
    *,
    sigma_min: float,
    sigma_max: float,
    steps: int = 16,
    method: str = "rk4",
    terminal_mean: Tensor | None = None,
    terminal_cov: Tensor | None = None,
    exact_max_dim: int = 32,
    n_probes: int = 4,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Log-density :math:`\log q(x)` of a diffusion prior by the probability-flow ODE.

    See the module docstring for the equation. The ODE in :math:`s = \log \sigma` is solved
    on a uniform grid of ``steps`` steps, by the classical Runge-Kutta method (``"rk4"``, four
    denoiser evaluations per step, error :math:`O(h^4)`) or Heun's method (``"heun"``, two
    evaluations per step, error :math:`O(h^2)`); the divergence integral uses the same
    quadrature weights. Each evaluation costs ``D`` (exact trace, ``D <= exact_max_dim``) or
    ``n_probes`` vector-Jacobian products.

    On a Gaussian prior in ``D = 8`` (eigenvalues 0.1 to 3, :math:`\sigma` from 1e-3 to 100),
    ``rk4`` with 16 steps is within 0.04 nats of the exact log-density on average (0.12 at
    worst), Heun with 32 steps (the same cost) within 0.2 on average.

    Parameters
    ----------
    denoiser : callable ``(x_t (B, D), sigma (B,)) -> E[x | x_t] (B, D)``, differentiable
    x : tensor ``(B, D)``, on the denoiser's device and dtype
    sigma_min, sigma_max : float
        The ends of the noise schedule.
    steps : int
        Steps on the uniform grid in :math:`\log \sigma`.
    method : {"rk4", "heun"}
    terminal_mean, terminal_cov : tensors ``(D,)`` and ``(D, D)`` or None
        :math:`p_{\sigma_{\max}} \approx \mathcal{N}(m, \Sigma + \sigma_{\max}^2 I)`.
    exact_max_dim, n_probes : int
        Exact trace up to this dimension; Hutchinson with ``n_probes`` Rademacher probes above.
    generator : torch.Generator or None
        Draws the probes.

    Returns
    -------
    tensor ``(B,)``, float64.
    """
    if method not in ("rk4", "heun"):
        raise ValueError(f"method must be 'rk4' or 'heun', got {method!r}.")
    b, d = x.shape
    probes = None
    if d > exact_max_dim:
        gen_device = generator.device if generator is not None else x.device
        bits = torch.randint(0, 2, (n_probes, b, d), generator=generator, device=gen_device)
        probes = (2.0 * bits - 1.0).to(dtype=x.dtype, device=x.device)

    def field(x: Tensor, s: float) -> tuple[Tensor, Tensor]:
        sigma = torch.full((b,), math.exp(s), dtype=x.dtype, device=x.device)
        out, trace = _divergence(denoiser, x, sigma, probes)
        return x - out, d - trace

    grid = log_sigma_grid(sigma_min, sigma_max, steps)
    integral = torch.zeros(b, dtype=torch.float64, device=x.device)
    x = x.detach()
    for s0, s1 in itertools.pairwise(grid):
        h = s1 - s0
        k1, g1 = field(x, s0)
        if method == "heun":
            k2, g2 = field(x + h * k1, s1)
            x = x + 0.5 * h * (k1 + k2)
            integral += 0.5 * h * (g1 + g2)
        else:
            k2, g2 = field(x + 0.5 * h * k1, s0 + 0.5 * h)
            k3, g3 = field(x + 0.5 * h * k2, s0 + 0.5 * h)
            k4, g4 = field(x + h * k3, s1)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            integral += h / 6 * (g1 + 2 * g2 + 2 * g3 + g4)
    terminal = GaussianDensity(terminal_mean, terminal_cov, d, x.device)
    return terminal.log_prob(x, sigma_max) + integral


def _floor_noise(operator: Operator, min_noise_std: float) -> Operator:
    """A copy of ``operator`` whose noise std is at least ``min_noise_std``."""
    if min_noise_std <= 0 or bool((operator.noise_std >= min_noise_std).all()):
        return operator
    new = copy.copy(operator)
    new.noise_std = operator.noise_std.clamp_min(min_noise_std)
    return new


def _log_likelihood(y: Tensor, Ax: Tensor, var: Tensor, observed: Tensor) -> Tensor:
    r""":math:`\log \mathcal{N}(y; A x, \Sigma_y)` over observed entries; ``(B, M) -> (B,)``."""
    terms = -0.5 * ((y - Ax) ** 2 / var + torch.log(var) + LOG_2PI)
    return torch.where(observed, terms, torch.zeros_like(terms)).sum(-1)


def importance_log_evidence(
    denoiser: Denoiser,
    Y: Tensor,
    operator: Operator,
    proposal: Any,
    *,
    sigma_min: float,
    sigma_max: float,
    n_samples: int = 32,
    steps: int = 16,
    method: str = "rk4",
    inflation: float | None = None,
    min_noise_std: float = 1e-3,
    exact_max_dim: int = 32,
    n_probes: int = 4,
    batch_size: int = 4096,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Importance-sampling estimate of :math:`\log q(y_i)` for a diffusion prior.

    See the module docstring for the estimator,

    .. math:: \log q(y) \approx \operatorname{logsumexp}_k \big[\log q(x_k) + \log p(y \mid x_k)
        - \log r(x_k \mid y)\big] - \log K.

    Parameters
    ----------
    denoiser : callable ``(x_t, sigma) -> E[x | x_t]`` on ``device``
    Y : tensor ``(n, M)``
    operator : Operator of batch ``n``
    proposal : :class:`~diffem.priors.GaussianPrior`
        Its exact posterior, inflated, is the proposal; its mean and covariance also give the
        ODE's terminal density.
    sigma_min, sigma_max : float
        The denoiser's noise schedule.
    n_samples : int
        ``K``, proposals per observation (the cost parameter).
    steps : int
        Steps of the probability-flow ODE.
    method : {"rk4", "heun"}
        Its solver (see :func:`ode_log_density`).
    inflation : float or None
        ``c > 1``, the proposal covariance inflation. ``None``: :math:`c = 1 + \sqrt{2 \ln 2 / D}`,
        for which, when the target posterior is the Gaussian proposal's, the importance weights'
        second moment :math:`(c^2 / (2c - 1))^{D/2} \approx 2` (an effective sample size of
        about ``K / 2``) in any dimension ``D``.
    min_noise_std : float
        Floor of the observation noise std (see the module docstring).
    exact_max_dim, n_probes : int
        Trace estimation (see :func:`ode_log_density`).
    batch_size : int
        Proposals per ODE batch (bounds memory).
    dtype, device
        Of the denoiser's inputs.
    generator : torch.Generator or None

    Returns
    -------
    log_evidence : tensor ``(n,)``, float64, on the CPU
    ess : tensor ``(n,)``, the effective sample sizes
        :math:`(\sum_k w_k)^2 / \sum_k w_k^2` of the importance weights (``1`` to ``K``).
    """
    device = torch.device(device)
    n = Y.shape[0]
    op = _floor_noise(operator, min_noise_std)
    prior = proposal.to(device=device)
    d = op.n_features
    if inflation is None:
        inflation = 1.0 + math.sqrt(2 * math.log(2) / d)
    if not inflation >= 1.0:
        raise ValueError(f"inflation must be at least 1, got {inflation!r}.")
    terminal_mean = prior.mean.to(torch.float64)
    terminal_cov = prior.cov_matrix.to(torch.float64)
    per_chunk = max(1, batch_size // n_samples)
    out, ess = [], []
    for start in range(0, n, per_chunk):
        idx = torch.arange(start, min(n, start + per_chunk))
        op_c = op[idx].to(device=device)
        y_c = Y[idx].to(device=device, dtype=torch.float64)
        b = idx.numel()
        means, _, covs = prior._posterior_torch(y_c, op_c, need_cov=True)
        covs = inflation * 0.5 * (covs + covs.mT)
        scale = covs.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
        eye = torch.eye(d, dtype=torch.float64, device=device)
        jitter = 1e-10
        while True:
            L, info = torch.linalg.cholesky_ex(covs + jitter * scale[:, None, None] * eye)
            if not bool((info != 0).any()):
                break
            jitter *= 10
        gen_device = generator.device if generator is not None else device
        z = torch.randn(
            (b, n_samples, d), generator=generator, dtype=torch.float64, device=gen_device
        ).to(device)
        x = means[:, None, :] + (L[:, None] @ z.unsqueeze(-1)).squeeze(-1)  # (b, K, D)
        log_r = (
            -0.5 * (z**2).sum(-1)
            - torch.log(L.diagonal(dim1=-2, dim2=-1)).sum(-1)[:, None]
            - 0.5 * d * LOG_2PI
        )
        # Likelihood in float64 through the operator (pinned entries excluded).
        rows = torch.arange(b, device=device).repeat_interleave(n_samples)
        op64 = op_c.to(dtype=torch.float64)
        op_k = op64[rows.cpu()]
        flat = x.reshape(b * n_samples, d)
        Ax = op_k.apply(flat)
        y_k = op64.prepare(y_c)[rows]
        var = op_k.noise_var.expand_as(Ax)
        observed = op_k.observed.expand_as(Ax)
        log_lik = _log_likelihood(y_k, Ax, var, observed).reshape(b, n_samples)
        # Prior log-density by the probability-flow ODE, in batches of proposals.
        log_q = torch.cat(
            [
                ode_log_density(
                    denoiser,
                    part.to(dtype),
                    sigma_min=sigma_min,
                    sigma_max=sigma_max,
                    steps=steps,
                    method=method,
                    terminal_mean=terminal_mean,
                    terminal_cov=terminal_cov,
                    exact_max_dim=exact_max_dim,
                    n_probes=n_probes,
                    generator=generator,
                )
                for part in flat.split(batch_size)
            ]
        ).reshape(b, n_samples)
        log_w = log_q + log_lik - log_r
        out.append((torch.logsumexp(log_w, dim=-1) - math.log(n_samples)).cpu())
        w = torch.softmax(log_w, dim=-1)
        ess.append((1.0 / (w**2).sum(-1)).cpu())
    return torch.cat(out), torch.cat(ess)
