r"""Log-densities and log-evidences of a diffusion prior.

**Log-density by the probability-flow ODE, relative to a Gaussian** (Song et al., 2021,
"Score-Based Generative Modeling through Stochastic Differential Equations", ICLR, appendix
D.2). For the variance-exploding process :math:`x_\sigma = x + \sigma z` with denoiser
:math:`D(x, \sigma) = E[x \mid x_\sigma]`, the probability-flow ODE in :math:`s = \log \sigma` is
:math:`\mathrm{d}x / \mathrm{d}s = x - D(x, e^s)`, and along its trajectories
:math:`\mathrm{d} \log p_s(x_s) / \mathrm{d}s = -\nabla \cdot (x - D) = -(d -
\operatorname{tr} \partial_x D)`.

It is solved *relative to a Gaussian* :math:`\mathcal{N}(m, C)`,
:math:`C = V \operatorname{diag}(\lambda) V^\top`, whose flow is known in closed form: its
denoiser is :math:`D_G(x, \sigma) = m + P_\sigma (x - m)` with
:math:`P_\sigma = C (C + \sigma^2 I)^{-1}`, and its flow keeps the whitened coordinates
:math:`w = (C + \sigma^2 I)^{-1/2} (x - m)` constant. For any denoiser, in these coordinates,

.. math:: \frac{\mathrm{d} w}{\mathrm{d} s} = -(C + \sigma^2 I)^{-1/2}
    \big(D(x, \sigma) - D_G(x, \sigma)\big), \qquad x = m + (C + \sigma^2 I)^{1/2} w,

and, integrating the density along the flow from :math:`\sigma_0` to :math:`\sigma_T` with
:math:`p_{\sigma_T} \approx \mathcal{N}(m, C + \sigma_T^2 I)` at the end, since
:math:`\int \operatorname{tr}(I - P_\sigma)\,\mathrm{d}s =
\tfrac12 \sum_j \log \frac{\lambda_j + \sigma_T^2}{\lambda_j + \sigma_0^2}` exactly,

.. math:: \log p_{\sigma_0}(x) = \log \mathcal{N}(x; m, C + \sigma_0^2 I)
    + \tfrac12 \big(\lVert w_0 \rVert^2 - \lVert w_T \rVert^2\big)
    - \int_{\log \sigma_0}^{\log \sigma_T} \operatorname{tr}\big(\partial_x D(x_s, e^s)
    - P_{e^s}\big)\, \mathrm{d}s.

Both corrections vanish when the prior is the Gaussian, for any step size: the ODE solver
only integrates the prior's departure from the Gaussian, which is why few steps suffice. It
is Heun's method with uniform steps in a time :math:`\tau(\sigma)` that follows the Gaussian's
mean shrinkage :math:`\frac1D \sum_j \sigma^2 / (\lambda_j + \sigma^2)`
(:meth:`GaussianFlow.time_grid`), so that the steps fall where :math:`\sigma^2` crosses the
eigenvalues, where the flow transports mass. :math:`\log q(x)` is approximated by
:math:`\log p_{\sigma_{\min}}(x)`, the density the denoiser defines.

*Trace.* :math:`\operatorname{tr}(\partial_x D - P_\sigma)` is exact (one vector-Jacobian
product per dimension) when :math:`D` is at most the number of probes; otherwise it is
Hutchinson's estimate with Rademacher probes :math:`\varepsilon` drawn afresh at every
evaluation (Hutchinson, 1990; Grathwohl et al., 2019, FFJORD), with
:math:`\varepsilon^\top P_\sigma \varepsilon` as control variate:
:math:`\varepsilon^\top (\partial_x D - P_\sigma) \varepsilon` is unbiased, and its variance,
:math:`2 \sum_{i \neq j} (\partial_x D - P_\sigma)_{ij}^2`, vanishes as the prior approaches the
Gaussian. The spread of the probes estimates the variance :math:`v` of the resulting noise in
:math:`\log \hat q(x)`.

**Log-evidence by importance sampling.** For :math:`y = A x + e`,
:math:`e \sim \mathcal{N}(0, \Sigma_y)`, with :math:`K` proposals
:math:`x_k \sim r(x \mid y)` and weights
:math:`\log w_k = \log \hat q(x_k) - v_k / 2 + \log p(y \mid x_k) - \log r(x_k \mid y)`
(the :math:`- v_k / 2` makes :math:`E[w_k]` unbiased under Gaussian trace noise),

.. math:: \log q(y) \approx \log \frac1K \sum_{k=1}^K w_k + \frac{\mathrm{se}^2}{2},
    \qquad \mathrm{se}^2 = \frac{\hat V[w]}{K \bar w^2},

where :math:`\mathrm{se}` is the delta-method standard error of the log of the mean weight and
:math:`\mathrm{se}^2 / 2` its first-order bias :math:`\operatorname{Var}[w] / (2 K E[w]^2)`, so
that the remaining bias is :math:`O(1/K^2)`. The proposal
:math:`r(x \mid y) = \mathcal{N}(\mu_y, c\, \Sigma_y^{\text{post}})` is the exact posterior of the
same Gaussian with its covariance inflated by :math:`c \geq 1`, so that the proposal's tails are
heavier than the target's. By default :math:`c = 1 + \sqrt{2 \ln 2 / D}`: inflating all
:math:`D` directions costs a factor :math:`(c^2 / (2c - 1))^{D/2}` in the weights' second
moment, about 2 with this choice. Under the Gaussian itself, with :math:`c = 1` every weight
equals its evidence. For a nonlinear operator :math:`y = f(x) + e` the proposal is the
Gaussian's linearised (Laplace) posterior (:mod:`diffem.priors.linearize`) and
:math:`p(y \mid x_k)` the exact likelihood with :math:`f(x_k)`, so the estimate stays
consistent; only its variance depends on how well the linearisation fits.

*The reference Gaussian.* In high dimension the weights are only as good as the reference:
the log-weights' spread grows with the reference's distance from the prior, summed over the
dimensions. For a fitted estimator it is the Gaussian moment-matched to
:func:`reference_sample_size` unconditional samples of the fitted prior (the diffusion sampler
draws them with forward passes only), with the empirical covariance
(:func:`moment_matched_gaussian`): :math:`N \geq 64 D` samples keep it within about a nat (KL)
of the prior's moment-matched Gaussian and its small eigenvalues within 25% (up to
:math:`D = 360`; the sample size is capped beyond). Shrinkage
estimators (Ledoit-Wolf) do worse for smooth, image-like priors, whose many small eigenvalues
they lift towards the mean (measured in ``docs/model_selection.md``).

The estimator is consistent: it converges to :math:`\log q(y)` as :math:`K` and the ODE steps
grow (the weights have finite variance when the proposal is heavier-tailed). The standard error
measures the spread of repeated estimates, not the ODE's discretisation error; like every
importance-sampling error estimate, it is itself an underestimate when the weights are
heavy-tailed (a small effective sample size: a poor proposal).

Only observed measurements count in :math:`\log p(y \mid x)` (pinned entries of a mask carry no
information). Noiseless observations make :math:`p(y \mid x)` degenerate; their noise standard
deviation is floored at ``min_noise_std``, i.e. the estimate is that of :math:`y` observed with
that (small) noise.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from sklearn.covariance import empirical_covariance, ledoit_wolf
from torch import Tensor

from diffem.operators import Operator
from diffem.priors import GaussianPrior
from diffem.priors._common import _cholesky

__all__ = [
    "GaussianFlow",
    "importance_log_evidence",
    "moment_matched_gaussian",
    "ode_log_density",
    "reference_sample_size",
]

LOG_2PI = math.log(2 * math.pi)
_COVARIANCE_ENTRIES = 2**25  # 256 MB of float64

Denoiser = Callable[[Tensor, Tensor], Tensor]


class GaussianFlow:
    r"""The probability-flow of :math:`\mathcal{N}(m, C)`, :math:`C = V \operatorname{diag}
    (\lambda) V^\top`, in float64: whitening :math:`w = (C + \sigma^2 I)^{-1/2} (x - m)` in
    the eigenbasis, the diffused log-density, and the pieces of its denoiser the ODE needs."""

    def __init__(self, mean: Tensor, cov: Tensor, device: torch.device | str = "cpu") -> None:
        self.mean = mean.to(dtype=torch.float64, device=device)
        cov = cov.to(dtype=torch.float64, device=device)
        vals, vecs = torch.linalg.eigh(0.5 * (cov + cov.mT))
        self.eigvals, self.eigvecs = vals.clamp_min(0.0), vecs

    @classmethod
    def from_prior(cls, prior: Any, device: torch.device | str = "cpu") -> GaussianFlow:
        """From a :class:`~diffem.priors.GaussianPrior` (full or low-rank)."""
        return cls(prior.mean, prior.cov_matrix, device)

    def scale(self, sigma: float) -> Tensor:
        r""":math:`\sqrt{\lambda + \sigma^2}`, ``(D,)``."""
        return (self.eigvals + sigma**2).sqrt()

    def whiten(self, x: Tensor, sigma: float) -> Tensor:
        """``(B, D)`` points to whitened eigen-coordinates ``(B, D)``."""
        return (x.to(torch.float64) - self.mean) @ self.eigvecs / self.scale(sigma)

    def unwhiten(self, w: Tensor, sigma: float) -> Tensor:
        return self.mean + (w * self.scale(sigma)) @ self.eigvecs.mT

    def log_prob(self, x: Tensor, sigma: float) -> Tensor:
        r""":math:`\log \mathcal{N}(x; m, C + \sigma^2 I)`, ``(B, D) -> (B,)``."""
        w = self.whiten(x, sigma)
        var = self.eigvals + sigma**2
        return -0.5 * ((w**2).sum(-1) + torch.log(var).sum() + x.shape[-1] * LOG_2PI)

    def time_grid(
        self, sigma_min: float, sigma_max: float, steps: int, uniform_share: float = 1 / 3
    ) -> tuple[list[float], list[float]]:
        r"""``steps + 1`` values of :math:`s = \log \sigma` from ``sigma_min`` to ``sigma_max``,
        uniform in the time

        .. math:: \tau(s) \propto (1 - a) \frac1D \sum_j \frac{\sigma^2}{\lambda_j + \sigma^2}
            + a \frac{s}{\log(\sigma_{\max} / \sigma_{\min})}, \qquad \tau \in [0, 1],

        and :math:`\mathrm{d}s / \mathrm{d}\tau` there. The first term is the mean
        shrinkage of the flow, which moves from 0 to 1 where :math:`\sigma^2` crosses the
        eigenvalues: there the flow transports mass and a prior's departure from the Gaussian
        shows (it fades as :math:`\sigma^2` below and :math:`\sigma^{-2}` above); the
        share ``a`` uniform in :math:`\log \sigma` keeps steps everywhere."""
        lo, hi = math.log(sigma_min), math.log(sigma_max)
        span = hi - lo

        def tau(s: Tensor) -> Tensor:
            s2 = torch.exp(2 * s)[:, None]
            shrink = (s2 / (self.eigvals + s2)).mean(-1)
            return (1 - uniform_share) * shrink + uniform_share * (s - lo) / span

        def dtau_ds(s: Tensor) -> Tensor:
            s2 = torch.exp(2 * s)[:, None]
            rate = (2 * s2 * self.eigvals / (self.eigvals + s2) ** 2).mean(-1)
            return (1 - uniform_share) * rate + uniform_share / span

        fine = torch.linspace(lo, hi, 64 * steps + 1, dtype=torch.float64, device=self.mean.device)
        values = tau(fine)
        length = values[-1] - values[0]
        targets = values[0] + length * torch.linspace(
            0, 1, steps + 1, dtype=torch.float64, device=fine.device
        )
        right = torch.searchsorted(values, targets).clamp(1, len(fine) - 1)
        frac = (targets - values[right - 1]) / (values[right] - values[right - 1])
        grid = fine[right - 1] + frac * (fine[right] - fine[right - 1])
        grid[0], grid[-1] = lo, hi
        return grid.tolist(), (length / dtau_ds(grid)).tolist()

    def shrinkage(self, sigma: float) -> Tensor:
        r"""The eigenvalues :math:`\lambda / (\lambda + \sigma^2)` of :math:`P_\sigma`, ``(D,)``."""
        return self.eigvals / (self.eigvals + sigma**2)


def _jacobian_products(
    denoiser: Denoiser, x: Tensor, sigma: Tensor, vectors: Tensor
) -> tuple[Tensor, Tensor]:
    """``D(x, sigma)`` ``(B, D)`` and the vector-Jacobian products ``vectors @ dD/dx``
    ``(P, B, D)`` for ``vectors`` ``(P, B, D)``, batched with ``vmap`` when the denoiser
    supports it."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = denoiser(x, sigma)
        try:
            (grads,) = torch.autograd.grad(out, x, grad_outputs=vectors, is_grads_batched=True)
        except RuntimeError:  # a denoiser that vmap cannot batch: one product at a time
            grads = torch.stack(
                [torch.autograd.grad(out, x, grad_outputs=v, retain_graph=True)[0] for v in vectors]
            )
    return out.detach(), grads.detach()


class _Field(NamedTuple):
    velocity: Tensor  # dw/ds, (B, D), float64
    trace: Tensor  # tr(dD/dx - P_sigma) (or its estimate), (B,), float64
    trace_var: Tensor  # variance of the trace estimate (0 when exact), (B,) or ()


def _field(
    denoiser: Denoiser,
    flow: GaussianFlow,
    w: Tensor,
    log_sigma: float,
    dtype: torch.dtype,
    n_probes: int | None,
    generator: torch.Generator | None,
) -> _Field:
    """The whitened ODE's velocity and the trace correction at ``(w, e^s)``."""
    sigma = math.exp(log_sigma)
    b, d = w.shape
    x = flow.unwhiten(w, sigma).to(dtype)
    sigma_b = torch.full((b,), sigma, dtype=dtype, device=x.device)
    if n_probes is None:
        eye = torch.eye(d, dtype=dtype, device=x.device)
        out, grads = _jacobian_products(denoiser, x, sigma_b, eye[:, None, :].expand(d, b, d))
        trace = grads.diagonal(dim1=0, dim2=2).sum(-1).to(torch.float64)
        trace = trace - flow.shrinkage(sigma).sum()
        trace_var = torch.zeros((), dtype=torch.float64, device=x.device)
    else:
        gen_device = generator.device if generator is not None else x.device
        bits = torch.randint(0, 2, (n_probes, b, d), generator=generator, device=gen_device)
        probes = (2.0 * bits - 1.0).to(dtype=dtype, device=x.device)
        out, grads = _jacobian_products(denoiser, x, sigma_b, probes)
        quad = (grads * probes).sum(-1).to(torch.float64)  # (P, B): e^T J e
        control = ((probes.to(torch.float64) @ flow.eigvecs) ** 2 * flow.shrinkage(sigma)).sum(-1)
        trace = (quad - control).mean(0)
        trace_var = (
            (quad - control).var(0) / n_probes
            if n_probes > 1
            else torch.zeros((), dtype=torch.float64, device=x.device)
        )
    scale = flow.scale(sigma)
    # residual D - D_G in eigen-coordinates; D_G - m = V diag(lambda / scale) w there
    residual = (out.to(torch.float64) - flow.mean) @ flow.eigvecs - flow.eigvals / scale * w
    return _Field(-residual / scale, trace, trace_var)


class LogDensity(NamedTuple):
    """Result of :func:`ode_log_density`, float64 ``(B,)``."""

    value: Tensor  # the log-density estimate
    variance: Tensor  # its variance from the trace estimator (0 with exact traces)


def ode_log_density(
    denoiser: Denoiser,
    x: Tensor,
    flow: GaussianFlow,
    *,
    sigma_min: float,
    sigma_max: float,
    steps: int = 8,
    n_probes: int = 2,
    uniform_share: float = 1 / 3,
    generator: torch.Generator | None = None,
) -> LogDensity:
    r"""Log-density :math:`\log q(x)` of a diffusion prior by the probability-flow ODE,
    solved relative to the Gaussian ``flow`` (see the module docstring).

    Heun's method with ``steps`` uniform steps in the time of :meth:`GaussianFlow.time_grid`
    from ``sigma_min`` to ``sigma_max``: two denoiser evaluations per step, each with
    ``min(D, n_probes)`` vector-Jacobian products. Exact, for any ``steps``, when ``denoiser``
    is the Gaussian of ``flow``.

    Parameters
    ----------
    denoiser : callable ``(x_t (B, D), sigma (B,)) -> E[x | x_t] (B, D)``, differentiable
    x : tensor ``(B, D)``, on the denoiser's device and dtype
    flow : GaussianFlow
        The reference Gaussian, also the terminal density :math:`p_{\sigma_{\max}}`.
    sigma_min, sigma_max : float
        The ends of the integration.
    steps : int
    n_probes : int
        Rademacher probes of Hutchinson's trace estimator (with the Gaussian control
        variate); the trace is exact when ``D <= n_probes`` (it costs no more).
    uniform_share : float
        Share of the time uniform in :math:`\log \sigma` (:meth:`GaussianFlow.time_grid`;
        ``1`` gives steps uniform in :math:`\log \sigma`).
    generator : torch.Generator or None
        Draws the probes.

    Returns
    -------
    LogDensity
        ``value``, unbiased given the trajectory, and ``variance``, the variance of its
        Hutchinson noise estimated from the probes' spread (``n_probes >= 2``; zero with exact
        traces or one probe), both ``(B,)`` float64.
    """
    d = x.shape[1]
    probes = None if d <= n_probes else int(n_probes)
    w = flow.whiten(x, sigma_min)
    w0 = w
    integral = torch.zeros(x.shape[0], dtype=torch.float64, device=w.device)
    variance = torch.zeros_like(integral)
    # Heun's method in tau, uniform steps; d/dtau = (ds/dtau) d/ds
    grid, ds_dtau = flow.time_grid(sigma_min, sigma_max, steps, uniform_share)
    h = 1.0 / steps
    for i in range(steps):
        k1 = _field(denoiser, flow, w, grid[i], x.dtype, probes, generator)
        v1, g1 = ds_dtau[i] * k1.velocity, ds_dtau[i] * k1.trace
        k2 = _field(denoiser, flow, w + h * v1, grid[i + 1], x.dtype, probes, generator)
        v2, g2 = ds_dtau[i + 1] * k2.velocity, ds_dtau[i + 1] * k2.trace
        w = w + 0.5 * h * (v1 + v2)
        integral += 0.5 * h * (g1 + g2)
        variance += (0.5 * h) ** 2 * (
            ds_dtau[i] ** 2 * k1.trace_var + ds_dtau[i + 1] ** 2 * k2.trace_var
        )
    correction = 0.5 * ((w0**2).sum(-1) - (w**2).sum(-1)) - integral
    return LogDensity(flow.log_prob(x, sigma_min) + correction, variance)


def reference_sample_size(d: int) -> int:
    r"""Samples of a prior that :func:`moment_matched_gaussian` needs for a reference Gaussian
    close to the prior's moment-matched Gaussian in dimension ``d``:
    :math:`N = \max(64 D, \lceil D (D + 3) / 4 \rceil)`, clipped to ``[4096, 32768]``.

    The Gaussian fitted to :math:`N \gg D` samples of :math:`\mathcal{N}(m, C)` (sample mean
    and covariance: :math:`D (D + 3) / 2` parameters) is at
    :math:`E[\mathrm{KL}] \approx D (D + 3) / (4 N)` nats from it (half a chi-square with as
    many degrees of freedom, over :math:`N`): at most one nat up to :math:`D = 360`. The
    sample covariance's smallest eigenvalues are low by a factor about
    :math:`(1 - \sqrt{D / N})^2` (Marchenko & Pastur, 1967), which narrows the proposals where
    the prior is thin: :math:`N \geq 64 D` bounds it to 0.77, up to :math:`D = 512`. Beyond
    the cap the reference is :math:`D (D + 3) / 131072` nats away (4.7 for 28x28 images)."""
    return int(min(32768, max(4096, 64 * d, math.ceil(d * (d + 3) / 4))))


def moment_matched_gaussian(X: Tensor) -> GaussianPrior:
    r"""The Gaussian with the mean and covariance of samples ``X`` ``(n, D)``, float64 on the
    CPU: the empirical (maximum-likelihood) covariance when :math:`n \geq 4 D`, else Ledoit-Wolf's
    (shrunk towards a multiple of the identity, so well conditioned for any ``n``; Ledoit &
    Wolf, 2004). Shrinkage is kept for the singular case only: it inflates the small
    eigenvalues of a smooth prior (an image's fine scales), which in high dimension puts an
    importance proposal tens of nats from the posterior."""
    X64 = X.detach().to("cpu", torch.float64)
    n, d = X64.shape
    if n >= 4 * d:
        cov = torch.as_tensor(empirical_covariance(X64.numpy()))
    else:
        cov = torch.as_tensor(ledoit_wolf(X64.numpy())[0])
    return GaussianPrior(X64.mean(0), cov)


def _floor_noise(operator: Operator, min_noise_std: float) -> Operator:
    """A copy of ``operator`` whose noise std is at least ``min_noise_std``."""
    if min_noise_std <= 0 or bool((operator.noise_std >= min_noise_std).all()):
        return operator
    new = copy.copy(operator)
    new.noise_std = operator.noise_std.clamp_min(min_noise_std)
    return new


def _proposals(
    prior: GaussianPrior,
    y: Tensor,
    op: Operator,
    n_samples: int,
    inflation: float,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    r""":math:`x_k \sim r(x \mid y) = \mathcal{N}(\mu_y, c\, \Sigma_y^{\text{post}})`, ``(b, K, D)``
    float64, and :math:`\log r(x_k \mid y)` ``(b, K)``, from ``prior``'s exact posteriors."""
    means, _, covs = prior._posterior_torch(y, op, need_cov=True)
    L = _cholesky(inflation * 0.5 * (covs + covs.mT))
    b, d = means.shape
    gen_device = generator.device if generator is not None else means.device
    z = torch.randn((b, n_samples, d), generator=generator, dtype=torch.float64, device=gen_device)
    z = z.to(means.device)
    x = means[:, None, :] + (L[:, None] @ z.unsqueeze(-1)).squeeze(-1)
    log_det = torch.log(L.diagonal(dim1=-2, dim2=-1)).sum(-1)
    log_r = -0.5 * (z**2).sum(-1) - log_det[:, None] - 0.5 * d * LOG_2PI
    return x, log_r


def _log_likelihood(y: Tensor, op: Operator, x: Tensor) -> Tensor:
    r""":math:`\log \mathcal{N}(y; A x_k, \Sigma_y)` over the observed entries, for ``y``
    ``(b, M)`` and ``x`` ``(b, K, D)``; returns ``(b, K)`` (float64)."""
    b, k, d = x.shape
    rows = torch.arange(b).repeat_interleave(k)
    op_k = op.to(dtype=torch.float64)[rows]
    Ax = op_k.apply(x.reshape(b * k, d))
    var = op_k.noise_var.expand_as(Ax)
    terms = -0.5 * ((op.prepare(y)[rows.to(y.device)] - Ax) ** 2 / var + torch.log(var) + LOG_2PI)
    observed = op_k.observed.expand_as(Ax)
    return torch.where(observed, terms, torch.zeros_like(terms)).sum(-1).reshape(b, k)


class Evidence(NamedTuple):
    """Per-observation results of :func:`importance_log_evidence`, float64 CPU ``(n,)``."""

    log_evidence: Tensor
    std: Tensor  # Monte Carlo standard error of log_evidence
    ess: Tensor  # effective sample size of the weights, 1 to K


def _combine(log_w: Tensor, debias: bool) -> Evidence:
    r"""The estimate :math:`\log \frac1K \sum_k w_k`, its delta-method standard error
    :math:`\sqrt{\hat V / K} / \bar w` (unbiased sample variance :math:`\hat V`) and the
    effective sample size, from the log-weights ``(b, K)``; with ``debias``, plus
    :math:`\mathrm{se}^2 / 2`, the first-order bias of the logarithm."""
    k = log_w.shape[-1]
    w = torch.softmax(log_w, dim=-1)  # w_k / sum w
    ess = 1.0 / (w**2).sum(-1)
    value = torch.logsumexp(log_w, dim=-1) - math.log(k)
    if k < 2:
        return Evidence(value.cpu(), torch.full_like(value, math.inf).cpu(), ess.cpu())
    relative_var = ((k / ess - 1.0) * k / (k - 1)).clamp_min(0.0)  # V / mean(w)^2
    std = (relative_var / k).sqrt()
    if debias:
        value = value + 0.5 * std**2
    return Evidence(value.cpu(), std.cpu(), ess.cpu())


def importance_log_evidence(
    denoiser: Denoiser,
    Y: Tensor,
    operator: Operator,
    proposal: GaussianPrior,
    *,
    n_samples: int = 16,
    inflation: float | None = None,
    debias: bool = True,
    min_noise_std: float = 1e-3,
    sigma_min: float,
    sigma_max: float,
    steps: int = 8,
    n_probes: int = 2,
    batch_size: int = 4096,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Evidence:
    r"""Importance-sampling estimate of :math:`\log q(y_i)` for a diffusion prior.

    See the module docstring for the estimator,

    .. math:: \log q(y) \approx \operatorname{logsumexp}_k \big[\log q(x_k) + \log p(y \mid x_k)
        - \log r(x_k \mid y)\big] - \log K + \tfrac12 \mathrm{se}^2.

    Cost per observation: ``2 * steps * n_samples`` denoiser evaluations, each with
    ``min(D, n_probes)`` vector-Jacobian products, and the proposal's dense ``(D, D)``
    posterior covariance and its Cholesky factor (:math:`O(D^3)`, which dominates beyond a
    thousand dimensions).

    Parameters
    ----------
    denoiser : callable ``(x_t, sigma) -> E[x | x_t]`` on ``device``
    Y : tensor ``(n, M)``
    operator : Operator of batch ``n``
    proposal : :class:`~diffem.priors.GaussianPrior`
        Its exact posteriors, inflated, are the proposals; its flow is the ODE's reference.
    n_samples : int
        ``K``, proposals per observation.
    inflation : float or None
        ``c >= 1``, the proposal covariance inflation. ``None``:
        :math:`c = 1 + \sqrt{2 \ln 2 / D}`, for which, when the target posterior is the
        Gaussian proposal's, the importance weights' second moment
        :math:`(c^2 / (2c - 1))^{D/2} \approx 2` (an effective sample size of about
        ``K / 2``) in any dimension ``D``.
    debias : bool
        Add :math:`\mathrm{se}^2 / 2`, the first-order bias of the log of the mean weight.
    min_noise_std : float
        Floor of the observation noise std (see the module docstring).
    sigma_min, sigma_max : float
        The denoiser's noise schedule.
    steps : int
        Heun steps of the probability-flow ODE.
    n_probes : int
        Rademacher probes of the trace estimator (the trace is exact when ``D <= n_probes``).
    batch_size : int
        Proposals per ODE batch (bounds memory).
    dtype, device
        Of the denoiser's inputs.
    generator : torch.Generator or None
        Draws the proposals and the probes.

    Returns
    -------
    Evidence
        ``log_evidence``, its Monte Carlo standard error ``std`` and the effective sample
        sizes ``ess`` :math:`(\sum_k w_k)^2 / \sum_k w_k^2` of the weights, each ``(n,)``.
    """
    device = torch.device(device)
    op = _floor_noise(operator, min_noise_std)
    prior = proposal.to(device=device)
    flow = GaussianFlow.from_prior(prior, device)
    d = op.n_features
    if inflation is None:
        inflation = 1.0 + math.sqrt(2 * math.log(2) / d)
    if not inflation >= 1.0:
        raise ValueError(f"inflation must be at least 1, got {inflation!r}.")
    # observations per chunk: batch_size proposals, and (D, D) posterior covariances of at
    # most _COVARIANCE_ENTRIES entries in all
    per_chunk = max(1, min(batch_size // n_samples, _COVARIANCE_ENTRIES // (d * d)))
    out: list[Evidence] = []
    for start in range(0, Y.shape[0], per_chunk):
        rows = torch.arange(start, min(Y.shape[0], start + per_chunk))
        op_c = op[rows].to(device=device, dtype=torch.float64)
        y_c = Y[rows].to(device=device, dtype=torch.float64)
        x, log_r = _proposals(prior, y_c, op_c, n_samples, inflation, generator)
        log_lik = _log_likelihood(y_c, op_c, x)
        densities = [
            ode_log_density(
                denoiser,
                part.to(dtype),
                flow,
                sigma_min=sigma_min,
                sigma_max=sigma_max,
                steps=steps,
                n_probes=n_probes,
                generator=generator,
            )
            for part in x.reshape(-1, d).split(batch_size)
        ]
        # exp(log q - Var / 2) is unbiased for q under Gaussian trace noise (log-normal)
        log_q = torch.cat([density.value - 0.5 * density.variance for density in densities])
        out.append(_combine(log_q.reshape(x.shape[:2]) + log_lik - log_r, debias))
    return Evidence(*(torch.cat(parts) for parts in zip(*out, strict=True)))
