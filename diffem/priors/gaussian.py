r"""Gaussian prior :math:`x \sim \mathcal{N}(\mu, C)`: exact posteriors, evidences and denoiser.

With a full covariance :math:`C = U \operatorname{diag}(\lambda) U^\top` (eigendecomposition,
computed once in float64 and cached per dtype and device), the denoiser of the
variance-exploding process :math:`x_t = x + \sigma z` is

.. math::
    E[x \mid x_t] = \mu + U \operatorname{diag}\Big(\frac{\lambda}{\lambda + \sigma^2}\Big)
    U^\top (x_t - \mu), \qquad
    \operatorname{Cov}[x \mid x_t] = U \operatorname{diag}\Big(\frac{\lambda \sigma^2}
    {\lambda + \sigma^2}\Big) U^\top = (C^{-1} + \sigma^{-2} I)^{-1},

whose weights lie in :math:`[0, 1]` and :math:`[0, \min(\lambda, \sigma^2)]`, so it is stable
for any :math:`\sigma` in float32 as in float64. With a low-rank-plus-diagonal covariance
:math:`C = F F^\top + \operatorname{diag}(d)` (:meth:`GaussianPrior.low_rank`), the Woodbury
identity with :math:`D_\sigma = \operatorname{diag}(d + \sigma^2)` and
:math:`K_\sigma = I_r + F^\top D_\sigma^{-1} F` gives, at :math:`O(D r^2)` cost,

.. math::
    E[x \mid x_t] = \mu + \frac{d}{d + \sigma^2} \odot v
        + \sigma^2 D_\sigma^{-1} F K_\sigma^{-1} F^\top D_\sigma^{-1} v, \quad v = x_t - \mu,

.. math::
    \operatorname{Cov}[x \mid x_t] = \operatorname{diag}\Big(\frac{\sigma^2 d}{d + \sigma^2}\Big)
        + \sigma^4 D_\sigma^{-1} F K_\sigma^{-1} F^\top D_\sigma^{-1}.

Posterior quantities given observations :math:`y = A x + e` are computed exactly in measurement
space (see :mod:`diffem.priors._common`), with Matheron's rule for sampling (Wilson et al.,
2020).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffem._validation import as_float_tensor, check_finite
from diffem.operators.base import Operator
from diffem.priors._common import (
    Covariance,
    FullCovariance,
    LowRankCovariance,
    as_sigma,
    check_x_t,
    condition,
    matheron,
)
from diffem.priors.base import AnalyticPrior

__all__ = ["GaussianPrior"]


def _check_psd_eig(
    cov64: Tensor, name: str, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """Symmetry and PSD checks of float64 ``(..., D, D)`` matrices given in ``dtype``; returns
    their eigendecomposition with eigenvalues clamped at 0."""
    scale = cov64.abs().max().clamp_min(1e-300)
    sym_tol = max(1e-6, 100 * torch.finfo(dtype).eps) * float(scale)
    if not torch.allclose(cov64, cov64.mT, rtol=0.0, atol=sym_tol):
        raise ValueError(f"{name} must be symmetric.")
    cov64 = 0.5 * (cov64 + cov64.mT)
    eigvals, eigvecs = torch.linalg.eigh(cov64)
    rel = max(1e-10, 10 * cov64.shape[-1] * torch.finfo(dtype).eps)
    tol = rel * eigvals.abs().amax(-1, keepdim=True).clamp_min(1e-300)
    if (eigvals < -tol).any():
        raise ValueError(
            f"{name} must be positive semi-definite; its smallest eigenvalue is "
            f"{eigvals.min().item():.3g}."
        )
    return eigvals.clamp_min(0.0), eigvecs


def _cached_eig(
    cache: dict[Any, Any], matrix: Tensor, name: str, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of the symmetric ``(..., D, D)`` ``matrix``: computed (and checked
    PSD) once in float64 under ``cache["eig64"]``, then cast and cached per dtype and device."""
    if "eig64" not in cache:
        cache["eig64"] = _check_psd_eig(matrix.to(torch.float64), name, matrix.dtype)
    key = ("eig", dtype, str(device))
    if key not in cache:
        vals, vecs = cache["eig64"]
        cache[key] = (vals.to(dtype=dtype, device=device), vecs.to(dtype=dtype, device=device))
    return cache[key]


class GaussianPrior(AnalyticPrior):
    r"""Gaussian prior :math:`p(x) = \mathcal{N}(x; \mu, C)` with exact posteriors.

    It is the EM initialisation of Rozet et al. (2024) and the ground truth that posterior
    samplers are tested against: it is a denoiser (``prior(x_t, sigma) -> E[x | x_t]``, with
    :meth:`cov` giving the exact :math:`\operatorname{Cov}[x \mid x_t]`).

    Parameters
    ----------
    mean : array of shape ``(D,)``
    cov : array of shape ``(D, D)``
        Symmetric positive semi-definite covariance.

    Notes
    -----
    Parameters are stored in ``dtype`` (float32 for NumPy input, the tensor's dtype for torch
    input); exact computations (posteriors, evidences) run in float64 and user-facing methods
    return NumPy arrays of ``dtype``. Use :meth:`low_rank` for
    :math:`C = F F^\top + \operatorname{diag}(d)` at large ``D``.
    """

    _parameters = ("mean", "covariance", "factor", "diag")

    def __init__(self, mean: Any, cov: Any) -> None:
        mean_t = as_float_tensor(mean, "mean")
        if mean_t.ndim != 1 or mean_t.shape[0] == 0:
            raise ValueError(f"mean must have shape (D,), got {tuple(mean_t.shape)}.")
        d = mean_t.shape[0]
        cov_t = as_float_tensor(cov, "cov", device=mean_t.device)
        if cov_t.shape != (d, d):
            raise ValueError(f"cov must have shape (D, D) = ({d}, {d}), got {tuple(cov_t.shape)}.")
        check_finite(mean_t, "mean")
        check_finite(cov_t, "cov")
        self.mean = mean_t
        self.covariance = cov_t.to(mean_t.dtype)
        self.factor: Tensor | None = None
        self.diag: Tensor | None = None
        self._cache: dict[Any, Any] = {}
        eigvals, eigvecs = _check_psd_eig(
            self.covariance.to(torch.float64), "cov", self.covariance.dtype
        )
        self._cache["eig64"] = (eigvals, eigvecs)

    @classmethod
    def low_rank(cls, mean: Any, factor: Any, diag: Any) -> GaussianPrior:
        r"""The prior :math:`\mathcal{N}(\mu, F F^\top + \operatorname{diag}(d))`.

        Parameters
        ----------
        mean : array of shape ``(D,)``
        factor : array of shape ``(D, r)``
        diag : array of shape ``(D,)``, non-negative (positive is recommended: a small ridge
            keeps the Woodbury identity well conditioned)
        """
        mean_t = as_float_tensor(mean, "mean")
        if mean_t.ndim != 1 or mean_t.shape[0] == 0:
            raise ValueError(f"mean must have shape (D,), got {tuple(mean_t.shape)}.")
        d = mean_t.shape[0]
        factor_t = as_float_tensor(factor, "factor", dtype=mean_t.dtype, device=mean_t.device)
        if factor_t.ndim == 1:
            factor_t = factor_t.unsqueeze(-1)
        if factor_t.ndim != 2 or factor_t.shape[0] != d:
            raise ValueError(
                f"factor must have shape (D, r) = ({d}, r), got {tuple(factor_t.shape)}."
            )
        diag_t = as_float_tensor(diag, "diag", dtype=mean_t.dtype, device=mean_t.device)
        if diag_t.ndim == 0:
            diag_t = diag_t.expand(d).clone()
        if diag_t.shape != (d,):
            raise ValueError(f"diag must have shape (D,) = ({d},), got {tuple(diag_t.shape)}.")
        for value, name in ((mean_t, "mean"), (factor_t, "factor"), (diag_t, "diag")):
            check_finite(value, name)
        if (diag_t < 0).any():
            raise ValueError(f"diag must be non-negative; its minimum is {diag_t.min().item():g}.")
        self = cls.__new__(cls)
        self.mean = mean_t
        self.covariance = None
        self.factor = factor_t
        self.diag = diag_t
        self._cache = {}
        return self

    # ------------------------------------------------------------------ properties
    @property
    def n_features(self) -> int:
        """``D``."""
        return self.mean.shape[0]

    @property
    def rank(self) -> int | None:
        """``r`` for a low-rank-plus-diagonal prior, ``None`` for a full covariance."""
        return None if self.factor is None else self.factor.shape[1]

    @property
    def cov_matrix(self) -> Tensor:
        """The dense covariance :math:`C`, shape ``(D, D)``, in ``dtype``."""
        if self.covariance is not None:
            return self.covariance
        return self.factor @ self.factor.mT + torch.diag(self.diag)

    def __repr__(self) -> str:
        kind = "full" if self.factor is None else f"low_rank(r={self.rank})"
        return f"GaussianPrior(n_features={self.n_features}, cov={kind}, dtype={self.dtype})"

    # ------------------------------------------------------------------ caches
    def _eig(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """Eigenvalues ``(D,)`` and eigenvectors ``(D, D)`` of the full covariance."""
        return _cached_eig(self._cache, self.covariance, "cov", dtype, device)

    def _f64(self) -> tuple[Tensor, Covariance]:
        """Float64 mean and covariance structure for exact computations."""
        if "f64" not in self._cache:
            mean = self.mean.to(torch.float64)
            if self.factor is None:
                vals, vecs = self._eig(torch.float64, self.device)
                full = self.covariance.to(torch.float64)
                cov: Covariance = FullCovariance(0.5 * (full + full.mT), vals, vecs)
            else:
                cov = LowRankCovariance(self.factor.to(torch.float64), self.diag.to(torch.float64))
            self._cache["f64"] = (mean, cov)
        return self._cache["f64"]

    def _lowrank_terms(self, x_t: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Float64 Woodbury pieces: ``d/(d+s^2)``, ``G = D_s^{-1} F`` and ``K_s^{-1}``."""
        F = self.factor.to(torch.float64)
        d = self.diag.to(torch.float64)
        s2 = sigma.to(torch.float64).pow(2)
        if bool((s2 == s2[0]).all()):
            s2 = s2[:1]
        Ds = d + s2.unsqueeze(-1)  # (b | 1, D)
        G = F / Ds.unsqueeze(-1)  # (b | 1, D, r)
        K = torch.eye(F.shape[1], dtype=F.dtype, device=F.device) + F.mT @ G
        K_inv = torch.cholesky_inverse(torch.linalg.cholesky(K))
        return d / Ds, G, K_inv, s2

    # ------------------------------------------------------------------ denoiser
    def __call__(self, x_t: Tensor, sigma: Any) -> Tensor:
        r""":math:`E[x \mid x_t]` for :math:`x_t = x + \sigma z`; ``(B, D) -> (B, D)``.

        Differentiable in ``x_t``; computed in ``x_t``'s dtype (float64 internally for the
        low-rank form).
        """
        x_t = check_x_t(x_t, self.n_features)
        sigma = as_sigma(sigma, x_t)
        if self.factor is None:
            vals, vecs = self._eig(x_t.dtype, x_t.device)
            mean = self.mean.to(dtype=x_t.dtype, device=x_t.device)
            s2 = sigma.pow(2).unsqueeze(-1)
            shrink = vals / (vals + s2)  # (B, D)
            return mean + ((x_t - mean) @ vecs * shrink) @ vecs.mT
        ratio, G, K_inv, s2 = self._lowrank_terms(x_t, sigma)
        mean = self.mean.to(dtype=torch.float64, device=x_t.device)
        v = x_t.to(torch.float64) - mean
        Gv = G.mT @ v.unsqueeze(-1)  # (B, r, 1)
        out = mean + ratio * v + s2.unsqueeze(-1) * (G @ (K_inv @ Gv)).squeeze(-1)
        return out.to(x_t.dtype)

    def cov(self, x_t: Tensor, sigma: Any) -> Tensor:
        r"""Exact :math:`\operatorname{Cov}[x \mid x_t] = (C^{-1} + \sigma^{-2} I)^{-1}`,
        shape ``(B, D, D)`` (independent of ``x_t`` for a Gaussian prior)."""
        x_t = check_x_t(x_t, self.n_features)
        sigma = as_sigma(sigma, x_t)
        if self.factor is None:
            vals, vecs = self._eig(x_t.dtype, x_t.device)
            s2 = sigma.pow(2).unsqueeze(-1)
            weights = vals * (s2 / (vals + s2))  # (B, D)
            return (vecs * weights.unsqueeze(-2)) @ vecs.mT
        ratio, G, K_inv, s2 = self._lowrank_terms(x_t, sigma)
        s2 = s2.reshape(-1, 1, 1)
        out = torch.diag_embed(s2.squeeze(-1) * ratio) + s2**2 * (G @ K_inv @ G.mT)
        return out.expand(x_t.shape[0], -1, -1).to(x_t.dtype)

    # ------------------------------------------------------------------ sampling
    def _sample_torch(self, n_samples: int = 1, generator: Any = None) -> Tensor:
        """Prior samples ``(n_samples, D)`` in ``dtype``."""
        n_samples, gen = self._sampling_args(n_samples, generator)
        mean, cov = self._f64()
        return (mean + cov.sample(n_samples, gen, self.device)).to(self.dtype)

    # ------------------------------------------------------------------ posteriors
    def _posterior_torch(
        self, Y: Any, operator: Operator, *, need_cov: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Float64 posterior means ``(n, D)``, log-evidences ``(n,)`` and, with ``need_cov``,
        posterior covariances ``(n, D, D)``."""
        obs = self._observations(Y, operator)
        mean, cov = self._f64()
        means, logevs, covs = [], [], []
        for part in obs.chunks(factor=3):
            cond = condition(mean, cov, part)
            means.append(mean + cond.mean_shift())
            logevs.append(cond.log_evidence)
            if need_cov:
                covs.append(cov.dense() - cond.cov_reduction())
        covariances = torch.cat(covs) if need_cov else None
        return torch.cat(means), torch.cat(logevs), covariances

    def _sample_posterior_torch(
        self, Y: Any, operator: Operator, n_samples: int = 1, generator: Any = None
    ) -> Tensor:
        """Exact posterior samples ``(n, n_samples, D)`` in ``dtype`` (Matheron's rule)."""
        n_samples, gen = self._sampling_args(n_samples, generator)
        obs = self._observations(Y, operator)
        mean, cov = self._f64()
        out = []
        for part in obs.chunks(factor=2 + n_samples):
            cond = condition(mean, cov, part)
            b = len(part)
            rows = torch.arange(b, device=self.device).repeat_interleave(n_samples)
            draws = matheron(mean, cov, cond, part, rows, gen).reshape(b, n_samples, -1)
            out.append(draws.to(self.dtype))
        return torch.cat(out)
