"""Tests of the scalable low-rank-plus-diagonal Gaussian EM (``fit_gaussian(..., rank=r)``).

The expected sufficient statistics are checked against a brute-force joint Gaussian of
``(z, x)``; the fits against the exact dense path and against known low-rank truths.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from diffem.operators import Blur, Dense, Identity, Mask
from diffem.priors import GaussianPrior, fit_gaussian
from diffem.priors import _factor_em as fe
from diffem.priors._common import ObservationSet

F64 = torch.float64
CPU = torch.device("cpu")


def low_rank_truth(d: int, r: int, seed: int) -> GaussianPrior:
    gen = torch.Generator().manual_seed(seed)
    F = torch.randn(d, r, generator=gen, dtype=F64) * torch.linspace(2.0, 1.0, r, dtype=F64)
    diag = 0.05 + 0.05 * torch.rand(d, generator=gen, dtype=F64)
    mu = torch.randn(d, generator=gen, dtype=F64)
    return GaussianPrior.low_rank(mu, F, diag)


def observe(op, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    y = op.apply(x) + op.noise_std.to(F64) * torch.randn(
        x.shape[0], op.n_measurements, generator=gen, dtype=F64
    )
    return torch.where(op.observed.expand_as(y), y, torch.full_like(y, float("nan")))


def masked_problem(d, r, n, observed, noise, seed):
    truth = low_rank_truth(d, r, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.as_tensor(truth.sample(n, generator=seed + 2))
    op = Mask(torch.rand(n, d, generator=gen) < observed, noise_std=noise)
    return truth, op, observe(op, x, gen)


def max_principal_angle(U: torch.Tensor, V: torch.Tensor) -> float:
    """Largest principal angle (degrees) between the column spans of ``U`` and ``V``."""
    cos = torch.linalg.svdvals(torch.linalg.qr(U)[0].T @ torch.linalg.qr(V)[0])
    return math.degrees(math.acos(float(cos.min().clamp(max=1.0))))


def brute_statistics(mu, F, diag, op, y):
    """Sums of E[w w^T], E[x w^T], E[x^2] (w = (z, 1)) and of log p(y_i), from the joint
    Gaussian of (z, x) conditioned on each y_i, in float64."""
    d, r = F.shape
    n = y.shape[0]
    C = F @ F.T + torch.diag(diag)
    J = torch.zeros(r + d, r + d, dtype=F64)
    J[:r, :r] = torch.eye(r, dtype=F64)
    J[:r, r:], J[r:, :r], J[r:, r:] = F.T, F, C
    m0 = torch.cat([torch.zeros(r, dtype=F64), mu])
    A_all = op.matrix().to(F64).expand(n, -1, -1)
    nv_all = (op.noise_std.to(F64) ** 2).expand(n, op.n_measurements)
    obs_all = op.observed.expand(n, op.n_measurements)
    ww, xw, xx, logev = torch.zeros(r + 1, r + 1, dtype=F64), 0, 0, 0.0
    for i in range(n):
        keep = obs_all[i]
        H = torch.cat([torch.zeros(int(keep.sum()), r, dtype=F64), A_all[i][keep]], 1)
        S = H @ J @ H.T + torch.diag(nv_all[i][keep])
        gain = J @ H.T @ torch.linalg.inv(S)
        pm = m0 + gain @ (y[i][keep] - H @ m0)
        pc = J - gain @ H @ J
        w = torch.cat([pm[:r], torch.ones(1, dtype=F64)])
        Eww = torch.outer(w, w)
        Eww[:r, :r] += pc[:r, :r]
        Exw = torch.outer(pm[r:], w)
        Exw[:, :r] += pc[r:, :r]
        ww, xw, xx = ww + Eww, xw + Exw, xx + pm[r:] ** 2 + pc[r:, r:].diagonal()
        dist = torch.distributions.MultivariateNormal(H @ m0, covariance_matrix=S)
        logev += float(dist.log_prob(y[i][keep]))
    return ww, xw, xx, logev


# ---------------------------------------------------------------------------- operator hook
def test_as_diagonal_hook():
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(4, 6, generator=gen) < 0.5
    for op in (Identity(6, noise_std=0.1), Mask(mask, noise_std=0.2), Mask(mask[0])):
        a = op.as_diagonal()
        assert a.shape == (len(op), 6) and a.dtype == op.dtype
        torch.testing.assert_close(torch.diag_embed(a), op.matrix())
    dense = Dense(torch.randn(3, 6, generator=gen), noise_std=0.1)
    assert dense.as_diagonal() is None
    assert Blur(torch.ones(3, 3) / 9, (1, 4, 4), noise_std=0.1).as_diagonal() is None
    # survives indexing, dtype casts and pickling-style copies
    op = Mask(mask, noise_std=0.2)[1:3].to(F64)
    torch.testing.assert_close(op.as_diagonal(), mask[1:3].to(F64))


# ---------------------------------------------------------------------------- E-step
@pytest.mark.parametrize("kind", ["mask", "shared_mask", "identity", "dense"])
def test_estep_statistics_match_brute_force(kind):
    d, r, n = 7, 2, 6
    gen = torch.Generator().manual_seed(1)
    truth = low_rank_truth(d, r, seed=2)
    mu, F, diag = truth.mean, truth.factor, 0.1 + truth.diag
    x = torch.as_tensor(truth.sample(n, generator=3))
    if kind == "mask":
        noise = 0.2 + torch.rand(n, generator=gen, dtype=F64)
        op = Mask(torch.rand(n, d, generator=gen) < 0.6, noise_std=noise)
    elif kind == "shared_mask":
        op = Mask(torch.rand(d, generator=gen) < 0.6, noise_std=0.3)
    elif kind == "identity":
        op = Identity(d, noise_std=torch.tensor(0.3, dtype=F64))
    else:
        op = Dense(torch.randn(n, 3, d, generator=gen, dtype=F64), noise_std=0.2)
    y = observe(op, x, gen)
    ww, xw, xx, logev = brute_statistics(mu, F, diag, op, y)
    model = fe.FactorEM(ObservationSet(y, op, d, CPU), mu, F, diag, ridge=0.0)
    steps = [model._estep_dense]
    steps += [model._estep_diagonal] if op.as_diagonal() is not None else []
    for estep in steps:
        stats = fe.Statistics(d, r, CPU)
        total = estep(stats)
        assert total == pytest.approx(logev, abs=1e-9)
        assert stats.count == n
        torch.testing.assert_close(stats.ww, ww, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(stats.xw, xw, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(stats.xx, xx, atol=1e-10, rtol=1e-10)
        assert estep(None) == pytest.approx(total, rel=1e-12)
    # the log-evidences agree with the prior's exact ones
    prior = GaussianPrior.low_rank(mu, F, diag)
    assert float(prior.log_evidence(y, op).sum()) == pytest.approx(logev, abs=1e-6)


# ---------------------------------------------------------------------------- fits
@pytest.mark.parametrize("kind", ["mask", "identity"])
def test_factor_agrees_with_exact_path(kind):
    d, r, n = 12, 2, 3000
    truth = low_rank_truth(d, r, seed=4)
    gen = torch.Generator().manual_seed(5)
    x = torch.as_tensor(truth.sample(n, generator=6))
    if kind == "mask":
        op = Mask(torch.rand(n, d, generator=gen) < 0.7, noise_std=0.05)
    else:
        op = Identity(d, noise_std=torch.tensor(0.3, dtype=F64))
    y = observe(op, x, gen)
    exact = fit_gaussian(y, op, n_iter=60, rank=r, method="exact", dtype=F64)
    factor = fit_gaussian(y, op, n_iter=60, rank=r, method="factor", dtype=F64)
    assert factor.rank == r and factor.factor.shape == (d, r)
    # both maximise the same evidence over the same family
    assert factor.history_[-1] == pytest.approx(exact.history_[-1], abs=2e-3)
    C = exact.cov_matrix
    assert float((factor.cov_matrix - C).norm() / C.norm()) < 2e-3
    torch.testing.assert_close(factor.mean, exact.mean, atol=2e-3, rtol=0)
    # ... and the truth is within sampling error
    assert float((factor.cov_matrix - truth.cov_matrix).norm() / truth.cov_matrix.norm()) < 0.1
    # exact EM within the family: the evidence never decreases
    assert (np.diff(factor.history_) >= -1e-9 * abs(factor.history_[0])).all()


def test_factor_recovers_subspace_and_mean():
    d, r, n = 256, 8, 2000
    truth, op, y = masked_problem(d, r, n, observed=0.3, noise=0.05, seed=7)
    start = time.perf_counter()
    fitted, history = fit_gaussian(y, op, n_iter=25, rank=r, return_history=True, dtype=F64)
    seconds = time.perf_counter() - start
    print(f"D={d} r={r} n={n}: {seconds:.2f} s for 25 iterations")
    assert len(history) == 26 and fitted.history_ == history
    assert (np.diff(history) >= -1e-9 * abs(history[0])).all()
    assert max_principal_angle(fitted.factor, truth.factor) < 2.0
    # each mean entry is estimated from ~0.3 n observations
    se = (truth.cov_matrix.diagonal() / (0.3 * n)).sqrt()
    assert ((fitted.mean - truth.mean).abs() / se).max() < 5
    # the fit is at least as likely as the truth on its own training data
    truth_model = fe.FactorEM(
        ObservationSet(y, op, d, CPU), truth.mean, truth.factor, truth.diag, 0.0
    )
    truth_logev = truth_model._e_step(statistics=False)[0] / n
    assert history[-1] >= truth_logev - 0.5
    # columns are orthogonal, by decreasing norm
    gram = fitted.factor.T @ fitted.factor
    torch.testing.assert_close(gram, torch.diag(gram.diagonal()), atol=1e-8, rtol=0)
    assert (gram.diagonal().diff() <= 1e-10).all()


def test_factor_dense_operator_monotone_and_close_to_truth():
    d, r, n = 10, 2, 2000
    truth = low_rank_truth(d, r, seed=8)
    gen = torch.Generator().manual_seed(9)
    x = torch.as_tensor(truth.sample(n, generator=10))
    op = Dense(torch.randn(n, 4, d, generator=gen, dtype=F64) / math.sqrt(d), noise_std=0.05)
    y = observe(op, x, gen)
    fitted = fit_gaussian(y, op, n_iter=40, rank=r, method="factor", dtype=F64)
    history = np.asarray(fitted.history_)
    assert (np.diff(history) >= -1e-9 * abs(history[0])).all()
    assert history[-1] >= float(truth.log_evidence(y, op).mean()) - 0.05
    assert max_principal_angle(fitted.factor, truth.factor) < 10.0


def test_factor_noiseless_shared_init_and_reproducible():
    d, r, n = 16, 3, 400
    truth = low_rank_truth(d, r, seed=11)
    gen = torch.Generator().manual_seed(12)
    x = torch.as_tensor(truth.sample(n, generator=13))
    op = Mask(torch.rand(n, d, generator=gen) < 0.5, noise_std=0.0)
    y = observe(op, x, gen)
    fitted = fit_gaussian(y, op, n_iter=5, rank=r, method="factor")
    assert fitted.dtype == torch.float32 and torch.isfinite(fitted.factor).all()
    assert (fitted.diag > 0).all()
    again = fit_gaussian(y, op, n_iter=3, rank=r, init=fitted, dtype=F64, method="factor")
    assert again.history_[0] == pytest.approx(fitted.history_[-1], rel=1e-5, abs=1e-4)
    # deterministic by default, seeded by ``generator``
    twin = fit_gaussian(y, op, n_iter=5, rank=r, method="factor")
    torch.testing.assert_close(twin.factor, fitted.factor)
    other = fit_gaussian(y, op, n_iter=5, rank=r, generator=1, method="factor")
    assert other.history_[-1] == pytest.approx(fitted.history_[-1], abs=0.5)
    # a shared operator (batch 1) broadcasts
    shared = Identity(d, noise_std=0.1)
    ys = observe(shared, x, gen)
    fitted_s = fit_gaussian(ys, shared, n_iter=10, rank=r, dtype=F64, method="factor")
    assert (np.diff(fitted_s.history_) >= -1e-9 * abs(fitted_s.history_[0])).all()
    assert max_principal_angle(fitted_s.factor, truth.factor) < 5.0


def test_method_validation():
    y = torch.randn(5, 4, dtype=F64)
    op = Identity(4, noise_std=0.1)
    with pytest.raises(ValueError, match="method"):
        fit_gaussian(y, op, n_iter=1, rank=2, method="mc")
    with pytest.raises(ValueError, match="rank"):
        fit_gaussian(y, op, n_iter=1, method="factor")
    full = fit_gaussian(y, op, n_iter=1, method="auto")
    assert full.rank is None
    # "auto" keeps the exact path with a rank at small D, and takes the factor path above 64
    small = fit_gaussian(y, op, n_iter=2, rank=2, dtype=F64)
    exact = fit_gaussian(y, op, n_iter=2, rank=2, dtype=F64, method="exact")
    assert small.history_ == exact.history_
    y = torch.randn(5, 65, dtype=F64)
    op = Identity(65, noise_std=0.1)
    large = fit_gaussian(y, op, n_iter=2, rank=2, dtype=F64)
    factor = fit_gaussian(y, op, n_iter=2, rank=2, dtype=F64, method="factor")
    assert large.history_ == factor.history_


@pytest.mark.slow
def test_factor_benchmark_image_size():
    """D = 3072 (a 3x32x32 image), rank 32, n = 2000, masks observing 25%: prints the
    seconds per EM iteration (not asserted)."""
    torch.set_num_threads(1)
    d, r, n = 3072, 32, 2000
    truth, op, y = masked_problem(d, r, n, observed=0.25, noise=0.05, seed=14)
    start = time.perf_counter()
    fit_gaussian(y, op, n_iter=0, rank=r, dtype=F64)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    fitted = fit_gaussian(y, op, n_iter=30, rank=r, dtype=F64)
    per_iter = (time.perf_counter() - start - setup) / 30
    angle = max_principal_angle(fitted.factor, truth.factor)
    print(
        f"\nD={d} r={r} n={n} mask 25%: initialisation {setup:.2f} s, "
        f"{per_iter:.2f} s per EM iteration, max principal angle {angle:.2f} deg"
    )
    assert (np.diff(fitted.history_) >= -1e-9 * abs(fitted.history_[0])).all()
    assert angle < 5.0
