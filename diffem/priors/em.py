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
component :math:`k`.

Everything is accumulated chunk by chunk over the observations (memory independent of ``n``) in
float64.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffem.operators.base import Operator
from diffem.priors import _factor_em
from diffem.priors._common import (
    Covariance,
    FullCovariance,
    LowRankCovariance,
    ObservationSet,
    check_n,
    condition,
    make_generator,
    rand,
)
from diffem.priors.gaussian import GaussianPrior, _check_psd_eig
from diffem.priors.linearize import fit_gaussian_linearized
from diffem.priors.mixture import GaussianMixturePrior

__all__ = ["fit_gaussian", "fit_gaussian_mixture"]


# ``method="auto"`` keeps the dense exact path with ``rank`` up to this many features.
_EXACT_MAX_D = 64


def _resolve_device(device: Any, init: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    if init is not None and hasattr(init, "device"):
        return init.device
    return torch.device("cpu")


def _observation_set(Y: Any, operator: Operator, device: torch.device) -> ObservationSet:
    if not isinstance(operator, Operator):
        raise TypeError(
            f"operator must be a diffem.operators.Operator, got {type(operator).__name__}."
        )
    if not operator.is_linear:
        raise TypeError("fit_gaussian_mixture needs a linear operator, got a Nonlinear one.")
    return ObservationSet(Y, operator, operator.n_features, device)


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


def fit_gaussian(
    Y: Any,
    operator: Operator,
    n_iter: int = 32,
    rank: int | None = None,
    generator: Any = None,
    init: GaussianPrior | None = None,
    *,
    ridge: float = 1e-6,
    tol: float = 0.0,
    device: Any = None,
    dtype: torch.dtype = torch.float32,
    return_history: bool = False,
    method: str = "auto",
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
        (:func:`~diffem.priors.linearize.fit_gaussian_linearized`).
    n_iter : int
        Number of EM iterations.
    rank : int or None
        If set, :math:`C` is kept as :math:`F F^\top + \operatorname{diag}(d)` with
        ``F`` of shape ``(D, rank)``, and the result is a :meth:`GaussianPrior.low_rank` prior
        (see ``method``).
    generator : ``torch.Generator``, int seed, ``numpy.random.RandomState`` or ``None``
        Randomness of the initial subspace of the ``"factor"`` method (a randomized range
        finder); ``None`` uses a fixed seed, so the fit is deterministic. Unused otherwise.
    init : GaussianPrior or None
        Starting prior. By default the least-squares mean of the observations and an isotropic
        covariance matching their spread (plus, for the ``"factor"`` method, a factor spanning
        the top principal subspace of the back-projected residuals :math:`A_i^\top (y_i -
        A_i \mu_0)`).
    ridge : float
        Relative floor added to the covariance diagonal, :math:`\text{ridge} \cdot
        \operatorname{tr}(C) / D`.
    tol : float
        Stop early when the mean log-evidence improves by less than ``tol``.
    device, dtype
        Where to compute (default: ``init``'s device, else CPU) and the dtype of the returned
        prior's parameters.
    return_history : bool
        Also return the mean log-evidences, ``history[k]`` being that of the prior after ``k``
        iterations.
    method : {"auto", "exact", "factor"}
        ``"exact"``: dense EM on the full covariance (then projected onto rank ``r`` when
        ``rank`` is set); :math:`D \times D` matrices, for moderate ``D``. ``"factor"`` (needs
        ``rank``): factor-analysis EM with exact expected statistics and no :math:`D \times D`
        array, :math:`O(n D r^2)` per iteration through Identity and Mask operators (Woodbury
        identity, determinant lemma), :math:`O(n (M^2 D + M^3))` through the others; see
        :mod:`diffem.priors._factor_em`. ``"auto"``: ``"factor"`` when ``rank`` is set and
        ``D > 64``, else ``"exact"`` (cheap at that size, and unchanged from earlier versions).

    Returns
    -------
    prior : GaussianPrior
        Its ``history_`` attribute holds the per-iteration mean log-evidences.
    history : list of float, only with ``return_history=True``
    """
    if isinstance(operator, Operator) and not operator.is_linear:  # iterated linearisation
        return fit_gaussian_linearized(
            Y, operator, n_iter, rank, generator, init, ridge=ridge, tol=tol, device=device,
            dtype=dtype, return_history=return_history, method=method,
        )  # fmt: skip
    n_iter = check_n(n_iter, "n_iter") if n_iter != 0 else 0
    if rank is not None:
        rank = check_n(rank, "rank")
    if method not in ("auto", "exact", "factor"):
        raise ValueError(f"method must be 'auto', 'exact' or 'factor', got {method!r}.")
    if method == "factor" and rank is None:
        raise ValueError("method='factor' needs a rank (a positive integer), got rank=None.")
    dev = _resolve_device(device, init)
    obs = _observation_set(Y, operator, dev)
    d = obs.d
    if rank is not None and rank > d:
        raise ValueError(f"rank must be at most n_features = {d}, got {rank}.")
    if rank is not None and (method == "factor" or (method == "auto" and d > _EXACT_MAX_D)):
        return _fit_factor(
            obs, n_iter, rank, generator, init, ridge, tol, dev, dtype, return_history
        )
    eye = torch.eye(d, dtype=torch.float64, device=dev)

    if init is not None:
        if not isinstance(init, GaussianPrior) or init.n_features != d:
            raise ValueError(f"init must be a GaussianPrior with n_features = {d}.")
        mean = init.mean.to(dtype=torch.float64, device=dev)
        if rank is None:
            cov_full = init.cov_matrix.to(dtype=torch.float64, device=dev)
        elif init.rank is not None and init.rank == rank:
            factor = init.factor.to(dtype=torch.float64, device=dev)
            diag = init.diag.to(dtype=torch.float64, device=dev)
        else:
            factor, diag = _project_low_rank(
                init.cov_matrix.to(dtype=torch.float64, device=dev), rank, 1e-12
            )
    else:
        mean, scale = _initial_moments(obs)
        if rank is None:
            cov_full = scale * eye
        else:
            factor = torch.zeros(d, rank, dtype=torch.float64, device=dev)
            diag = scale.expand(d).clone()

    def structure() -> Covariance:
        if rank is None:
            vals, vecs = _check_psd_eig(cov_full, "cov")
            return FullCovariance(cov_full, vals, vecs)
        return LowRankCovariance(factor, diag)

    history: list[float] = []
    n = len(obs)
    for iteration in range(n_iter + 1):
        cov = structure()
        sum_dev = torch.zeros(d, dtype=torch.float64, device=dev)
        sum_outer = torch.zeros(d, d, dtype=torch.float64, device=dev)
        sum_reduction = torch.zeros(d, d, dtype=torch.float64, device=dev)
        total_logev = 0.0
        for part in obs.chunks(factor=4):
            cond = condition(mean, cov, part)
            total_logev += float(cond.log_evidence.sum())
            if iteration == n_iter:
                continue
            dev_i = cond.mean_shift()  # m_i - mu, (b, D)
            sum_dev += dev_i.sum(0)
            sum_outer += dev_i.mT @ dev_i
            W = torch.linalg.solve_triangular(
                cond.L, cond.AC.expand(len(part), -1, -1), upper=False
            )  # (b, M, D); C A^T S^{-1} A C = W^T W
            W = W.reshape(-1, d)
            sum_reduction += W.mT @ W
        history.append(total_logev / n)
        if iteration == n_iter or (iteration > 0 and tol > 0 and history[-1] - history[-2] < tol):
            break
        delta = sum_dev / n
        mean = mean + delta
        new_cov = cov.dense() - sum_reduction / n + sum_outer / n - torch.outer(delta, delta)
        new_cov = 0.5 * (new_cov + new_cov.mT)
        floor = ridge * float(new_cov.diagonal().mean().clamp_min(1e-300))
        if rank is None:
            cov_full = new_cov + floor * eye
        else:
            factor, diag = _project_low_rank(new_cov, rank, floor)

    if rank is None:
        prior = GaussianPrior(mean.to(dtype), cov_full.to(dtype))
    else:
        prior = GaussianPrior.low_rank(mean.to(dtype), factor.to(dtype), diag.to(dtype))
    prior.history_ = history
    if return_history:
        return prior, history
    return prior


def _fit_factor(
    obs: ObservationSet,
    n_iter: int,
    rank: int,
    generator: Any,
    init: GaussianPrior | None,
    ridge: float,
    tol: float,
    dev: torch.device,
    dtype: torch.dtype,
    return_history: bool,
) -> GaussianPrior | tuple[GaussianPrior, list[float]]:
    """The ``"factor"`` method of :func:`fit_gaussian` (see :mod:`diffem.priors._factor_em`)."""
    d, n = obs.d, len(obs)
    diagonal = obs.operator.as_diagonal() is not None
    if init is not None:
        if not isinstance(init, GaussianPrior) or init.n_features != d:
            raise ValueError(f"init must be a GaussianPrior with n_features = {d}.")
        mean = init.mean.to(dtype=torch.float64, device=dev)
        if init.rank is not None and init.rank == rank:
            factor = init.factor.to(dtype=torch.float64, device=dev)
            diag = init.diag.to(dtype=torch.float64, device=dev)
        else:
            factor, diag = _project_low_rank(
                init.cov_matrix.to(dtype=torch.float64, device=dev), rank, 1e-12
            )
    else:
        gen = make_generator(generator, dev)
        if gen is None:
            gen = torch.Generator(device=dev)
            gen.manual_seed(0)
        if diagonal:
            rows = _factor_em.chunk_rows(d, rank)
            mean, scale, coverage = _factor_em.diagonal_moments(obs, rows)
        else:
            mean, scale = _initial_moments(obs)
            scale = scale.expand(d)
            coverage = _factor_em.frobenius_coverage(obs)
        factor, diag = _factor_em.initial_factor(obs, mean, scale, coverage, rank, diagonal, gen)

    estep = _factor_em.estep_diagonal if diagonal else _factor_em.estep_dense
    history: list[float] = []
    for iteration in range(n_iter + 1):
        stats = _factor_em.Statistics(d, rank, dev) if iteration < n_iter else None
        history.append(estep(obs, mean, factor, diag, stats) / n)
        if iteration == n_iter or (iteration > 0 and tol > 0 and history[-1] - history[-2] < tol):
            break
        mean, factor, diag = _factor_em.mstep(stats, ridge)

    factor = _factor_em.canonical_factor(factor)
    prior = GaussianPrior.low_rank(mean.to(dtype), factor.to(dtype), diag.to(dtype))
    prior.history_ = history
    if return_history:
        return prior, history
    return prior


def _kmeans_pp(points: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007) followed by a few Lloyd iterations."""
    n = points.shape[0]
    idx = int(rand((1,), generator, points.dtype, points.device).item() * n) % n
    centers = [points[idx]]
    dist = ((points - centers[0]) ** 2).sum(-1)
    for _ in range(1, k):
        probs = dist / dist.sum().clamp_min(1e-300)
        u = rand((1,), generator, points.dtype, points.device)
        idx = int(torch.searchsorted(probs.cumsum(0), u).clamp_max(n - 1).item())
        centers.append(points[idx])
        dist = torch.minimum(dist, ((points - centers[-1]) ** 2).sum(-1))
    centers_t = torch.stack(centers)
    for _ in range(10):
        labels = torch.cdist(points, centers_t).argmin(-1)
        for j in range(k):
            members = points[labels == j]
            if members.shape[0]:
                centers_t[j] = members.mean(0)
    return centers_t


def fit_gaussian_mixture(
    Y: Any,
    operator: Operator,
    n_components: int,
    n_iter: int = 100,
    generator: Any = None,
    *,
    init: GaussianMixturePrior | None = None,
    ridge: float = 1e-6,
    tol: float = 0.0,
    device: Any = None,
    dtype: torch.dtype = torch.float32,
    return_history: bool = False,
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
    generator : ``torch.Generator``, int seed, ``numpy.random.RandomState`` or ``None``
        Randomness of the initialisation.
    init : GaussianMixturePrior or None
        Starting mixture. By default: a Gaussian fitted by :func:`fit_gaussian`, k-means++
        centres of its posterior means as component means, its covariance for every component
        and uniform weights.
    ridge : float
        Relative ridge :math:`\text{ridge} \cdot \operatorname{tr}(C) / D` added to every
        component covariance (prevents collapse).
    tol : float
        Stop early when the mean log-evidence improves by less than ``tol``.
    device, dtype, return_history
        As in :func:`fit_gaussian`.

    Returns
    -------
    prior : GaussianMixturePrior
        Its ``history_`` attribute holds the per-iteration mean log-evidences.
    """
    k_comp = check_n(n_components, "n_components")
    n_iter = check_n(n_iter, "n_iter") if n_iter != 0 else 0
    dev = _resolve_device(device, init)
    gen = make_generator(generator, dev)
    obs = _observation_set(Y, operator, dev)
    d, n = obs.d, len(obs)
    eye = torch.eye(d, dtype=torch.float64, device=dev)

    if init is not None:
        if not isinstance(init, GaussianMixturePrior) or init.n_features != d:
            raise ValueError(f"init must be a GaussianMixturePrior with n_features = {d}.")
        k_comp = init.n_components
        weights = init.weights.to(dtype=torch.float64, device=dev)
        means = init.means.to(dtype=torch.float64, device=dev)
        covs = init.cov_matrices.to(dtype=torch.float64, device=dev)
    else:
        gauss = fit_gaussian(Y, operator, n_iter=10, device=dev, dtype=torch.float64)
        post_means = torch.cat(
            [
                gauss.mean.to(dev) + condition(*gauss._f64(), part).mean_shift()
                for part in obs.chunks(factor=3)
            ]
        )
        means = _kmeans_pp(post_means, k_comp, gen)
        weights = torch.full((k_comp,), 1.0 / k_comp, dtype=torch.float64, device=dev)
        covs = gauss.covariance.to(dev).expand(k_comp, -1, -1).clone()

    history: list[float] = []
    for iteration in range(n_iter + 1):
        comps = []
        for k in range(k_comp):
            vals, vecs = _check_psd_eig(covs[k], "covs")
            comps.append(FullCovariance(covs[k], vals, vecs))
        sum_q = torch.zeros(k_comp, dtype=torch.float64, device=dev)
        sum_qb = torch.zeros(k_comp, d, dtype=torch.float64, device=dev)
        sum_qbb = torch.zeros(k_comp, d, d, dtype=torch.float64, device=dev)
        sum_red = torch.zeros(k_comp, d, d, dtype=torch.float64, device=dev)
        total_logev = 0.0
        for part in obs.chunks(factor=2 * k_comp + 2):
            conds = [condition(means[k], comps[k], part) for k in range(k_comp)]
            logits = torch.stack([c.log_evidence for c in conds], -1) + torch.log(weights)
            total_logev += float(torch.logsumexp(logits, -1).sum())
            if iteration == n_iter:
                continue
            q = torch.softmax(logits, -1)  # (b, K)
            for k, cond in enumerate(conds):
                shift = cond.mean_shift()  # b_ik - mu_k
                qk = q[:, k]
                sum_q[k] += qk.sum()
                sum_qb[k] += (qk[:, None] * shift).sum(0)
                sum_qbb[k] += (shift * qk[:, None]).mT @ shift
                W = (
                    torch.linalg.solve_triangular(
                        cond.L, cond.AC.expand(len(part), -1, -1), upper=False
                    )
                    * qk.sqrt()[:, None, None]
                )
                W = W.reshape(-1, d)
                sum_red[k] += W.mT @ W
        history.append(total_logev / n)
        if iteration == n_iter or (iteration > 0 and tol > 0 and history[-1] - history[-2] < tol):
            break
        weights = (sum_q / n).clamp_min(1e-12)
        weights = weights / weights.sum()
        alive = sum_q > 1e-8 * n  # components with no responsibility keep their parameters
        nk = sum_q.clamp_min(1e-12)
        delta = torch.where(alive[:, None], sum_qb / nk[:, None], 0.0)
        means = means + delta
        new_covs = (
            covs
            - sum_red / nk[:, None, None]
            + sum_qbb / nk[:, None, None]
            - delta.unsqueeze(-1) * delta.unsqueeze(-2)
        )
        new_covs = torch.where(alive[:, None, None], 0.5 * (new_covs + new_covs.mT), covs)
        floor = ridge * new_covs.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
        covs = new_covs + floor[:, None, None] * eye

    prior = GaussianMixturePrior(weights.to(dtype), means.to(dtype), covs.to(dtype))
    prior.history_ = history
    if return_history:
        return prior, history
    return prior
