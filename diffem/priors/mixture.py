r"""Gaussian mixture prior :math:`p(x) = \sum_k w_k \mathcal{N}(x; \mu_k, C_k)`.

Denoiser of :math:`x_t = x + \sigma z`: with responsibilities
:math:`r_k(x_t) \propto w_k \mathcal{N}(x_t; \mu_k, C_k + \sigma^2 I)` and the per-component
Gaussian posteriors :math:`m_k = \mu_k + C_k (C_k + \sigma^2 I)^{-1} (x_t - \mu_k)`,
:math:`V_k = (C_k^{-1} + \sigma^{-2} I)^{-1}`,

.. math::
    E[x \mid x_t] = \sum_k r_k m_k, \qquad
    \operatorname{Cov}[x \mid x_t] = \sum_k r_k \big(V_k + (m_k - m)(m_k - m)^\top\big)

(law of total covariance). Given observations :math:`y = A x + e`, the posterior is again a
mixture, with weights :math:`\propto w_k \mathcal{N}(y; A\mu_k, A C_k A^\top + \Sigma_y)` and the
components conditioned exactly; samples pick a component, then apply Matheron's rule within it
(Wilson et al., 2020).

Covariances may be full ``(K, D, D)``, diagonal ``(K, D)`` or isotropic ``(K,)``; the latter two
use elementwise formulas (no eigendecomposition).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffem._validation import as_float_tensor, check_finite
from diffem.operators.base import Operator
from diffem.priors._common import (
    Covariance,
    DiagCovariance,
    FullCovariance,
    Observations,
    ObservationSet,
    as_sigma,
    check_x_t,
    condition,
    matheron,
    rand,
    to_numpy,
)
from diffem.priors.base import AnalyticPrior
from diffem.priors.gaussian import _cached_eig, _check_psd_eig

__all__ = ["GaussianMixturePrior"]


class GaussianMixturePrior(AnalyticPrior):
    r"""Gaussian mixture prior :math:`\sum_k w_k \mathcal{N}(\mu_k, C_k)` with exact posteriors.

    Parameters
    ----------
    weights : array of shape ``(K,)``
        Non-negative, summing to 1.
    means : array of shape ``(K, D)``
    covs : array of shape ``(K, D, D)`` (full), ``(K, D)`` (diagonal) or ``(K,)`` (isotropic)

    Notes
    -----
    Parameters are stored in ``dtype`` (float32 for NumPy input); exact computations run in
    float64 and user-facing methods return NumPy arrays of ``dtype``. The denoiser
    ``prior(x_t, sigma)`` and :meth:`cov` work in ``x_t``'s dtype and are differentiable.
    """

    _parameters = ("weights", "means", "covs")

    def __init__(self, weights: Any, means: Any, covs: Any) -> None:
        means_t = as_float_tensor(means, "means")
        if means_t.ndim != 2 or 0 in means_t.shape:
            raise ValueError(f"means must have shape (K, D), got {tuple(means_t.shape)}.")
        k, d = means_t.shape
        weights_t = as_float_tensor(weights, "weights", dtype=means_t.dtype, device=means_t.device)
        if weights_t.shape != (k,):
            raise ValueError(
                f"weights must have shape (K,) = ({k},), got {tuple(weights_t.shape)}."
            )
        covs_t = as_float_tensor(covs, "covs", dtype=means_t.dtype, device=means_t.device)
        for value, name in ((weights_t, "weights"), (means_t, "means"), (covs_t, "covs")):
            check_finite(value, name)
        if (weights_t < 0).any():
            raise ValueError("weights must be non-negative.")
        total = float(weights_t.sum())
        if abs(total - 1.0) > 1e-4:
            raise ValueError(f"weights must sum to 1, got a sum of {total:.6g}.")
        if covs_t.shape == (k, d, d):
            cov_type = "full"
            self._cache: dict[Any, Any] = {
                "eig64": _check_psd_eig(covs_t.to(torch.float64), name="covs", dtype=covs_t.dtype)
            }
        elif covs_t.shape == (k, d):
            cov_type = "diag"
        elif covs_t.shape == (k,):
            cov_type = "spherical"
        else:
            raise ValueError(
                f"covs must have shape (K, D, D) = ({k}, {d}, {d}), (K, D) = ({k}, {d}) or "
                f"(K,) = ({k},); got {tuple(covs_t.shape)}."
            )
        if cov_type != "full":
            if (covs_t < 0).any():
                raise ValueError("covs must be non-negative (variances).")
            self._cache = {}
        self.weights = weights_t / weights_t.sum()
        self.means = means_t
        self.covs = covs_t
        self.cov_type = cov_type

    # ------------------------------------------------------------------ properties
    @property
    def n_features(self) -> int:
        """``D``."""
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        """``K``."""
        return self.means.shape[0]

    @property
    def cov_matrices(self) -> Tensor:
        """Dense covariances, shape ``(K, D, D)``."""
        if self.cov_type == "full":
            return self.covs
        diag = self._diag(self.dtype, self.device).expand(-1, self.n_features)
        return torch.diag_embed(diag)

    def __repr__(self) -> str:
        return (
            f"GaussianMixturePrior(n_components={self.n_components}, "
            f"n_features={self.n_features}, cov_type={self.cov_type!r}, dtype={self.dtype})"
        )

    # ------------------------------------------------------------------ caches
    def _eig(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """Eigenvalues ``(K, D)`` and eigenvectors ``(K, D, D)`` of full covariances."""
        return _cached_eig(self._cache, self.covs, "covs", dtype, device)

    def _diag(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Variances ``(K, D)`` (diagonal) or ``(K, 1)`` (isotropic)."""
        covs = self.covs.to(dtype=dtype, device=device)
        return covs if self.cov_type == "diag" else covs.unsqueeze(-1)

    def _components_f64(self) -> list[tuple[Tensor, Covariance]]:
        if "f64" not in self._cache:
            means = self.means.to(torch.float64)
            comps: list[tuple[Tensor, Covariance]] = []
            if self.cov_type == "full":
                vals, vecs = self._eig(torch.float64, self.device)
                covs = self.covs.to(torch.float64)
                covs = 0.5 * (covs + covs.mT)
                for k in range(self.n_components):
                    comps.append((means[k], FullCovariance(covs[k], vals[k], vecs[k])))
            else:
                diag = self._diag(torch.float64, self.device).expand(-1, self.n_features)
                for k in range(self.n_components):
                    comps.append((means[k], DiagCovariance(diag[k])))
            self._cache["f64"] = comps
        return self._cache["f64"]

    # ------------------------------------------------------------------ denoiser
    def _denoise(self, x_t: Tensor, sigma: Any) -> tuple[Tensor, Tensor, Tensor]:
        """Responsibilities ``(B, K)``, component means ``(B, K, D)`` and component posterior
        variances (``(B, K, D)`` eigen-/elementwise weights)."""
        x_t = check_x_t(x_t, self.n_features)
        sigma = as_sigma(sigma, x_t)
        dtype, device = x_t.dtype, x_t.device
        means = self.means.to(dtype=dtype, device=device)
        log_w = torch.log(self.weights.to(dtype=dtype, device=device))
        s2 = sigma.pow(2)[:, None, None]  # (B, 1, 1)
        diff = x_t.unsqueeze(1) - means  # (B, K, D)
        if self.cov_type == "full":
            vals, vecs = self._eig(dtype, device)  # (K, D), (K, D, D)
            z = torch.einsum("bkd,kde->bke", diff, vecs)
            total = vals + s2  # (B, K, D)
            shrink = vals / total
            comp_means = means + torch.einsum("bke,kde->bkd", shrink * z, vecs)
        else:
            var = self._diag(dtype, device)  # (K, D | 1)
            total = var + s2
            shrink = var / total
            z = diff
            comp_means = means + shrink * diff
            if self.cov_type == "spherical":
                total = total.expand(-1, -1, self.n_features)
        log_p = -0.5 * ((z**2) / total + torch.log(total)).sum(-1)
        logits = log_w + log_p
        resp = torch.softmax(logits, dim=-1)
        post_var = shrink * s2  # (B, K, D | 1): lambda s^2 / (lambda + s^2)
        return resp, comp_means, post_var

    def __call__(self, x_t: Tensor, sigma: Any) -> Tensor:
        r""":math:`E[x \mid x_t] = \sum_k r_k(x_t) m_k(x_t)`; ``(B, D) -> (B, D)``.

        Isotropic covariances :math:`C_k = c_k I` (any ``sigma``) and diagonal ones (one noise
        level shared by the batch) use matrix products and never form a ``(B, K, D)`` tensor:
        with :math:`T_k = C_k + \sigma^2 I`,

        .. math::
            \log r_k = \log w_k - \tfrac12 \big(x_t^\top T_k^{-1} x_t - 2 x_t^\top T_k^{-1}
            \mu_k + \mu_k^\top T_k^{-1} \mu_k + \log\det T_k\big) + \text{const}, \qquad
            E[x \mid x_t] = \Big(\sum_k r_k C_k T_k^{-1}\Big) x_t
            + \sigma^2 \sum_k r_k T_k^{-1} \mu_k,

        an :math:`O(BKD)` computation in two ``(B, D) x (D, K)`` products. Coordinates are
        centred on the mean of the :math:`\mu_k` first, which keeps the rounding of the
        expanded squares small. Full covariances use the eigenbasis of each component.
        """
        if self.cov_type == "spherical":
            return self._denoise_spherical(x_t, sigma)
        if self.cov_type == "diag":
            x_t = check_x_t(x_t, self.n_features)
            sigma = as_sigma(sigma, x_t)
            if bool((sigma == sigma[:1]).all()):
                return self._denoise_diag(x_t, sigma[:1])
        resp, comp_means, _ = self._denoise(x_t, sigma)
        return (resp.unsqueeze(-1) * comp_means).sum(1)

    def _centred(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Centre ``(D,)``, centred means ``(K, D)`` and log-weights ``(K,)`` in ``dtype``."""
        key = ("centred", dtype, str(device))
        if key not in self._cache:
            means = self.means.to(torch.float64)
            centre = means.mean(0)
            self._cache[key] = (
                centre.to(dtype=dtype, device=device),
                (means - centre).to(dtype=dtype, device=device),
                torch.log(self.weights.to(torch.float64)).to(dtype=dtype, device=device),
            )
        return self._cache[key]

    def _denoise_spherical(self, x_t: Tensor, sigma: Any) -> Tensor:
        """Matrix-product denoiser for isotropic covariances ``c_k I``."""
        x_t = check_x_t(x_t, self.n_features)
        sigma = as_sigma(sigma, x_t)
        dtype, device = x_t.dtype, x_t.device
        centre, means, log_w = self._centred(dtype, device)
        var = self.covs.to(dtype=dtype, device=device)  # (K,)
        d = self.n_features
        s2 = sigma.pow(2).unsqueeze(-1)  # (B, 1)
        total = var + s2  # (B, K)
        x = x_t - centre
        sq_x = (x * x).sum(-1, keepdim=True)  # (B, 1)
        sq_mu = (means * means).sum(-1)  # (K,)
        sq_dist = (sq_x - 2.0 * (x @ means.T) + sq_mu).clamp_min(0.0)  # (B, K)
        logits = log_w - 0.5 * (sq_dist / total + d * torch.log(total))
        resp = torch.softmax(logits, dim=-1)  # (B, K)
        gain = (resp * (var / total)).sum(-1, keepdim=True)  # (B, 1)
        return centre + gain * x + s2 * ((resp / total) @ means)

    def _denoise_diag(self, x_t: Tensor, sigma: Tensor) -> Tensor:
        """Matrix-product denoiser for diagonal covariances and one noise level ``(1,)``."""
        dtype, device = x_t.dtype, x_t.device
        centre, means, log_w = self._centred(dtype, device)
        var = self.covs.to(dtype=dtype, device=device)  # (K, D)
        s2 = sigma.pow(2)  # (1,)
        inv = 1.0 / (var + s2)  # (K, D)
        x = x_t - centre
        scaled = means * inv  # (K, D)
        quad = (x * x) @ inv.T - 2.0 * (x @ scaled.T) + (means * scaled).sum(-1)  # (B, K)
        logits = log_w - 0.5 * (quad.clamp_min(0.0) - torch.log(inv).sum(-1))
        resp = torch.softmax(logits, dim=-1)  # (B, K)
        return centre + (resp @ (var * inv)) * x + s2 * (resp @ scaled)

    def cov(self, x_t: Tensor, sigma: Any) -> Tensor:
        r"""Exact :math:`\operatorname{Cov}[x \mid x_t]` (law of total covariance).

        Shape ``(B, D, D)``.
        """
        resp, comp_means, post_var = self._denoise(x_t, sigma)
        mean = (resp.unsqueeze(-1) * comp_means).sum(1)
        dev = resp.sqrt().unsqueeze(-1) * (comp_means - mean.unsqueeze(1))  # (B, K, D)
        out = dev.mT @ dev
        if self.cov_type == "full":
            _, vecs = self._eig(x_t.dtype, x_t.device)
            for k in range(self.n_components):
                weights = resp[:, k, None] * post_var[:, k]  # (B, D)
                out = out + (vecs[k] * weights.unsqueeze(-2)) @ vecs[k].mT
        else:
            diag = (resp.unsqueeze(-1) * post_var.expand(-1, -1, self.n_features)).sum(1)
            out = out + torch.diag_embed(diag)
        return out

    # ------------------------------------------------------------------ sampling
    def _sample_torch(self, n_samples: int = 1, generator: Any = None) -> Tensor:
        """Prior samples ``(n_samples, D)`` in ``dtype``."""
        n_samples, gen = self._sampling_args(n_samples, generator)
        weights = self.weights.to(torch.float64)
        labels = _categorical(weights.expand(n_samples, -1), gen)
        out = torch.empty(n_samples, self.n_features, dtype=torch.float64, device=self.device)
        for k, (mean, cov) in enumerate(self._components_f64()):
            idx = torch.nonzero(labels == k).flatten()
            if idx.numel():
                out[idx] = mean + cov.sample(idx.numel(), gen, self.device)
        return out.to(self.dtype)

    # ------------------------------------------------------------------ posteriors
    def _chunks(self, obs: ObservationSet, extra: int = 0):
        return obs.chunks(factor=2 * self.n_components + 2 + extra)

    def _posterior_terms(self, part: Observations):
        comps = self._components_f64()
        conds = [condition(mean, cov, part) for mean, cov in comps]
        log_w = torch.log(self.weights.to(torch.float64))
        logits = torch.stack([c.log_evidence for c in conds], -1) + log_w  # (b, K)
        return comps, conds, logits

    def _posterior_torch(self, Y: Any, operator: Operator) -> tuple[Tensor, Tensor, Tensor]:
        """Float64 posterior means ``(n, D)``, log-evidences ``(n,)`` and posterior component
        weights ``(n, K)``."""
        obs = self._observations(Y, operator)
        means, logevs, weights = [], [], []
        for part in self._chunks(obs):
            comps, conds, logits = self._posterior_terms(part)
            post_w = torch.softmax(logits, -1)
            comp_means = torch.stack(
                [mean + c.mean_shift() for (mean, _), c in zip(comps, conds, strict=True)], 1
            )
            means.append((post_w.unsqueeze(-1) * comp_means).sum(1))
            logevs.append(torch.logsumexp(logits, -1))
            weights.append(post_w)
        return torch.cat(means), torch.cat(logevs), torch.cat(weights)

    def _sample_posterior_torch(
        self, Y: Any, operator: Operator, n_samples: int = 1, generator: Any = None
    ) -> Tensor:
        """Exact posterior samples ``(n, n_samples, D)`` in ``dtype``."""
        n_samples, gen = self._sampling_args(n_samples, generator)
        obs = self._observations(Y, operator)
        out = []
        for part in self._chunks(obs, extra=n_samples):
            comps, conds, logits = self._posterior_terms(part)
            b = len(part)
            post_w = torch.softmax(logits, -1).repeat_interleave(n_samples, 0)  # (b*s, K)
            labels = _categorical(post_w, gen)
            rows = torch.arange(b, device=self.device).repeat_interleave(n_samples)
            draws = torch.empty(
                b * n_samples, self.n_features, dtype=torch.float64, device=self.device
            )
            for k, ((mean, cov), cond) in enumerate(zip(comps, conds, strict=True)):
                idx = torch.nonzero(labels == k).flatten()
                if idx.numel():
                    draws[idx] = matheron(mean, cov, cond, part, rows[idx], gen)
            out.append(draws.reshape(b, n_samples, -1).to(self.dtype))
        return torch.cat(out)

    def posterior_weights(self, Y: Any, operator: Operator):
        r"""Posterior component probabilities :math:`p(k \mid y_i)`, NumPy ``(n, K)``."""
        return to_numpy(self._posterior_torch(Y, operator)[2], self.dtype)


def _categorical(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One draw per row of ``probs`` ``(B, K)``, by inverse CDF on uniforms."""
    # torch.multinomial(probs, 1) draws the same, 4 to 7 times slower on a CPU thread: 127 ms
    # against 32 ms for 10^6 rows of 3 classes, 46 ms against 7 ms for 10^5 rows of 16.
    u = rand((probs.shape[0], 1), generator, probs.dtype, probs.device)
    cdf = probs.cumsum(-1)
    cdf = cdf / cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp_max(probs.shape[1] - 1)
