r"""Scalable EM for a low-rank-plus-diagonal Gaussian prior (factor analysis from observations).

The prior :math:`\mathcal{N}(\mu, C)`, :math:`C = F F^\top + \operatorname{diag}(d)` with
:math:`F \in \mathbb{R}^{D \times r}`, is the marginal of the factor model (probabilistic PCA
with a diagonal noise; Tipping & Bishop, 1999, "Probabilistic principal component analysis",
JRSS B)

.. math::
    z \sim \mathcal{N}(0, I_r), \qquad x = \mu + F z + \varepsilon, \quad
    \varepsilon \sim \mathcal{N}(0, \operatorname{diag}(d)), \qquad y_i = A_i x + e_i,
    \quad e_i \sim \mathcal{N}(0, \Sigma_i).

EM treats both :math:`z_i` and :math:`x_i` as missing (Rubin & Thayer, 1982, "EM algorithms
for ML factor analysis", Psychometrika). With :math:`w = (z, 1) \in \mathbb{R}^{r+1}` and
:math:`W = [F, \mu] \in \mathbb{R}^{D \times (r+1)}`, the M-step is a regression on expected
sufficient statistics,

.. math::
    W' = \Big(\sum_i E[x_i w_i^\top]\Big) \Big(\sum_i E[w_i w_i^\top]\Big)^{-1}, \qquad
    d'_a = \frac1n \Big(\sum_i E[x_{ia}^2] - W'_a \sum_i E[w_i x_{ia}]\Big),

which maximises the expected complete log-likelihood *within* the low-rank-plus-diagonal family,
so the mean log-evidence :math:`\frac1n \sum_i \log p(y_i)` never decreases (up to the floor on
:math:`d`). It needs only :math:`E[z_i]`, :math:`\operatorname{Cov}[z_i]` (:math:`r \times r`),
:math:`E[x_i]`, :math:`\operatorname{Cov}[x_i, z_i]` (:math:`D \times r`, summed over
:math:`i`) and the diagonal of :math:`\operatorname{Cov}[x_i]`, all given :math:`y_i`: never a
:math:`D \times D` matrix.

**Diagonal operators** (:meth:`~diffem.operators.Operator.as_diagonal`: Identity, Mask),
:math:`A_i = \operatorname{diag}(a_i)`. Integrating out :math:`\varepsilon`, :math:`y_i = A_i\mu
+ G_i z + (A_i \varepsilon + e_i)` with :math:`G_i = A_i F` and the *diagonal* noise covariance
:math:`\Delta_i = \operatorname{diag}(\delta_i)`, :math:`\delta_i = a_i^2 d + \sigma_i^2`. So
:math:`S_i = A_i C A_i^\top + \Sigma_i = \Delta_i + G_i G_i^\top` and, with
:math:`K_i = I_r + G_i^\top \Delta_i^{-1} G_i = I_r + F^\top \operatorname{diag}(a_i^2 /
\delta_i) F` and the residual :math:`\rho_i = y_i - A_i \mu`,

.. math::
    S_i^{-1} = \Delta_i^{-1} - \Delta_i^{-1} G_i K_i^{-1} G_i^\top \Delta_i^{-1}
    \quad \text{(Woodbury)}, \qquad
    \log\det S_i = \textstyle\sum_j \log \delta_{ij} + \log\det K_i
    \quad \text{(determinant lemma)},

.. math::
    z_i \mid y_i \sim \mathcal{N}(\hat z_i, K_i^{-1}), \quad
    \hat z_i = K_i^{-1} F^\top (a_i \odot \rho_i / \delta_i), \qquad
    \rho_i^\top S_i^{-1} \rho_i = \textstyle\sum_j \rho_{ij}^2 / \delta_{ij}
        - \hat z_i^\top K_i \hat z_i .

Given :math:`z`, the residual noise :math:`\varepsilon` has a diagonal Gaussian posterior, so
with :math:`c_i = \sigma_i^2 / \delta_i = 1 - d\, a_i^2/\delta_i`

.. math::
    E[x_i \mid y_i] = \mu + d \odot a_i \odot \rho_i / \delta_i + c_i \odot (F \hat z_i), \qquad
    \operatorname{Cov}[x_i, z_i \mid y_i] = \operatorname{diag}(c_i) F K_i^{-1},

.. math::
    \operatorname{Var}[x_{ia} \mid y_i] = c_{ia}^2\, F_a^\top K_i^{-1} F_a + d_a c_{ia}.

The sums over :math:`i` of the last two only need :math:`T^{(p)}_a = \sum_i c_{ia}^p K_i^{-1}`
(:math:`p = 1, 2`), accumulated as one matrix product :math:`(c^p)^\top \operatorname{vec}
(K^{-1})` per chunk (symmetric :math:`r \times r` blocks stored packed). An iteration costs
:math:`O(n D r^2)` flops in three matrix products of shape ``(n, D) x (D, r(r+1)/2)``, and
:math:`O(\text{chunk} \cdot D + D r^2)` memory; no :math:`D \times D` or ``(n, D, r)``
array is formed.

**Other operators** (Dense, Blur, Downsample, FourierMask, Grayscale) use the dense
measurement-space matrices (:meth:`~diffem.operators.Operator.matrix`, chunk by chunk) and a
Cholesky factor of :math:`S_i`: :math:`O(M^2 D + M^3)` per sample, suited to ``M`` up to a few
hundred, still without any :math:`D \times D` array. The same statistics are

.. math::
    \operatorname{Cov}[z \mid y] = I - (A F)^\top S^{-1} A F, \quad
    \operatorname{Cov}[x, z \mid y] = F - C A^\top S^{-1} A F, \quad
    \operatorname{Var}[x_a \mid y] = C_{aa} - (C A^\top S^{-1} A C)_{aa}.

**Why exact statistics rather than Monte Carlo EM.** Drawing posterior samples with Matheron's
rule (Wilson et al., 2020) and fitting PPCA to them would need the same :math:`K_i^{-1}` (the
Woodbury solve) per observation, so it would cost as much as the exact statistics, and it
would add sampling noise to the M-step and to the monotonicity of the log-evidence. The exact
statistics make the algorithm deterministic (the only randomness is the randomized range finder
of the initial subspace; Halko, Martinsson & Tropp, 2011) and an exact EM within the family; the
M-step uses the parameter expansion of :func:`mstep`, which keeps that property and converges
much faster when most entries are missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from diffem.operators.base import Operator
from diffem.priors._common import (
    LOG_2PI,
    LowRankCovariance,
    ObservationSet,
    condition,
    randn,
)
from diffem.priors._em_base import ExpectationMaximization
from diffem.priors.gaussian import GaussianPrior

# Number of float64 entries a chunk of (rows, D) arrays may hold, per array (about 32 MB).
_ROW_ENTRIES = 2**22


class DiagonalChunk(NamedTuple):
    """A chunk of observations through diagonal operators, in float64."""

    y: Tensor  # (b, D), pinned entries 0
    a: Tensor  # (b | 1, D), diagonal of A_i
    noise_var: Tensor  # (b | 1, D), pinned entries 1
    n_pinned: Tensor  # (b | 1,)


# Chunks of diagonal observations are kept between EM iterations up to this many (n * D) entries.
_CACHE_ENTRIES = 2**24


def diagonal_chunks(obs: ObservationSet, rows: int) -> Iterator[DiagonalChunk]:
    """Yields :class:`DiagonalChunk` s of at most ``rows`` observations, in order.

    When ``n * D`` is small enough the chunks are built once and cached on ``obs`` (EM asks for
    them at every iteration); otherwise they are rebuilt on the fly.
    """
    cache = getattr(obs, "_diagonal_cache", None)
    if cache is not None and cache[0] == rows:
        yield from cache[1]
        return
    keep = len(obs) * obs.d <= _CACHE_ENTRIES
    chunks = []
    op = obs.operator
    n, m = len(obs), obs.m
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        part: Operator = op if obs.shared else op[start:stop]
        a = part.as_diagonal().to(torch.float64)
        noise_var = part.noise_var.to(torch.float64).expand(-1, m)
        n_pinned = (m - part.n_observed()).to(torch.float64)
        chunk = DiagonalChunk(part.prepare(obs.y[start:stop]), a, noise_var, n_pinned)
        if keep:
            chunks.append(chunk)
        yield chunk
    if keep:
        obs._diagonal_cache = (rows, chunks)


def chunk_rows(d: int, rank: int) -> int:
    """Rows per chunk of the diagonal path: ``(rows, D)`` and ``(rows, r(r+1)/2)`` arrays of
    at most ``2**22`` entries each."""
    return max(1, _ROW_ENTRIES // max(1, d + rank * (rank + 1) // 2))


class Statistics:
    r"""Accumulated expected sufficient statistics of one E-step.

    ``ww`` :math:`= \sum_i E[w_i w_i^\top]` ``(r+1, r+1)``, ``xw`` :math:`= \sum_i E[x_i
    w_i^\top]` ``(D, r+1)``, ``xx`` :math:`= \sum_i E[x_i^2]` ``(D,)``, ``count`` ``n``, and the
    packed :math:`T^{(1)}, T^{(2)}` ``(D, r(r+1)/2)`` of the diagonal path.
    """

    def __init__(self, d: int, r: int, device: torch.device) -> None:
        kw = {"dtype": torch.float64, "device": device}
        self.r = r
        self.ww = torch.zeros(r + 1, r + 1, **kw)
        self.xw = torch.zeros(d, r + 1, **kw)
        self.xx = torch.zeros(d, **kw)
        self.count = 0
        iu = torch.triu_indices(r, r, device=device)
        self.iu = (iu[0], iu[1])
        self.t1 = torch.zeros(d, iu.shape[1], **kw)
        self.t2 = torch.zeros(d, iu.shape[1], **kw)
        self.deferred = False

    def add_moments(self, mean_x: Tensor, zhat: Tensor, sum_cov_z: Tensor) -> None:
        """Adds :math:`E[x_i] E[w_i]^\\top`, :math:`E[w_i w_i^\\top]` and :math:`E[x_i]^2`."""
        r = self.r
        self.ww[:r, :r] += zhat.mT @ zhat + sum_cov_z
        self.ww[:r, r] += zhat.sum(0)
        self.ww[r, :r] += zhat.sum(0)
        self.ww[r, r] += zhat.shape[0]
        self.xw[:, :r] += mean_x.mT @ zhat
        self.xw[:, r] += mean_x.sum(0)
        self.xx += (mean_x**2).sum(0)
        self.count += zhat.shape[0]

    def finish(self, factor: Tensor) -> None:
        r"""Adds the deferred :math:`\sum_i \operatorname{Cov}[x_i, z_i]` and
        :math:`\sum_i c_{ia}^2 F_a^\top K_i^{-1} F_a` of the diagonal path."""
        if not self.deferred:
            return
        i, j = self.iu
        # (F_a^T T_a)_k = sum_j F_aj T_a,jk over the packed upper triangle j <= k.
        cross = torch.zeros_like(factor)
        cross.index_add_(1, j, factor[:, i] * self.t1)
        off = i != j
        cross.index_add_(1, i[off], (factor[:, j] * self.t1)[:, off])
        self.xw[:, : self.r] += cross
        weight = torch.where(off, 2.0, 1.0).to(factor.dtype)
        self.xx += (factor[:, i] * factor[:, j] * self.t2 * weight).sum(-1)
        self.deferred = False


def _unpack(packed: Tensor, r: int, iu: tuple[Tensor, Tensor]) -> Tensor:
    out = packed.new_zeros(packed.shape[0], r, r)
    out[:, iu[0], iu[1]] = packed
    out[:, iu[1], iu[0]] = packed
    return out


class FactorEM(ExpectationMaximization):
    """EM for the factor model (module docstring): ``mean (D,)``, ``factor (D, r)`` and
    ``diag (D,)`` in float64, exact expected statistics, and the M-step of :func:`mstep`."""

    def __init__(
        self, obs: ObservationSet, mean: Tensor, factor: Tensor, diag: Tensor, ridge: float
    ) -> None:
        super().__init__(obs, ridge)
        self.mean, self.factor, self.diag = mean, factor, diag
        self.diagonal = obs.operator.as_diagonal() is not None

    def _e_step(self, statistics: bool) -> tuple[float, Statistics | None]:
        stats = Statistics(*self.factor.shape, self.factor.device) if statistics else None
        estep = self._estep_diagonal if self.diagonal else self._estep_dense
        return estep(stats), stats

    def _m_step(self, statistics: Statistics) -> None:
        self.mean, self.factor, self.diag = mstep(statistics, self.ridge)

    def _prior(self, dtype: torch.dtype) -> GaussianPrior:
        factor = canonical_factor(self.factor)
        return GaussianPrior.low_rank(self.mean.to(dtype), factor.to(dtype), self.diag.to(dtype))

    def _estep_diagonal(self, stats: Statistics | None) -> float:
        """Woodbury E-step through diagonal operators; returns the summed log-evidence and, if
        ``stats`` is given, accumulates the sufficient statistics into it."""
        mean, factor, diag = self.mean, self.factor, self.diag
        d, r = factor.shape
        iu = torch.triu_indices(r, r, device=factor.device)
        iu = (iu[0], iu[1])
        ff = factor[:, iu[0]] * factor[:, iu[1]]  # (D, P) packed F_a F_a^T
        eye = torch.eye(r, dtype=torch.float64, device=factor.device)
        total = 0.0
        for part in diagonal_chunks(self.obs, chunk_rows(d, r)):
            b = part.y.shape[0]
            a2 = part.a**2
            delta = a2 * diag + part.noise_var  # (b | 1, D)
            rho = part.y - part.a * mean  # (b, D)
            K = eye + _unpack((a2 / delta) @ ff, r, iu)  # (b | 1, r, r)
            L = torch.linalg.cholesky(K)
            arho = part.a * rho / delta  # A^T Delta^{-1} rho, (b, D)
            t = arho @ factor  # (b, r)
            zhat = torch.cholesky_solve(t.unsqueeze(-1), L).squeeze(-1)
            quad = (rho**2 / delta).sum(-1) - (t * zhat).sum(-1)
            logdet = torch.log(delta).sum(-1) + 2 * torch.log(L.diagonal(dim1=-2, dim2=-1)).sum(-1)
            logev = -0.5 * (quad + logdet + (d - part.n_pinned) * LOG_2PI)
            total += float(logev.expand(b).sum())
            if stats is None:
                continue
            kinv = torch.cholesky_inverse(L)  # (b | 1, r, r)
            c = part.noise_var / delta  # (b | 1, D)
            weight = b if c.shape[0] == 1 else 1
            mean_x = mean + diag * arho + c * (zhat @ factor.mT)
            stats.add_moments(mean_x, zhat, weight * kinv.sum(0))
            kinv_packed = kinv[:, iu[0], iu[1]]  # (b | 1, P)
            stats.t1 += weight * (c.mT @ kinv_packed)
            stats.t2 += weight * ((c * c).mT @ kinv_packed)
            stats.xx += weight * (diag * c).sum(0)
            stats.deferred = True
        if stats is not None:
            stats.finish(factor)
        return total

    def _estep_dense(self, stats: Statistics | None) -> float:
        """E-step through dense measurement-space matrices (any operator)."""
        mean, factor, diag = self.mean, self.factor, self.diag
        r = factor.shape[1]
        cov = LowRankCovariance(factor, diag)
        eye = torch.eye(r, dtype=torch.float64, device=factor.device)
        total = 0.0
        for part in self.obs.chunks(factor=4):
            cond = condition(mean, cov, part)
            total += float(cond.log_evidence.sum())
            if stats is None:
                continue
            b = len(part)
            AF = part.matrix @ factor  # (b | 1, M, r)
            u = cond.solve(cond.residual)  # S^{-1} rho, (b, M)
            zhat = (AF.mT @ u.unsqueeze(-1)).squeeze(-1)  # (b, r)
            W1 = torch.linalg.solve_triangular(cond.L, AF.expand(b, -1, -1), upper=False)
            WC = torch.linalg.solve_triangular(cond.L, cond.AC.expand(b, -1, -1), upper=False)
            mean_x = mean + cond.mean_shift()
            W1f = W1.reshape(-1, r)
            stats.add_moments(mean_x, zhat, b * eye - W1f.mT @ W1f)
            stats.xw[:, :r] += b * factor - WC.reshape(-1, WC.shape[-1]).mT @ W1f
            stats.xx += b * (diag + (factor**2).sum(-1)) - (WC**2).sum((0, 1))
        return total


def mstep(stats: Statistics, ridge: float) -> tuple[Tensor, Tensor, Tensor]:
    r"""Parameter-expanded regression M-step: new ``mean (D,)``, ``factor (D, r)``, ``diag (D,)``.

    The regression :math:`W' = [F', \mu']` and :math:`d'` of the module docstring are the M-step
    of a model whose latent is :math:`z \sim \mathcal{N}(\bar z, \Phi)` (PX-EM; Liu, Rubin &
    Wu, 1998, Biometrika), with :math:`\bar z = \frac1n \sum_i E[z_i]` and :math:`\Phi =
    \frac1n \sum_i E[z_i z_i^\top] - \bar z \bar z^\top`; mapping it back to
    :math:`z \sim \mathcal{N}(0, I)` gives :math:`F = F' \Phi^{1/2}` (Cholesky factor) and
    :math:`\mu = \mu' + F' \bar z`. This is still an EM step (monotone) but converges much
    faster than the plain one when much information is missing.
    """
    r, n = stats.r, stats.count
    ww = 0.5 * (stats.ww + stats.ww.mT)
    W = torch.linalg.solve(ww, stats.xw.mT).mT  # (D, r + 1) = xw ww^{-1}
    diag = (stats.xx - (W * stats.xw).sum(-1)) / n
    variance = stats.xx / n - (stats.xw[:, r] / n) ** 2
    floor = ridge * float(variance.mean().clamp_min(1e-300))
    zbar = ww[:r, r] / n
    phi = ww[:r, :r] / n - torch.outer(zbar, zbar)
    chol, info = torch.linalg.cholesky_ex(0.5 * (phi + phi.mT))
    factor, mean = W[:, :r], W[:, r]
    if int(info) == 0:
        mean = mean + factor @ zbar
        factor = factor @ chol
    return mean, factor, diag.clamp_min(floor)


# ---------------------------------------------------------------------- initialisation
def _backprojections(
    obs: ObservationSet, mean: Tensor, diagonal: bool, rows: int
) -> Iterator[Tensor]:
    r"""Chunks of :math:`A_i^\top (y_i - A_i \mu)`, shape ``(b, D)``."""
    if diagonal:
        for part in diagonal_chunks(obs, rows):
            yield part.a * (part.y - part.a * mean)
    else:
        for part in obs.chunks(factor=2):
            rho = part.y - (part.matrix @ mean.unsqueeze(-1)).squeeze(-1)
            yield (part.matrix.mT @ rho.unsqueeze(-1)).squeeze(-1)


def diagonal_moments(obs: ObservationSet, rows: int) -> tuple[Tensor, Tensor, Tensor]:
    r"""Mean, variances and coverage of observations through diagonal operators, in :math:`O(nD)`.

    Per feature, over the observed entries: :math:`\mu_{0,a} = \sum_i a_{ia} y_{ia} / \sum_i
    a_{ia}^2` and :math:`v_a = \sum_i (\rho_{ia}^2 - \sigma_{ia}^2) / \sum_i a_{ia}^2` with
    :math:`\rho_i = y_i - a_i \odot \mu_0` (floored at a hundredth of the raw spread; features
    never observed get the mean variance), and the coverage :math:`\kappa = \frac1{nD}
    \sum_{ia} a_{ia}^2`.
    """
    d, n = obs.d, len(obs)
    device = obs.y.device
    gram = torch.zeros(d, dtype=torch.float64, device=device)
    rhs = torch.zeros(d, dtype=torch.float64, device=device)
    for part in diagonal_chunks(obs, rows):
        gram += (part.a**2).expand(part.y.shape[0], -1).sum(0)
        rhs += (part.a * part.y).sum(0)
    seen = gram > 0
    mean = rhs / torch.where(seen, gram, 1.0)
    resid = torch.zeros_like(gram)
    noise = torch.zeros_like(gram)
    for part in diagonal_chunks(obs, rows):
        observed = (part.a != 0).to(torch.float64).expand(part.y.shape[0], -1)
        rho = part.y - part.a * mean
        resid += (rho**2 * observed).sum(0)
        noise += (part.noise_var * observed).sum(0)
    norm = torch.where(seen, gram, 1.0)
    var = torch.maximum(resid - noise, 1e-2 * resid) / norm
    fallback = var[seen].mean() if bool(seen.any()) else torch.ones((), dtype=torch.float64)
    var = torch.where(seen & (var > 0), var, fallback.clamp_min(1e-12))
    return mean, var, gram.mean() / n


def initial_factor(
    obs: ObservationSet,
    mean: Tensor,
    variance: Tensor,
    coverage: Tensor,
    rank: int,
    diagonal: bool,
    generator: torch.Generator | None,
    n_power: int = 4,
) -> tuple[Tensor, Tensor]:
    r"""Initial :math:`F_0 = U \operatorname{diag}(s)` and :math:`d_0` from the back-projected
    residuals :math:`z_i = A_i^\top (y_i - A_i \mu_0)`.

    :math:`U` spans the top-``rank`` eigenvectors of :math:`\frac1n \sum_i z_i z_i^\top`, found
    by a randomized range finder with ``n_power`` power iterations (Halko, Martinsson & Tropp,
    2011) at :math:`O(n D r)` cost per pass. For a mask observing each entry with probability
    :math:`\kappa`, that matrix is about :math:`\kappa^2 C + \kappa (1 - \kappa)
    \operatorname{diag}(C)`, so its eigenvalues :math:`\lambda_k` give the variances
    :math:`s_k^2 = \lambda_k / \kappa^2 - (1 - \kappa) \bar v / \kappa` along :math:`U`
    (floored at :math:`\bar v / 10`), with the per-feature variances ``variance`` :math:`v`
    ``(D,)`` and their mean :math:`\bar v`; then :math:`d_0 = \max(v - \operatorname{diag}(F_0
    F_0^\top), v / 100)`. ``coverage`` is :math:`\kappa = \frac1{nD} \sum_i \lVert A_i
    \rVert_F^2`.
    """
    d, n = obs.d, len(obs)
    device = mean.device
    k = min(d, rank + 8)
    # torch.svd_lowrank (and scikit-learn's randomized_svd) run the same range finder on the
    # whole (n, D) matrix of back-projections: 1.2 GB in float64 for n = 50 000 images of
    # 3x32x32; these power iterations stream it in chunks of at most 2**22 entries (32 MB).
    Q = torch.linalg.qr(randn((d, k), generator, torch.float64, device))[0]
    for _ in range(n_power):
        Y = torch.zeros(d, k, dtype=torch.float64, device=device)
        for z in _backprojections(obs, mean, diagonal, chunk_rows(d, rank)):
            Y += z.mT @ (z @ Q)
        Q = torch.linalg.qr(Y)[0]
    B = torch.zeros(k, k, dtype=torch.float64, device=device)
    for z in _backprojections(obs, mean, diagonal, chunk_rows(d, rank)):
        P = z @ Q
        B += P.mT @ P
    vals, vecs = torch.linalg.eigh(0.5 * (B + B.mT) / n)
    vals, vecs = vals[-rank:].flip(0), vecs[:, -rank:].flip(1)
    kappa = min(max(float(coverage), 1e-6), 1.0)
    vbar = float(variance.mean())
    var = (vals / kappa**2 - (1 - kappa) * vbar / kappa).clamp_min(0.1 * vbar)
    factor = (Q @ vecs) * var.sqrt()
    diag = torch.maximum(variance - (factor**2).sum(-1), 1e-2 * variance)
    return factor, diag


def canonical_factor(factor: Tensor) -> Tensor:
    """:math:`F` rotated to orthogonal columns of decreasing norm (same :math:`F F^\\top`), with
    a deterministic sign (largest entry of each column positive)."""
    U, s, _ = torch.linalg.svd(factor, full_matrices=False)
    idx = U.abs().argmax(0)
    signs = torch.sign(U[idx, torch.arange(U.shape[1], device=U.device)])
    signs = torch.where(signs == 0, 1.0, signs).to(U.dtype)
    return U * signs * s


def frobenius_coverage(obs: ObservationSet) -> Tensor:
    r""":math:`\frac1{nD} \sum_i \lVert A_i \rVert_F^2` through dense matrices."""
    total = 0.0
    for part in obs.chunks(factor=2):
        total += float((part.matrix**2).sum()) * (len(part) if part.matrix.shape[0] == 1 else 1)
    return torch.tensor(total / (len(obs) * obs.d), dtype=torch.float64, device=obs.y.device)
