r"""Closed-form expectation-maximisation for Gaussian and Gaussian-mixture priors.

Given observations :math:`y_i = A_i x_i + e_i`, :math:`e_i \sim \mathcal{N}(0, \Sigma_i)`, and a
Gaussian prior :math:`\mathcal{N}(\mu, C)`, the posteriors :math:`p(x \mid y_i) =
\mathcal{N}(m_i, V_i)` are exact, and EM (Dempster, Laird & Rubin, 1977) updates

.. math::
    \mu' = \frac1n \sum_i m_i, \qquad
    C' = \frac1n \sum_i \big(V_i + (m_i - \mu')(m_i - \mu')^\top\big),

which never decreases the mean log-evidence :math:`\frac1n \sum_i \log p(y_i)`. This is the
Gaussian initialisation of Rozet et al. (2024). This dense path (``method="exact"``) costs
:math:`O(M^3 + M^2 D + M D^2)` per sample and holds :math:`D \times D` matrices.

With ``rank`` set and ``D > 64``, the default path (``method="factor"``,
:mod:`diffem.priors._factor_em`) keeps
:math:`C = F F^\top + \operatorname{diag}(d)` throughout and runs EM for the factor model
:math:`x = \mu + F z + \varepsilon` (probabilistic PCA with a diagonal noise; Tipping & Bishop,
1999), with :math:`z` and :math:`x` both latent. Its expected sufficient statistics are exact:
through diagonal operators (Identity, Mask) by the Woodbury identity and the matrix determinant
lemma in :math:`O(D r^2)` per sample, otherwise through :math:`M \times M` Cholesky factors. Its
M-step maximises within the low-rank-plus-diagonal family, so the log-evidence never decreases.
``method="exact"`` with ``rank`` instead projects the full update :math:`C'` onto that family
(top-``r`` eigenpairs, and the diagonal residual), which is not monotone in general.

For a mixture, extreme deconvolution (Bovy, Hogg & Roweis, 2011, "Extreme deconvolution:
inferring complete distribution functions from noisy, heterogeneous and incomplete
observations", Ann. Appl. Stat.) alternates responsibilities
:math:`q_{ik} \propto w_k \mathcal{N}(y_i; A_i \mu_k, A_i C_k A_i^\top + \Sigma_i)` and

.. math::
    w_k' = \frac1n \sum_i q_{ik}, \quad
    \mu_k' = \frac{\sum_i q_{ik} b_{ik}}{\sum_i q_{ik}}, \quad
    C_k' = \frac{\sum_i q_{ik} \big(B_{ik} + (b_{ik} - \mu_k')(b_{ik} - \mu_k')^\top\big)}
    {\sum_i q_{ik}},

with :math:`b_{ik}, B_{ik}` the mean and covariance of :math:`x_i` given :math:`y_i` and
component :math:`k`. When each observation sees few of the ``D`` features, these full
covariances are poorly determined (ill-posed for :math:`D = 64` and 16 observed entries);
``shrinkage`` :math:`\nu > 0` maximises instead the log-evidence penalised by
:math:`-\frac\nu2 \sum_k (\log\det C_k + \operatorname{tr}(C_k^{-1} C_0))` (an
inverse-Wishart prior with scale :math:`\nu C_0`, a MAP-EM; Fraley & Raftery, 2007,
"Bayesian regularization for normal mixture estimation and model-based clustering", J.
Classif.), whose M-step is

.. math::
    C_k' = \frac{n_k S_k + \nu C_0}{n_k + \nu}, \qquad n_k = \sum_i q_{ik},

with :math:`S_k` the unpenalised update above: :math:`\nu` pseudo-observations pull every
component towards the target :math:`C_0`, the pooled covariance :math:`\sum_k w_k C_k` of the
starting mixture, and the penalised objective never decreases.

Everything is accumulated chunk by chunk over the observations (memory independent of ``n``) in
float64.
"""

from __future__ import annotations

from typing import Any

import torch
from sklearn.cluster import KMeans
from torch import Tensor

from diffem._device import resolve_device
from diffem._random import numpy_random_state, torch_generator
from diffem._validation import check_int, check_number
from diffem.operators.base import Operator
from diffem.priors import _factor_em
from diffem.priors._common import (
    Covariance,
    FullCovariance,
    LowRankCovariance,
    ObservationSet,
    condition,
)
from diffem.priors._em_base import ExpectationMaximization
from diffem.priors.gaussian import GaussianPrior, _check_psd_eig
from diffem.priors.linearize import LinearizedEM
from diffem.priors.mixture import GaussianMixturePrior

__all__ = ["fit_gaussian", "fit_gaussian_mixture"]


# ``method="auto"`` keeps the dense exact path with ``rank`` up to this many features.
_EXACT_MAX_D = 64


def _initial_moments(obs: ObservationSet) -> tuple[Tensor, Tensor]:
    r"""Mean and isotropic variance estimated from the observations.

    :math:`\mu_0 = (\sum_i A_i^\top A_i + \epsilon I)^{-1} \sum_i A_i^\top y_i` (least squares,
    for masks the per-feature mean of observed entries), and
    :math:`s_0^2 = \sum_i (\lVert y_i - A_i\mu_0 \rVert^2 - \operatorname{tr}\Sigma_i) /
    \sum_i \lVert A_i \rVert_F^2` over observed entries.
    """
    d = obs.d
    device = obs.y.device
    gram = torch.zeros(d, d, dtype=torch.float64, device=device)
    rhs = torch.zeros(d, dtype=torch.float64, device=device)
    for part in obs.chunks(factor=2):
        A = part.matrix.expand(len(part), -1, -1)
        gram += (A.mT @ A).sum(0)
        rhs += (A.mT @ part.y.unsqueeze(-1)).squeeze(-1).sum(0)
    eps = 1e-6 * gram.diagonal().mean().clamp_min(1e-12)
    mean = torch.linalg.solve(gram + eps * torch.eye(d, dtype=gram.dtype, device=device), rhs)
    resid, noise, norm = 0.0, 0.0, 0.0
    for part in obs.chunks(factor=2):
        A = part.matrix.expand(len(part), -1, -1)
        r = part.y - (A @ mean.unsqueeze(-1)).squeeze(-1)
        observed = (A.abs().sum(-1) > 0).to(torch.float64)  # pinned rows of A are zero
        resid += float((r**2 * observed).sum())
        noise += float((part.noise_var.expand_as(r) * observed).sum())
        norm += float((A**2).sum())
    scale = max(resid - noise, 1e-2 * resid, 1e-12) / max(norm, 1e-12)
    return mean, torch.tensor(scale, dtype=torch.float64, device=device)


def _project_low_rank(
    cov: Tensor, rank: int, floor: float, n_inner: int = 8
) -> tuple[Tensor, Tensor]:
    r""":math:`C \approx F F^\top + \operatorname{diag}(d)` by principal-axis factoring.

    Alternates :math:`F = U_r \Lambda_r^{1/2}` from the top-``rank`` eigenpairs of
    :math:`C - \operatorname{diag}(d)` and :math:`d = \operatorname{diag}(C - F F^\top)`
    (clamped at ``floor``), starting from :math:`d = 0`; the diagonal of :math:`C` is kept.
    """
    size = cov.shape[0]
    diag = torch.zeros(size, dtype=cov.dtype, device=cov.device)
    for _ in range(n_inner):
        reduced = cov - torch.diag(diag)
        if size <= 2048 or rank >= size // 4:
            vals, vecs = torch.linalg.eigh(reduced)
            vals, vecs = vals[-rank:], vecs[:, -rank:]
        else:
            # Randomized subspace iteration (Halko et al., 2011).
            vecs, vals, _ = torch.svd_lowrank(reduced, q=min(size, rank + 16), niter=6)
            vals, vecs = vals[:rank], vecs[:, :rank]
        factor = vecs * vals.clamp_min(0).sqrt()
        diag = (cov.diagonal() - (factor**2).sum(-1)).clamp_min(floor)
    return factor, diag


class _GaussianEM(ExpectationMaximization):
    """Dense exact EM (``method="exact"``): the full covariance ``cov`` ``(D, D)``, or
    ``factor`` ``(D, r)`` and ``diag`` ``(D,)`` projected from the full update."""

    def __init__(
        self,
        obs: ObservationSet,
        mean: Tensor,
        cov: Tensor | None,
        factor: Tensor | None,
        diag: Tensor | None,
        ridge: float,
    ) -> None:
        super().__init__(obs, ridge)
        self.mean, self.cov, self.factor, self.diag = mean, cov, factor, diag

    def _covariance(self) -> Covariance:
        if self.cov is None:
            return LowRankCovariance(self.factor, self.diag)
        vals, vecs = _check_psd_eig(self.cov, "cov")
        return FullCovariance(self.cov, vals, vecs)

    def _e_step(self, statistics: bool) -> tuple[float, Any]:
        d, dev = self.obs.d, self.mean.device
        cov = self._covariance()
        sum_dev = torch.zeros(d, dtype=torch.float64, device=dev)
        sum_outer = torch.zeros(d, d, dtype=torch.float64, device=dev)
        sum_reduction = torch.zeros(d, d, dtype=torch.float64, device=dev)
        total = 0.0
        for part in self.obs.chunks(factor=4):
            cond = condition(self.mean, cov, part)
            total += float(cond.log_evidence.sum())
            if not statistics:
                continue
            dev_i = cond.mean_shift()  # m_i - mu, (b, D)
            sum_dev += dev_i.sum(0)
            sum_outer += dev_i.mT @ dev_i
            W = cond.whitened_gain().reshape(-1, d)  # C A^T S^{-1} A C = W^T W
            sum_reduction += W.mT @ W
        return total, (cov, sum_dev, sum_outer, sum_reduction)

    def _m_step(self, statistics: Any) -> None:
        cov, sum_dev, sum_outer, sum_reduction = statistics
        n = len(self.obs)
        delta = sum_dev / n
        self.mean = self.mean + delta
        new = cov.dense() - sum_reduction / n + sum_outer / n - torch.outer(delta, delta)
        new = 0.5 * (new + new.mT)
        floor = self.ridge * float(new.diagonal().mean().clamp_min(1e-300))
        if self.cov is None:
            self.factor, self.diag = _project_low_rank(new, self.factor.shape[1], floor)
        else:
            self.cov = new + floor * torch.eye(len(new), dtype=new.dtype, device=new.device)

    def _prior(self, dtype: torch.dtype) -> GaussianPrior:
        if self.cov is None:
            return GaussianPrior.low_rank(
                self.mean.to(dtype), self.factor.to(dtype), self.diag.to(dtype)
            )
        return GaussianPrior(self.mean.to(dtype), self.cov.to(dtype))


class _MixtureEM(ExpectationMaximization):
    """Extreme deconvolution: ``weights (K,)``, ``means (K, D)`` and full ``covs (K, D, D)``,
    with the covariances shrunk towards the pooled start ``target (D, D)`` by ``shrinkage``
    pseudo-observations, and projected onto rank ``rank`` plus diagonal if it is set."""

    def __init__(
        self,
        obs: ObservationSet,
        weights: Tensor,
        means: Tensor,
        covs: Tensor,
        ridge: float,
        shrinkage: float = 0.0,
        rank: int | None = None,
    ) -> None:
        super().__init__(obs, ridge)
        self.weights, self.means, self.covs = weights, means, covs
        self.shrinkage, self.rank = shrinkage, rank
        self.target = (weights[:, None, None] * covs).sum(0)  # C_0, the pooled start

    def _e_step(self, statistics: bool) -> tuple[float, Any]:
        k_comp, d = self.means.shape
        kw = {"dtype": torch.float64, "device": self.means.device}
        comps = []
        for k in range(k_comp):
            vals, vecs = _check_psd_eig(self.covs[k], "covs")
            comps.append(FullCovariance(self.covs[k], vals, vecs))
        sum_q = torch.zeros(k_comp, **kw)
        sum_qb = torch.zeros(k_comp, d, **kw)
        sum_qbb = torch.zeros(k_comp, d, d, **kw)
        sum_red = torch.zeros(k_comp, d, d, **kw)
        total = 0.0
        for part in self.obs.chunks(factor=2 * k_comp + 2):
            conds = [condition(self.means[k], comps[k], part) for k in range(k_comp)]
            logits = torch.stack([c.log_evidence for c in conds], -1) + torch.log(self.weights)
            total += float(torch.logsumexp(logits, -1).sum())
            if not statistics:
                continue
            q = torch.softmax(logits, -1)  # (b, K)
            for k, cond in enumerate(conds):
                shift = cond.mean_shift()  # b_ik - mu_k
                qk = q[:, k]
                sum_q[k] += qk.sum()
                sum_qb[k] += (qk[:, None] * shift).sum(0)
                sum_qbb[k] += (shift * qk[:, None]).mT @ shift
                W = (cond.whitened_gain() * qk.sqrt()[:, None, None]).reshape(-1, d)
                sum_red[k] += W.mT @ W
        return total, (sum_q, sum_qb, sum_qbb, sum_red)

    def _m_step(self, statistics: Any) -> None:
        sum_q, sum_qb, sum_qbb, sum_red = statistics
        n, d = len(self.obs), self.obs.d
        weights = (sum_q / n).clamp_min(1e-12)
        self.weights = weights / weights.sum()
        alive = sum_q > 1e-8 * n  # components with no responsibility keep their parameters
        nk = sum_q.clamp_min(1e-12)
        delta = torch.where(alive[:, None], sum_qb / nk[:, None], 0.0)
        self.means = self.means + delta
        covs = (
            self.covs
            - sum_red / nk[:, None, None]
            + sum_qbb / nk[:, None, None]
            - delta.unsqueeze(-1) * delta.unsqueeze(-2)
        )
        covs = (nk[:, None, None] * covs + self.shrinkage * self.target) / (
            nk[:, None, None] + self.shrinkage
        )
        covs = 0.5 * (covs + covs.mT)
        floor = self.ridge * covs.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
        if self.rank is None:
            eye = torch.eye(d, dtype=covs.dtype, device=covs.device)
            covs = covs + floor[:, None, None] * eye
        else:  # each component projected onto F F^T + diag(d), as fit_gaussian's "exact"
            for k in torch.nonzero(alive).flatten().tolist():
                factor, diag = _project_low_rank(covs[k], self.rank, float(floor[k]))
                covs[k] = factor @ factor.mT + torch.diag(diag)
        self.covs = torch.where(alive[:, None, None], covs, self.covs)

    def _prior(self, dtype: torch.dtype) -> GaussianMixturePrior:
        return GaussianMixturePrior(
            self.weights.to(dtype), self.means.to(dtype), self.covs.to(dtype)
        )


def _device(device: Any, init: Any) -> torch.device:
    """``device``, else ``init``'s, else the CPU."""
    if device is not None:
        return resolve_device(device)
    return getattr(init, "device", None) or torch.device("cpu")


def _low_rank_init(init: GaussianPrior, rank: int) -> tuple[Tensor, Tensor]:
    """``init``'s factor and diagonal in float64, projected when its rank is not ``rank``."""
    if init.rank == rank:
        return init.factor.to(torch.float64), init.diag.to(torch.float64)
    return _project_low_rank(init.cov_matrix.to(torch.float64), rank, 1e-12)


def _gaussian_em(
    obs: ObservationSet,
    rank: int | None,
    random_state: Any,
    init: GaussianPrior | None,
    ridge: float,
    method: str,
) -> ExpectationMaximization:
    """The EM run of :func:`fit_gaussian`, started from ``init`` or from the observations."""
    d, dev = obs.d, obs.y.device
    if rank is not None and rank > d:
        raise ValueError(f"rank must be at most n_features = {d}, got {rank}.")
    if init is not None and (not isinstance(init, GaussianPrior) or init.n_features != d):
        raise ValueError(f"init must be a GaussianPrior with n_features = {d}.")
    factor_path = rank is not None and (
        method == "factor" or (method == "auto" and d > _EXACT_MAX_D)
    )
    if init is not None:
        init = init.to(device=dev)
        mean = init.mean.to(torch.float64)
        if rank is None:
            return _GaussianEM(obs, mean, init.cov_matrix.to(torch.float64), None, None, ridge)
        factor, diag = _low_rank_init(init, rank)
    elif factor_path:
        diagonal = obs.operator.as_diagonal() is not None
        if diagonal:
            mean, scale, coverage = _factor_em.diagonal_moments(obs, _factor_em.chunk_rows(d, rank))
        else:
            mean, scale = _initial_moments(obs)
            scale, coverage = scale.expand(d), _factor_em.frobenius_coverage(obs)
        generator = torch_generator(random_state, dev)
        factor, diag = _factor_em.initial_factor(
            obs, mean, scale, coverage, rank, diagonal, generator
        )
    else:
        mean, scale = _initial_moments(obs)
        if rank is None:
            eye = torch.eye(d, dtype=torch.float64, device=dev)
            return _GaussianEM(obs, mean, scale * eye, None, None, ridge)
        factor = torch.zeros(d, rank, dtype=torch.float64, device=dev)
        diag = scale.expand(d).clone()
    if factor_path:
        return _factor_em.FactorEM(obs, mean, factor, diag, ridge)
    return _GaussianEM(obs, mean, None, factor, diag, ridge)


def fit_gaussian(
    Y: Any,
    operator: Operator,
    n_iter: int = 32,
    rank: int | None = None,
    random_state: Any = 0,
    init: GaussianPrior | None = None,
    *,
    ridge: float = 1e-6,
    tol: float = 0.0,
    device: Any = None,
    dtype: torch.dtype = torch.float32,
    return_history: bool = False,
    method: str = "auto",
    generator: Any = None,
) -> GaussianPrior | tuple[GaussianPrior, list[float]]:
    r"""Fits a Gaussian prior :math:`\mathcal{N}(\mu, C)` to observations by exact EM.

    The paper's Gaussian initialisation (Rozet et al., 2024): E-step with the exact posteriors
    :math:`\mathcal{N}(m_i, V_i)`, M-step :math:`\mu = \frac1n\sum_i m_i`,
    :math:`C = \frac1n \sum_i (V_i + (m_i - \mu)(m_i - \mu)^\top)`. The mean log-evidence
    never decreases (up to the ``ridge``).

    Parameters
    ----------
    Y : array ``(n, M)``
        Observations; unobserved (pinned) entries are ignored and may be NaN.
    operator : :class:`~diffem.operators.Operator`
        Batch ``n`` or 1 (shared). A :class:`~diffem.operators.Nonlinear` one is linearised
        about each posterior mean at every iteration
        (:class:`~diffem.priors.linearize.LinearizedEM`).
    n_iter : int
        Number of EM iterations.
    rank : int or None
        If set, :math:`C` is kept as :math:`F F^\top + \operatorname{diag}(d)` with
        ``F`` of shape ``(D, rank)``, and the result is a :meth:`GaussianPrior.low_rank` prior
        (see ``method``).
    random_state : int, ``numpy.random.RandomState``, ``torch.Generator`` or None, default 0
        Randomness of the initial subspace of the ``"factor"`` method (a randomized range
        finder), with scikit-learn's semantics (``None``: NumPy's global random state); the
        default seed makes the fit deterministic. Unused otherwise.
    init : GaussianPrior or None
        Starting prior. By default the least-squares mean of the observations and an isotropic
        covariance matching their spread (plus, for the ``"factor"`` method, a factor spanning
        the top principal subspace of the back-projected residuals :math:`A_i^\top (y_i -
        A_i \mu_0)`).
    ridge : float
        Relative floor added to the covariance diagonal, :math:`\text{ridge} \cdot
        \operatorname{tr}(C) / D`.
    tol : float
        Stop early when the mean log-evidence improves by less than ``tol`` (``0``: run
        ``n_iter`` iterations).
    device, dtype
        Where to compute (default: ``init``'s device, else CPU) and the dtype of the returned
        prior's parameters.
    return_history : bool
        Also return ``history_``.
    method : {"auto", "exact", "factor"}
        ``"exact"``: dense EM on the full covariance (then projected onto rank ``r`` when
        ``rank`` is set); :math:`D \times D` matrices, for moderate ``D``. ``"factor"`` (needs
        ``rank``): factor-analysis EM with exact expected statistics and no :math:`D \times D`
        array, :math:`O(n D r^2)` per iteration through Identity and Mask operators (Woodbury
        identity, determinant lemma), :math:`O(n (M^2 D + M^3))` through the others; see
        :mod:`diffem.priors._factor_em`. ``"auto"``: ``"factor"`` when ``rank`` is set and
        ``D > 64``, else ``"exact"``.
    generator : same as ``random_state``, optional
        The former name of ``random_state``; when given, it is used instead.

    Returns
    -------
    prior : GaussianPrior
        With ``history_`` (the mean log-evidence after ``k`` iterations at index ``k``),
        ``n_iter_`` (iterations run), ``converged_`` (stopped by ``tol``) and ``lower_bound_``
        (the mean log-evidence of ``prior``, as in scikit-learn's mixtures).
    history : list of float, only with ``return_history=True``
    """
    random_state = random_state if generator is None else generator
    n_iter = check_int(n_iter, "n_iter", 0)
    rank = check_int(rank, "rank", 1, allow_none=True)
    ridge, tol = check_number(ridge, "ridge", 0.0), check_number(tol, "tol", 0.0)
    if method not in ("auto", "exact", "factor"):
        raise ValueError(f"method must be 'auto', 'exact' or 'factor', got {method!r}.")
    if method == "factor" and rank is None:
        raise ValueError("method='factor' needs a rank (a positive integer), got rank=None.")
    obs = ObservationSet(Y, operator, None, _device(device, init))
    if operator.is_linear:
        em = _gaussian_em(obs, rank, random_state, init, ridge, method)
    else:  # relinearised about the posterior means at every iteration

        def linear_em(lin: ObservationSet, start: GaussianPrior | None) -> Any:
            return _gaussian_em(lin, rank, random_state, start, ridge, method)

        em = LinearizedEM(obs, linear_em, init)
    prior = em.fit(n_iter, tol, dtype)
    return (prior, prior.history_) if return_history else prior


def fit_gaussian_mixture(
    Y: Any,
    operator: Operator,
    n_components: int,
    n_iter: int = 100,
    random_state: Any = None,
    *,
    init: GaussianMixturePrior | None = None,
    ridge: float = 1e-6,
    shrinkage: float = 0.0,
    rank: int | None = None,
    tol: float = 0.0,
    device: Any = None,
    dtype: torch.dtype = torch.float32,
    return_history: bool = False,
    generator: Any = None,
) -> GaussianMixturePrior | tuple[GaussianMixturePrior, list[float]]:
    r"""Fits a Gaussian mixture prior by extreme deconvolution (Bovy, Hogg & Roweis, 2011).

    EM for :math:`\sum_k w_k \mathcal{N}(\mu_k, C_k)` under per-sample linear-Gaussian
    operators, with full covariances and a small ridge (see the module docstring for the
    updates).

    Parameters
    ----------
    Y : array ``(n, M)``
    operator : :class:`~diffem.operators.Operator` of batch ``n`` or 1
    n_components : int
        ``K``.
    n_iter : int
        Number of EM iterations.
    random_state : int, ``numpy.random.RandomState``, ``torch.Generator`` or None
        Randomness of the initial means (k-means++), with scikit-learn's semantics.
    init : GaussianMixturePrior or None
        Starting mixture. By default: a Gaussian fitted by :func:`fit_gaussian`, the centres of
        a k-means++ clustering (scikit-learn's :class:`~sklearn.cluster.KMeans`, 10 Lloyd
        iterations) of its posterior means as component means, its covariance for every
        component and uniform weights.
    ridge : float
        Relative ridge :math:`\text{ridge} \cdot \operatorname{tr}(C) / D` added to every
        component covariance (prevents collapse).
    shrinkage : float, default=0.0
        Pseudo-observations :math:`\nu` pulling every component covariance towards the pooled
        covariance of the start, :math:`\sum_k w_k C_k` (by default the Gaussian's): the
        M-step :math:`C_k' = (n_k S_k + \nu C_0) / (n_k + \nu)` of the penalised EM of the
        module docstring. ``0`` is plain extreme deconvolution; large values tie the
        covariances to the start's. For few observed entries per sample (e.g. 16 of 64), a
        value of the order of the samples per component regularises the ill-posed full
        covariances.
    rank : int or None, default=None
        If set, every M-step projects each component covariance onto :math:`F_k F_k^\top +
        \operatorname{diag}(d_k)` with ``F_k`` of shape ``(D, rank)`` (principal-axis
        factoring, as ``fit_gaussian(method="exact", rank=...)``; not monotone in general). The
        covariances are still stored as dense ``(K, D, D)`` matrices.
    tol : float
        Stop early when the mean log-evidence improves by less than ``tol`` (with
        ``shrinkage``, ``history_`` holds the unpenalised mean log-evidence, which may fall).
    device, dtype, return_history, generator
        As in :func:`fit_gaussian`.

    Returns
    -------
    prior : GaussianMixturePrior
        With ``history_``, ``n_iter_``, ``converged_`` and ``lower_bound_`` as in
        :func:`fit_gaussian`.
    """
    random_state = random_state if generator is None else generator
    k_comp = check_int(n_components, "n_components", 1)
    n_iter = check_int(n_iter, "n_iter", 0)
    ridge, tol = check_number(ridge, "ridge", 0.0), check_number(tol, "tol", 0.0)
    shrinkage = check_number(shrinkage, "shrinkage", 0.0)
    rank = check_int(rank, "rank", 1, allow_none=True)
    dev = _device(device, init)
    obs = ObservationSet(Y, operator, None, dev)
    d = obs.d
    if rank is not None and rank > d:
        raise ValueError(f"rank must be at most n_features = {d}, got {rank}.")
    if init is not None:
        if not isinstance(init, GaussianMixturePrior) or init.n_features != d:
            raise ValueError(f"init must be a GaussianMixturePrior with n_features = {d}.")
        k_comp = init.n_components
        weights = init.weights.to(dtype=torch.float64, device=dev)
        means = init.means.to(dtype=torch.float64, device=dev)
        covs = init.cov_matrices.to(dtype=torch.float64, device=dev)
    else:
        gauss = _gaussian_em(obs, None, 0, None, 1e-6, "exact").fit(10, 0.0, torch.float64)
        mean, cov = gauss._f64()
        post_means = torch.cat(
            [mean + condition(mean, cov, part).mean_shift() for part in obs.chunks(factor=3)]
        )
        kmeans = KMeans(
            k_comp, n_init=1, max_iter=10, random_state=numpy_random_state(random_state)
        )
        centres = kmeans.fit(post_means.cpu().numpy()).cluster_centers_
        means = torch.as_tensor(centres, dtype=torch.float64, device=dev)
        weights = torch.full((k_comp,), 1.0 / k_comp, dtype=torch.float64, device=dev)
        covs = gauss.covariance.expand(k_comp, -1, -1).clone()
    em = _MixtureEM(obs, weights, means, covs, ridge, shrinkage, rank)
    prior = em.fit(n_iter, tol, dtype)
    return (prior, prior.history_) if return_history else prior
