r"""Twisted sequential Monte Carlo posterior sampling: Wu, Trippe, Naesseth, Blei & Cunningham
(2023), "Practical and Asymptotically Exact Conditional Sampling in Diffusion Models" (TDS), with
the moment-matching likelihood of MMPS (Rozet et al., 2024) as twisting function and proposal;
see also Cardoso, Janati El Idrissi, Le Corff & Moulines (2024), "Monte Carlo guided diffusion
for Bayesian linear inverse problems" (MCGdiff).
"""

from __future__ import annotations

import math
from dataclasses import KW_ONLY
from typing import Any

import torch
from torch import Tensor

from diffem._validation import check_int, check_number
from diffem.operators.base import Operator
from diffem.samplers.base import Problem, repeat_rows, sampler_class
from diffem.samplers.guidance import Denoiser, Guided, Stats, fallback
from diffem.samplers.mmps import MMPS
from diffem.samplers.solvers import ancestral_coefficients, dpmpp_2m_estimate

__all__ = ["SMC", "systematic_resample"]

_RESAMPLING = ("systematic", "multinomial")
_LOG_2PI = math.log(2 * math.pi)


def systematic_resample(
    weights: Tensor, n_draws: int, generator: torch.Generator | None = None
) -> Tensor:
    r"""Ancestor indices ``(B, n_draws)`` of systematic resampling (Kitagawa, 1996) from the
    normalised weights ``(B, K)``: :math:`a_j = \min\{k : \sum_{i \le k} w_i > (j + U) / S\}`
    with one :math:`U \sim \mathcal{U}(0, 1)` per row."""
    cdf = weights.cumsum(dim=-1)
    cdf = cdf / cdf[:, -1:].clamp_min(torch.finfo(cdf.dtype).tiny)
    offset = torch.rand(
        (weights.shape[0], 1), generator=generator, dtype=weights.dtype, device=weights.device
    )
    grid = (torch.arange(n_draws, dtype=weights.dtype, device=weights.device) + offset) / n_draws
    return torch.searchsorted(cdf, grid).clamp_max(weights.shape[-1] - 1)


def _log_mean_exp(log_weights: Tensor) -> Tensor:
    """``log mean_k exp(log_weights)`` over the particles ``(B, K) -> (B,)``; ``-inf`` for a
    row without a finite weight."""
    finite = torch.where(torch.isfinite(log_weights), log_weights, -torch.inf)
    return torch.logsumexp(finite, dim=-1) - math.log(log_weights.shape[-1])


def _normalise(log_weights: Tensor) -> Tensor:
    """Normalised weights ``(B, K)``; non-finite log-weights get weight 0 and a row without any
    finite one is uniform."""
    finite = torch.isfinite(log_weights)
    log_weights = torch.where(finite, log_weights, -torch.inf)
    log_weights = torch.where(finite.any(-1, keepdim=True), log_weights, 0.0)
    return torch.softmax(log_weights, dim=-1)


@sampler_class
class SMC(MMPS):
    r"""Twisted SMC posterior sampler, asymptotically exact as ``particles`` grows.

    The target is the posterior of the discretised reverse chain of the denoiser (the prior that
    :class:`~diffem.samplers.Unconditional` samples with the same ``steps``, ``eta`` and
    ``solver``), :math:`p_\theta(x_{0:N}) \, p(y \mid x_0)`. ``particles`` :math:`K` particles
    per observation start from :math:`\mathcal{N}(0, \sigma_{\max}^2 I)`; at each level the
    twisting function is MMPS's Gaussian likelihood

    .. math::
        \log \tilde{p}_t(y \mid x_t) = -\tfrac12 (y - A \hat{x})^\top u, \qquad
        (\Sigma_y + A \mathbb{V} A^\top) \, u = y - A \hat{x}, \quad
        \mathbb{V} = \sigma_t^2 J,

    (:class:`~diffem.samplers.guidance.GaussianLikelihood`, ``cg_iter`` CG iterations; its
    log-determinant does not depend on :math:`x_t` for a Gaussian prior and is left out, which
    keeps a valid twisting function), and the proposal is the solver's Gaussian step on MMPS's
    guided denoiser :math:`\hat{x} + \delta`. With the model's step
    :math:`p_\theta(x_s \mid x_t) = \mathcal{N}(c \, x_t + (1 - c) \tilde{m}, \tau^2 I)` and the
    proposal :math:`q(x_s \mid x_t, y) = \mathcal{N}(c \, x_t + (1 - c) \tilde{g}, \tau^2 I)`
    (:mod:`diffem.samplers.solvers`; :math:`\tilde{m}`, :math:`\tilde{g}` the solver's estimates
    from :math:`\hat{x}` and :math:`\hat{x} + \delta`), each particle's weight is multiplied by

    .. math::
        \frac{p_\theta(x_s \mid x_t) \, \tilde{p}_s(y \mid x_s)}
             {q(x_s \mid x_t, y) \, \tilde{p}_t(y \mid x_t)},

    the particles of an observation are resampled (``resampling``) when their effective sample
    size :math:`1 / \sum_k w_k^2` falls below ``ess_threshold * K``, and the last step takes the
    model's :math:`x_0 = \hat{x}(x_{\sigma_{\min}})` with the exact likelihood
    :math:`\mathcal{N}(y \mid A x_0, \Sigma_y)` (:math:`f(x_0)` for a
    :class:`~diffem.operators.Nonlinear` operator) in place of the twisting function (noise
    variances are floored at :math:`\sigma_{\min}^2`, so that noiseless observations keep a
    density). The returned samples are drawn from the final weighted particles. Shapes:
    particles ``(B K, D)``, weights ``(B, K)``.

    Cost: ``K`` times MMPS's (one forward pass with graph and ``cg_iter`` vector-Jacobian
    products per particle and step). Memory: observations are processed in groups of
    ``max(1, batch_size // particles)``, each with its ``K`` particles, so samples depend on
    ``batch_size`` (not on anything else) for a fixed ``generator``.

    SMC is MMPS with particles: it takes MMPS's parameters (``warm_start`` excepted).

    Parameters
    ----------
    steps : int
        Number of noise levels.
    cg_iter : int
        CG iterations of the twisting function and proposal (as in :class:`MMPS`).
    particles : int
        :math:`K`, particles per observation (1: MMPS with importance weights ignored).
    ess_threshold : float in [0, 1]
        Resample when the ESS falls below ``ess_threshold * particles`` (0: never, 1: always).
    resampling : {"systematic", "multinomial"}
        Resampling scheme (systematic has the lower variance).
    covariance, variance_bounds
        As in :class:`~diffem.samplers.MMPS`.
    solver : {"ancestral", "dpmpp_2m"}
        Gaussian steps only (Heun's has no tractable transition density).
    eta : float in (0, 1]
        Must be positive (a deterministic step has no density).
    sigma_data, cg_rtol, sigma_min, sigma_max, batch_size, verbose
        See :class:`~diffem.samplers.mmps.GaussianGuidedSampler` and
        :class:`~diffem.samplers.base.Sampler`. There is no corrector.

    Attributes
    ----------
    ess_ : ndarray of shape (n,)
        Effective sample size of each observation's final weights (1 to ``particles``).
    ess_min_ : ndarray of shape (n,)
        Smallest ESS along the chain, before resampling.
    resamples_ : ndarray of shape (n,)
        Number of resampling events per observation.
    log_evidence_ : ndarray of shape (n,)
        Each observation's log normalising constant, an estimate of the log-evidence
        :math:`\log p_\theta(y)` of the chain's prior: with the particles drawn from
        :math:`\mathcal{N}(0, \sigma_{\max}^2 I)` and weighted by the twisting function there,
        :math:`\log \hat{Z} = \sum_{r} \log \frac1K \sum_k w^{(r)}_k` over the stretches
        between resampling events and the last one (:math:`w^{(r)}_k` the weights accumulated
        since the previous event). :math:`\hat{Z}` is unbiased, so :math:`\log \hat{Z}` is
        consistent as ``particles`` grows and biased low by :math:`O(1/K)` (Del Moral, 2004;
        Naesseth, Lindsten & Schön, 2019, "Elements of Sequential Monte Carlo").
    diagnostics_ : dict of float
        MMPS's (``cg_residual``, ``cg_iterations``, ``cg_safeguarded``, ``clipped``,
        ``fallback``), the means of ``ess``, ``ess_min``, ``resamples`` and ``log_evidence``,
        ``evaluations`` (guided evaluations per particle) and ``wall_time``.
    """

    particles: int = 16
    _: KW_ONLY
    ess_threshold: float = 0.5
    resampling: str = "systematic"

    def _validate(self) -> None:
        super()._validate()
        check_int(self.particles, "particles", 1)
        if self.warm_start:
            raise ValueError("warm_start must be False for SMC (particles are resampled).")
        check_number(self.ess_threshold, "ess_threshold", 0.0, 1.0)
        check_number(self.eta, "eta", 0.0, 1.0, low_open=True)
        if self.solver not in ("ancestral", "dpmpp_2m"):
            raise ValueError(
                f"solver must be 'ancestral' or 'dpmpp_2m' for SMC, got {self.solver!r}."
            )
        if self.resampling not in _RESAMPLING:
            raise ValueError(f"resampling must be one of {_RESAMPLING}, got {self.resampling!r}.")
        if self.corrector_steps != 0:
            raise ValueError(f"corrector_steps must be 0 for SMC, got {self.corrector_steps!r}.")

    # ------------------------------------------------------------------ sampling
    def _draw(
        self, problem: Problem, generator: torch.Generator | None, n_samples: int, stats: Stats
    ) -> Tensor:
        """``n_samples`` draws ``(n, n_samples, D)`` from each observation's final weighted
        particles (correlated when more than the final ESS)."""
        denoiser, Y, operator = problem
        n, K = Y.shape[0], int(self.particles)
        group = max(1, int(self.batch_size) // K)
        draws, ess, ess_min, resamples, log_z = [], [], [], [], []
        for begin in range(0, n, group):
            rows = slice(begin, min(begin + group, n))
            op = operator if len(operator) == 1 else operator[rows]
            out = self._chain(denoiser, Y[rows], op, generator, stats)
            particles, weights = out["particles"], out["weights"]
            index = self._resample(weights, n_samples, generator)
            expanded = index[..., None].expand(-1, -1, particles.shape[-1])
            draws.append(torch.gather(particles, 1, expanded))
            ess.append(1.0 / (weights**2).sum(-1))
            ess_min.append(out["ess_min"])
            resamples.append(out["resamples"])
            log_z.append(out["log_evidence"])
        self.ess_ = torch.cat(ess).cpu().numpy()
        self.ess_min_ = torch.cat(ess_min).cpu().numpy()
        self.resamples_ = torch.cat(resamples).cpu().numpy()
        self.log_evidence_ = torch.cat(log_z).cpu().numpy()
        return torch.cat(draws)

    def _diagnostics(self) -> dict[str, float]:
        return {
            "ess": float(self.ess_.mean()),
            "ess_min": float(self.ess_min_.mean()),
            "resamples": float(self.resamples_.mean()),
            "log_evidence": float(self.log_evidence_.mean()),
        }

    def _resample(self, weights: Tensor, n_draws: int, generator: Any) -> Tensor:
        if self.resampling == "systematic":
            return systematic_resample(weights, n_draws, generator)
        return torch.multinomial(weights, n_draws, replacement=True, generator=generator)

    def _chain(
        self,
        denoiser: Denoiser,
        y: Tensor,
        operator: Operator,
        generator: torch.Generator | None,
        stats: Stats,
    ) -> dict[str, Tensor]:
        """Runs the particle system of ``b`` observations ``y`` ``(b, M)``; returns the final
        particles ``(b, K, D)``, weights ``(b, K)``, ``ess_min`` and ``resamples`` ``(b,)``."""
        b, K, D = y.shape[0], int(self.particles), operator.n_features
        guidance = self.guidance()
        y_rep, op_rep = repeat_rows(y, operator, K)
        levels = self.levels()
        eta = float(self.eta)
        self.evaluations_ = 0

        def evaluate(x: Tensor, sigma: float) -> Guided:
            self.evaluations_ += 1
            s = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
            guided = guidance(denoiser, x, s, None, y_rep, op_rep, stats)
            log_likelihood = guided.log_likelihood
            assert log_likelihood is not None
            return Guided(guided.x_hat, fallback(guided.delta, stats), log_likelihood)

        def randn(shape: tuple[int, ...]) -> Tensor:
            return torch.randn(shape, generator=generator, dtype=y.dtype, device=y.device)

        x = levels[0] * randn((b * K, D))
        current = evaluate(x, levels[0])
        # initial weights: the twisting function at sigma_max (the particles are prior draws)
        log_w = current.log_likelihood.view(b, K).clone()
        log_z = torch.zeros(b, dtype=y.dtype, device=y.device)
        ess_min = torch.full((b,), float(K), dtype=y.dtype, device=y.device)
        resamples = torch.zeros(b, dtype=torch.long, device=y.device)
        # DPM-Solver++(2M) history: the model's and the proposal's previous estimates, and h.
        history: tuple[Tensor, Tensor, float] | None = None
        steps = len(levels) - 1
        for i in self._progress(range(steps - 1), steps - 1):
            sigma_t, sigma_s = levels[i], levels[i + 1]
            coef, tau = ancestral_coefficients(sigma_t, sigma_s, eta)
            model = current.x_hat
            proposal = current.x_hat + current.delta
            if self.solver == "dpmpp_2m":
                h = math.log(sigma_t / sigma_s)
                prev = None if history is None else (history[0], history[2])
                prev_q = None if history is None else (history[1], history[2])
                history = (model, proposal, h)
                model = dpmpp_2m_estimate(model, prev, h)
                proposal = dpmpp_2m_estimate(proposal, prev_q, h)
            z = randn((b * K, D))
            shift = (1.0 - coef) * (proposal - model)  # mean of q minus mean of p_theta
            x = coef * x + (1.0 - coef) * proposal + tau * z
            log_ratio = -(z * shift).sum(-1) / tau - (shift**2).sum(-1) / (2.0 * tau**2)
            nxt = evaluate(x, sigma_s)
            log_w = log_w + (log_ratio + nxt.log_likelihood - current.log_likelihood).view(b, K)
            current = nxt
            weights = _normalise(log_w)
            ess = 1.0 / (weights**2).sum(-1)
            ess_min = torch.minimum(ess_min, ess)
            resample = ess < float(self.ess_threshold) * K
            if bool(resample.any()):
                index = torch.arange(K, device=y.device).expand(b, K).clone()
                index[resample] = self._resample(weights[resample], K, generator)
                flat = (index + K * torch.arange(b, device=y.device)[:, None]).flatten()
                x = x[flat]
                current = Guided(*(None if t is None else t[flat] for t in current))
                if history is not None:
                    history = (history[0][flat], history[1][flat], history[2])
                log_z = log_z + torch.where(resample, _log_mean_exp(log_w), 0.0)
                log_w = torch.where(resample[:, None], 0.0, log_w)
                resamples = resamples + resample.long()
        # Last step: the model's x_0 = x_hat at sigma_min, weighted by the exact likelihood.
        x0 = current.x_hat
        var = torch.as_tensor(op_rep.noise_var, dtype=y.dtype, device=y.device)
        var = var.clamp_min(float(self.sigma_min) ** 2)
        residual = y_rep - op_rep.apply(x0)
        terms = -0.5 * (residual**2 / var + torch.log(var).expand_as(residual) + _LOG_2PI)
        observed = torch.as_tensor(op_rep.observed, device=y.device).expand_as(residual)
        exact = torch.where(observed, terms, 0.0).sum(-1)
        log_w = log_w + (exact - current.log_likelihood).view(b, K)
        log_z = log_z + _log_mean_exp(log_w)
        return {
            "particles": x0.view(b, K, D),
            "weights": _normalise(log_w),
            "ess_min": ess_min,
            "resamples": resamples,
            "log_evidence": log_z,
        }
