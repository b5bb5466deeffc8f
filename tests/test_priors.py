"""Tests of diffem.priors: analytic priors and closed-form EM.

Every statistical check uses a fixed seed and a tolerance derived from its own sampling error
(standard errors from the sample, or the effective sample size of importance weights).
"""

from __future__ import annotations

import functools
import math
import pickle

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning

from diffem.operators import Dense, Identity, Mask
from diffem.priors import GaussianMixturePrior, GaussianPrior, fit_gaussian, fit_gaussian_mixture
from diffem.priors._common import ObservationSet
from diffem.priors.em import _MixtureEM

F64 = torch.float64
SIGMAS = [1e-3, 1e-1, 1.0, 10.0, 1e2]


# ---------------------------------------------------------------------------- helpers
def random_spd(d: int, gen: torch.Generator, ridge: float = 0.1) -> torch.Tensor:
    B = torch.randn(d, d, generator=gen, dtype=F64)
    return B @ B.T / d + ridge * torch.eye(d, dtype=F64)


def gaussian(d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(d, generator=gen, dtype=F64), random_spd(d, gen)


def mixture(d: int = 8, cov_type: str = "full", seed: int = 0) -> GaussianMixturePrior:
    gen = torch.Generator().manual_seed(seed)
    k = 3
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    means = 1.5 * torch.randn(k, d, generator=gen, dtype=F64)
    if cov_type == "full":
        covs = torch.stack([random_spd(d, gen, 0.2) for _ in range(k)])
    elif cov_type == "diag":
        covs = 0.2 + torch.rand(k, d, generator=gen, dtype=F64)
    else:
        covs = 0.2 + torch.rand(k, generator=gen, dtype=F64)
    return GaussianMixturePrior(weights, means, covs)


def denoise_bayes(mu, C, x_t, sigma):
    """E[x | x_t] and Cov[x | x_t] from the joint Gaussian of (x, x_t), in float64."""
    d = mu.shape[0]
    S = C + sigma**2 * torch.eye(d, dtype=F64)
    gain = torch.linalg.solve(S, C).T  # C S^{-1}
    mean = mu + (x_t - mu) @ gain.T
    cov = C - gain @ C
    return mean, cov


def make_operator(kind: str, n: int, d: int, gen: torch.Generator):
    """Per-sample operators: masks with pinned entries, or random dense projections."""
    if kind == "mask":
        mask = torch.rand(n, d, generator=gen) < 0.6
        mask[:, 0] = True
        mask[:, 1] = False  # always at least one pinned entry
        noise = 0.3 + 0.2 * torch.rand(n, generator=gen)
        return Mask(mask, noise_std=noise.to(F64))
    matrix = torch.randn(n, 3, d, generator=gen, dtype=F64) / math.sqrt(d)
    return Dense(matrix, noise_std=0.3)


def observe(op, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    y = op.apply(x) + op.noise_std * torch.randn(
        x.shape[0], op.n_measurements, generator=gen, dtype=F64
    )
    observed = op.observed.expand_as(y)
    return torch.where(observed, y, torch.full_like(y, float("nan")))


def brute_gaussian_posterior(mu, C, op, y):
    """Exact posterior means ``(n, D)``, covariances ``(n, D, D)`` and log-evidences ``(n,)``,
    restricting every observation to its observed entries (no pinned convention)."""
    A_all = op.matrix().to(F64).expand(y.shape[0], -1, -1)
    nv_all = (op.noise_std.to(F64) ** 2).expand(y.shape[0], op.n_measurements)
    obs_all = op.observed.expand(y.shape[0], op.n_measurements)
    means, covs, logevs = [], [], []
    for i in range(y.shape[0]):
        keep = obs_all[i]
        A, nv, yi = A_all[i][keep], nv_all[i][keep], y[i][keep]
        S = A @ C @ A.T + torch.diag(nv)
        K = torch.linalg.solve(S, A @ C).T
        means.append(mu + K @ (yi - A @ mu))
        covs.append(C - K @ A @ C)
        dist = torch.distributions.MultivariateNormal(A @ mu, covariance_matrix=S)
        logevs.append(dist.log_prob(yi))
    return torch.stack(means), torch.stack(covs), torch.stack(logevs)


def log_likelihood(op, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``log p(y_i | x_j)`` over observed entries, shape ``(n, N)`` for ``x`` of shape (N, D)."""
    out = []
    for i in range(y.shape[0]):
        opi = op[i] if len(op) > 1 else op
        Ax = opi.apply(x) if len(opi) == x.shape[0] else (opi.matrix()[0].to(F64) @ x.T).T
        keep = opi.observed.expand(1, op.n_measurements)[0]
        var = (opi.noise_std.to(F64) ** 2).expand(1, op.n_measurements)[0]
        r = (y[i] - Ax)[:, keep]
        out.append((-0.5 * r**2 / var[keep] - 0.5 * torch.log(2 * math.pi * var[keep])).sum(-1))
    return torch.stack(out)


# ---------------------------------------------------------------------------- denoiser
@pytest.mark.parametrize("sigma", SIGMAS)
def test_gaussian_denoiser_matches_bayes(sigma):
    mu, C = gaussian()
    prior = GaussianPrior(mu, C)
    gen = torch.Generator().manual_seed(1)
    x_t = mu + torch.randn(6, 8, generator=gen, dtype=F64) * (1 + sigma)
    mean, cov = denoise_bayes(mu, C, x_t, sigma)
    scale = float(torch.linalg.eigvalsh(C).max())
    torch.testing.assert_close(prior(x_t, sigma), mean, rtol=1e-9, atol=1e-9 * (1 + sigma))
    torch.testing.assert_close(
        prior.cov(x_t, torch.full((6,), sigma, dtype=F64)),
        cov.expand(6, -1, -1),
        rtol=1e-8,
        atol=1e-10 * scale,
    )


def test_low_rank_gaussian_agrees_with_full():
    gen = torch.Generator().manual_seed(2)
    d, r = 10, 3
    mu = torch.randn(d, generator=gen, dtype=F64)
    F = torch.randn(d, r, generator=gen, dtype=F64)
    diag = 0.05 + torch.rand(d, generator=gen, dtype=F64)
    low = GaussianPrior.low_rank(mu, F, diag)
    full = GaussianPrior(mu, F @ F.T + torch.diag(diag))
    x_t = torch.randn(len(SIGMAS), d, generator=gen, dtype=F64) * 3
    sigma = torch.tensor(SIGMAS, dtype=F64)
    torch.testing.assert_close(low(x_t, sigma), full(x_t, sigma), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(low.cov(x_t, sigma), full.cov(x_t, sigma), rtol=1e-8, atol=1e-12)
    for kind in ("mask", "dense"):
        op = make_operator(kind, 5, d, gen)
        y = observe(op, torch.as_tensor(full.sample(5, generator=3)), gen)
        np.testing.assert_allclose(
            low.posterior_mean(y, op), full.posterior_mean(y, op), rtol=1e-9, atol=1e-9
        )
        np.testing.assert_allclose(low.log_evidence(y, op), full.log_evidence(y, op), rtol=1e-9)
    assert low.rank == r and full.rank is None


@pytest.mark.parametrize("low_rank", [False, True])
@pytest.mark.parametrize("sigma", [1e-3, 1e2])
def test_gaussian_denoiser_float32_stable(sigma, low_rank):
    gen = torch.Generator().manual_seed(3)
    d = 64
    mu = torch.randn(d, generator=gen, dtype=F64)
    F = torch.randn(d, 8, generator=gen, dtype=F64) / 3
    diag = 1e-2 + 0.1 * torch.rand(d, generator=gen, dtype=F64)
    if low_rank:
        exact = GaussianPrior.low_rank(mu, F, diag)
    else:
        exact = GaussianPrior(mu, F @ F.T + torch.diag(diag))
    single = exact.to(dtype=torch.float32)
    x_t = mu + torch.randn(16, d, generator=gen, dtype=F64) * (1 + sigma)
    m32 = single(x_t.float(), sigma)
    c32 = single.cov(x_t.float(), sigma)
    assert m32.dtype == torch.float32 and c32.dtype == torch.float32
    assert torch.isfinite(m32).all() and torch.isfinite(c32).all()
    m64, c64 = exact(x_t, sigma), exact.cov(x_t, sigma)
    # float32 resolution of x_t (|x_t| ~ 1 + sigma) bounds the achievable accuracy
    eps = torch.finfo(torch.float32).eps
    assert (m32.double() - m64).abs().max() < 50 * eps * (1 + sigma) * d**0.5
    cov_scale = float(c64.diagonal(dim1=-2, dim2=-1).max())
    assert (c32.double() - c64).abs().max() < 50 * eps * cov_scale * d**0.5
    # the posterior covariance is positive: no cancellation at extreme sigma
    assert (c32.diagonal(dim1=-2, dim2=-1) > 0).all()


@pytest.mark.parametrize("cov_type", ["full", "diag", "spherical"])
def test_tweedie_covariance_is_sigma2_times_jacobian(cov_type):
    """Cov[x | x_t] = sigma^2 dE[x | x_t] / dx_t (Tweedie): autograd against the closed form."""
    priors = [mixture(4, cov_type), GaussianPrior(*gaussian(4))]
    gen = torch.Generator().manual_seed(4)
    for prior in priors:
        for sigma in (0.05, 0.7, 5.0):
            x_t = 2 * torch.randn(3, 4, generator=gen, dtype=F64)
            cov = prior.cov(x_t, sigma)
            for b in range(3):
                jac = torch.autograd.functional.jacobian(
                    lambda x, p=prior, s=sigma: p(x.unsqueeze(0), s)[0], x_t[b]
                )
                torch.testing.assert_close(sigma**2 * jac, cov[b], rtol=1e-7, atol=1e-10)
            assert torch.allclose(cov, cov.mT, atol=1e-12)


@pytest.mark.parametrize("cov_type", ["full", "diag", "spherical"])
def test_mixture_denoiser_vs_importance_sampling(cov_type):
    d = 3
    prior = mixture(d, cov_type, seed=5)
    N = 400_000
    x = torch.as_tensor(prior.sample(N, generator=6), dtype=F64)
    assert prior.sample(2, generator=6).dtype == np.float64
    gen = torch.Generator().manual_seed(7)
    for sigma in (0.3, 1.0):
        x_t = torch.as_tensor(prior.sample(4, generator=8), dtype=F64)
        x_t = x_t + sigma * torch.randn(4, d, generator=gen, dtype=F64)
        mean, cov = prior(x_t, sigma), prior.cov(x_t, sigma)
        for b in range(4):
            logw = -0.5 * ((x_t[b] - x) ** 2).sum(-1) / sigma**2
            w = torch.softmax(logw, 0)
            ess = 1 / (w**2).sum()
            assert ess > 100
            m_is = (w[:, None] * x).sum(0)
            dev = x - m_is
            c_is = (w[:, None, None] * dev[:, :, None] * dev[:, None, :]).sum(0)
            sd = cov[b].diagonal().sqrt()
            assert ((m_is - mean[b]).abs() / sd).max() < 5 / ess.sqrt()
            sd_c = (cov[b].diagonal()[:, None] * cov[b].diagonal()[None, :]).sqrt()
            assert ((c_is - cov[b]).abs() / sd_c).max() < 6 * (2 / ess).sqrt()


def test_mixture_with_one_component_is_gaussian():
    mu, C = gaussian(5)
    prior = GaussianMixturePrior([1.0], mu[None], C[None])
    ref = GaussianPrior(mu, C)
    gen = torch.Generator().manual_seed(9)
    x_t = torch.randn(4, 5, generator=gen, dtype=F64)
    torch.testing.assert_close(prior(x_t, 0.5), ref(x_t, 0.5))
    torch.testing.assert_close(prior.cov(x_t, 0.5), ref.cov(x_t, 0.5))
    op = make_operator("mask", 4, 5, gen)
    y = observe(op, x_t, gen)
    np.testing.assert_allclose(prior.log_evidence(y, op), ref.log_evidence(y, op), rtol=1e-10)
    np.testing.assert_allclose(prior.posterior_mean(y, op), ref.posterior_mean(y, op), atol=1e-10)


def test_mixture_denoiser_benchmark_size_is_fast_and_finite():
    """K = 25 unit-covariance components at D = 800 (the benchmark) in float32."""
    gen = torch.Generator().manual_seed(10)
    k, d = 25, 800
    prior = GaussianMixturePrior(
        torch.full((k,), 1 / k), 4 * torch.randn(k, d, generator=gen), torch.ones(k)
    )
    x_t = (4 * torch.randn(64, d, generator=gen)).requires_grad_(True)
    for sigma in (1e-3, 1.0, 1e2):
        out = prior(x_t, torch.full((64,), sigma))
        (grad,) = torch.autograd.grad(out.sum(), x_t)
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all() and torch.isfinite(grad).all()


# ---------------------------------------------------------------------------- posteriors
@pytest.mark.parametrize("kind", ["mask", "dense"])
def test_gaussian_posterior_exact(kind):
    mu, C = gaussian(8, seed=11)
    prior = GaussianPrior(mu, C)
    gen = torch.Generator().manual_seed(12)
    op = make_operator(kind, 6, 8, gen)
    y = observe(op, torch.as_tensor(prior.sample(6, generator=13)), gen)
    means, covs, logevs = brute_gaussian_posterior(mu, C, op, torch.nan_to_num(y))
    np.testing.assert_allclose(prior.posterior_mean(y, op), means.numpy(), atol=1e-10)
    np.testing.assert_allclose(prior.log_evidence(y, op), logevs.numpy(), rtol=1e-10)
    _, _, post_cov = prior._posterior_torch(y, op, need_cov=True)
    torch.testing.assert_close(post_cov, covs, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("kind", ["mask", "dense"])
@pytest.mark.parametrize("which", ["gaussian", "mixture"])
def test_posterior_vs_importance_sampling(kind, which):
    d, n, N = 8, 3, 400_000
    prior = GaussianPrior(*gaussian(d, seed=14)) if which == "gaussian" else mixture(d, seed=14)
    gen = torch.Generator().manual_seed(15)
    op = make_operator(kind, n, d, gen)
    y = observe(op, torch.as_tensor(prior.sample(n, generator=16)), gen)
    x = torch.as_tensor(prior.sample(N, generator=17))
    logw = log_likelihood(op, torch.nan_to_num(y), x)  # (n, N)
    mean = torch.as_tensor(prior.posterior_mean(y, op))
    logev = torch.as_tensor(prior.log_evidence(y, op))
    for i in range(n):
        w = torch.softmax(logw[i], 0)
        ess = 1 / (w**2).sum()
        assert ess > 200
        m_is = (w[:, None] * x).sum(0)
        sd = ((w[:, None] * (x - m_is) ** 2).sum(0)).sqrt()
        assert ((m_is - mean[i]).abs() / sd).max() < 5 / ess.sqrt()
        # log of the mean weight estimates log p(y); its standard error is sd(w) / (sqrt(N) E[w])
        log_mean = torch.logsumexp(logw[i], 0) - math.log(N)
        rel_sd = (N * w).std() / math.sqrt(N)
        assert abs(float(log_mean - logev[i])) < 5 * float(rel_sd) + 1e-3


@pytest.mark.parametrize("kind", ["mask", "dense"])
def test_sample_posterior_moments(kind):
    d, n, S = 8, 4, 20_000
    mu, C = gaussian(d, seed=18)
    prior = GaussianPrior(mu, C)
    gen = torch.Generator().manual_seed(19)
    op = make_operator(kind, n, d, gen)
    y = observe(op, torch.as_tensor(prior.sample(n, generator=20)), gen)
    means, covs, _ = brute_gaussian_posterior(mu, C, op, torch.nan_to_num(y))
    draws = prior.sample_posterior(y, op, n_samples=S, generator=21)
    assert draws.shape == (n, S, d) and draws.dtype == np.float64
    draws = torch.as_tensor(draws)
    for i in range(n):
        var = covs[i].diagonal()
        z = (draws[i].mean(0) - means[i]) / (var / S).sqrt()
        assert z.abs().max() < 4.5
        emp = torch.cov(draws[i].T)
        sd = ((var[:, None] * var[None, :] + covs[i] ** 2) / S).sqrt()
        assert ((emp - covs[i]).abs() / sd).max() < 5.5


def test_mixture_sample_posterior_moments():
    d, n, S = 4, 3, 20_000
    prior = mixture(d, seed=22)
    gen = torch.Generator().manual_seed(23)
    op = make_operator("dense", n, d, gen)
    y = observe(op, torch.as_tensor(prior.sample(n, generator=24)), gen)
    # exact mixture posterior: component posteriors by brute force, weights by evidences
    comps = [
        brute_gaussian_posterior(prior.means[k], prior.cov_matrices[k], op, y) for k in range(3)
    ]
    logits = torch.stack([c[2] for c in comps], -1) + prior.weights.log()
    w = torch.softmax(logits, -1)
    np.testing.assert_allclose(prior.posterior_weights(y, op), w.numpy(), atol=1e-10)
    mean = sum(w[:, k, None] * comps[k][0] for k in range(3))
    np.testing.assert_allclose(prior.posterior_mean(y, op), mean.numpy(), atol=1e-10)
    np.testing.assert_allclose(
        prior.log_evidence(y, op), torch.logsumexp(logits, -1).numpy(), rtol=1e-10
    )
    second = sum(
        w[:, k, None, None] * (comps[k][1] + comps[k][0][:, :, None] * comps[k][0][:, None, :])
        for k in range(3)
    )
    cov = second - mean[:, :, None] * mean[:, None, :]
    draws = torch.as_tensor(prior.sample_posterior(y, op, n_samples=S, generator=25))
    for i in range(n):
        var = cov[i].diagonal()
        z = (draws[i].mean(0) - mean[i]) / (var / S).sqrt()
        assert z.abs().max() < 4.5
        # mixtures have heavier tails than Gaussians: allow twice the Gaussian standard error
        sd = ((var[:, None] * var[None, :] + cov[i] ** 2) / S).sqrt()
        assert ((torch.cov(draws[i].T) - cov[i]).abs() / sd).max() < 10


def test_shared_operator_broadcasts_and_numpy_io():
    mu, C = gaussian(6, seed=26)
    prior = GaussianPrior(mu.numpy(), C.numpy())  # NumPy input -> float32 parameters
    assert prior.dtype == torch.float32
    op = Mask(np.array([1, 1, 0, 1, 0, 1], dtype=bool), noise_std=0.2)
    Y = np.random.RandomState(0).randn(5, 6)
    Y[:, 2] = np.nan
    lev = prior.log_evidence(Y, op)
    assert lev.shape == (5,) and lev.dtype == np.float32
    np.testing.assert_allclose(lev, prior.log_evidence(torch.as_tensor(Y), op.expand(5)), rtol=1e-6)
    assert prior.posterior_mean(Y, op).shape == (5, 6)
    assert prior.sample_posterior(Y, op, 3).shape == (5, 3, 6)
    # identity with no noise reproduces the observations
    ident = Identity(6, noise_std=0.0)
    x = prior.sample(4, generator=1)
    np.testing.assert_allclose(prior.posterior_mean(x, ident), x, atol=1e-4)
    np.testing.assert_allclose(prior.sample_posterior(x, ident, 2)[:, 1], x, atol=1e-4)


def test_reproducible_and_picklable():
    for prior in (GaussianPrior(*gaussian(5)), mixture(5)):
        a = prior.sample(3, generator=torch.Generator().manual_seed(0))
        b = prior.sample(3, generator=0)
        np.testing.assert_array_equal(a, b)
        op = make_operator("dense", 2, 5, torch.Generator().manual_seed(1))
        y = np.ones((2, 3))
        clone = pickle.loads(pickle.dumps(prior))
        np.testing.assert_array_equal(
            clone.sample_posterior(y, op, 4, generator=5), prior.sample_posterior(y, op, 4, 5)
        )
        x_t = torch.randn(2, 5, dtype=F64)
        torch.testing.assert_close(clone(x_t, 0.3), prior(x_t, 0.3))
        single = prior.to(dtype=torch.float32)
        assert single.dtype == torch.float32 and single.n_features == 5
        assert single(x_t.float(), 0.3).dtype == torch.float32


def test_validation_errors():
    mu, C = gaussian(4)
    with pytest.raises(ValueError, match="cov must have shape"):
        GaussianPrior(mu, C[:3])
    with pytest.raises(ValueError, match="positive semi-definite"):
        GaussianPrior(mu, -C)
    with pytest.raises(ValueError, match="symmetric"):
        GaussianPrior(mu, C + torch.triu(torch.ones(4, 4, dtype=F64), 1))
    with pytest.raises(ValueError, match="mean must be finite"):
        GaussianPrior(mu * float("nan"), C)
    with pytest.raises(ValueError, match=r"factor must have shape \(D, r\)"):
        GaussianPrior.low_rank(mu, torch.ones(3, 2), torch.ones(4))
    with pytest.raises(ValueError, match="diag must be non-negative"):
        GaussianPrior.low_rank(mu, torch.ones(4, 2), -torch.ones(4))
    with pytest.raises(ValueError, match="weights must sum to 1"):
        GaussianMixturePrior([0.5, 0.6], torch.zeros(2, 4), torch.ones(2))
    with pytest.raises(ValueError, match="non-negative"):
        GaussianMixturePrior([1.5, -0.5], torch.zeros(2, 4), torch.ones(2))
    with pytest.raises(ValueError, match=r"covs must have shape \(K, D, D\)"):
        GaussianMixturePrior([0.5, 0.5], torch.zeros(2, 4), torch.ones(3))
    with pytest.raises(ValueError, match="positive semi-definite"):
        GaussianMixturePrior([1.0], torch.zeros(1, 4), -C[None])
    prior = GaussianPrior(mu, C)
    op = Dense(torch.randn(3, 2, 4))
    with pytest.raises(ValueError, match=r"Y must have shape \(n, M\) = \(n, 2\)"):
        prior.log_evidence(np.zeros((3, 4)), op)
    with pytest.raises(ValueError, match="operator has 3 samples"):
        prior.posterior_mean(np.zeros((5, 2)), op)
    with pytest.raises(ValueError, match="n_features = 4"):
        prior.posterior_mean(np.zeros((3, 2)), Dense(torch.randn(2, 5)))
    with pytest.raises(ValueError, match="NaN or inf"):
        prior.posterior_mean(np.full((3, 2), np.nan), op)
    with pytest.raises(ValueError, match=r"x_t must have shape \(B, 4\)"):
        prior(torch.zeros(2, 3), 1.0)
    with pytest.raises(ValueError, match="n_samples"):
        prior.sample(0)


# ---------------------------------------------------------------------------- EM
def test_fit_gaussian_recovers_truth_and_increases_evidence():
    d, n = 8, 4000
    mu, C = gaussian(d, seed=27)
    truth = GaussianPrior(mu, C)
    gen = torch.Generator().manual_seed(28)
    x = torch.as_tensor(truth.sample(n, generator=29))
    mask = torch.rand(n, d, generator=gen) < 0.6
    op = Mask(mask, noise_std=0.1)
    y = observe(op, x, gen)
    fitted, history = fit_gaussian(y, op, n_iter=40, return_history=True, dtype=F64)
    assert len(history) == 41 and fitted.history_ == history
    diffs = np.diff(history)
    assert (diffs >= -1e-8).all(), diffs.min()
    # at (near) convergence the fit is at least as likely as the truth on its training data
    assert history[-1] >= float(truth.log_evidence(y, op).mean()) - 1e-3
    # each entry is estimated from ~0.6 n (means) or ~0.36 n (covariances) observed samples
    var = C.diagonal()
    assert ((fitted.mean - mu).abs() / (var / (0.6 * n)).sqrt()).max() < 5
    sd = ((var[:, None] * var[None, :] + C**2) / (0.36 * n)).sqrt()
    assert ((fitted.covariance - C).abs() / sd).max() < 5


def test_em_bookkeeping_tol_and_random_state():
    d, n = 4, 300
    gen = torch.Generator().manual_seed(40)
    truth = GaussianPrior(*gaussian(d, seed=41))
    op = Mask(torch.rand(n, d, generator=gen) < 0.7, noise_std=0.2)
    y = observe(op, torch.as_tensor(truth.sample(n, generator=42)), gen)
    full = fit_gaussian(y, op, n_iter=30, dtype=F64)
    assert (full.n_iter_, full.converged_, full.lower_bound_) == (30, False, full.history_[-1])
    # tol stops EM at the first rise below it, and the prior returned is the one evaluated last
    tol = 1e-4
    early = fit_gaussian(y, op, n_iter=30, tol=tol, dtype=F64)
    rises = np.diff(early.history_)
    assert early.converged_ and early.n_iter_ < 30 and rises[-1] < tol and (rises[:-1] >= tol).all()
    assert early.history_ == full.history_[: early.n_iter_ + 1]
    assert float(early.log_evidence(y, op).mean()) == pytest.approx(early.lower_bound_, rel=1e-6)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        fit_gaussian(y, op, n_iter=2, tol=tol)
    # random_state with scikit-learn semantics; generator= is the same parameter
    mixture_a = fit_gaussian_mixture(y, op, 2, n_iter=3, random_state=np.random.RandomState(3))
    mixture_b = fit_gaussian_mixture(y, op, 2, n_iter=3, generator=np.random.RandomState(3))
    torch.testing.assert_close(mixture_a.means, mixture_b.means)
    np.random.seed(5)  # noqa: NPY002 - random_state=None draws from NumPy's global state
    mixture_c = fit_gaussian_mixture(y, op, 2, n_iter=3, random_state=None)
    np.random.seed(5)  # noqa: NPY002
    torch.testing.assert_close(fit_gaussian_mixture(y, op, 2, n_iter=3).means, mixture_c.means)
    with pytest.raises(ValueError, match="n_iter must be an int"):
        fit_gaussian(y, op, n_iter=-1)


def test_fit_gaussian_low_rank():
    d, r, n = 12, 2, 3000
    gen = torch.Generator().manual_seed(30)
    F = torch.randn(d, r, generator=gen, dtype=F64)
    diag = 0.1 + 0.1 * torch.rand(d, generator=gen, dtype=F64)
    mu = torch.randn(d, generator=gen, dtype=F64)
    truth = GaussianPrior.low_rank(mu, F, diag)
    x = torch.as_tensor(truth.sample(n, generator=31))
    op = Mask(torch.rand(n, d, generator=gen) < 0.7, noise_std=0.05)
    y = observe(op, x, gen)
    fitted, history = fit_gaussian(y, op, n_iter=30, rank=r, return_history=True, dtype=F64)
    assert fitted.rank == r and fitted.factor.shape == (d, r)
    assert history[-1] > history[0] + 1.0
    assert history[-1] >= float(truth.log_evidence(y, op).mean()) - 0.05
    C = truth.cov_matrix
    rel = (fitted.cov_matrix - C).norm() / C.norm()
    assert rel < 0.1


def test_fit_gaussian_noiseless_pinned_dense_and_init():
    d, n = 6, 500
    mu, C = gaussian(d, seed=32)
    truth = GaussianPrior(mu, C)
    gen = torch.Generator().manual_seed(33)
    x = torch.as_tensor(truth.sample(n, generator=34))
    op = Mask(torch.rand(n, d, generator=gen) < 0.5, noise_std=0.0)
    y = observe(op, x, gen)
    fitted = fit_gaussian(y, op, n_iter=5)
    assert torch.isfinite(fitted.covariance).all() and fitted.dtype == torch.float32
    again = fit_gaussian(y, op, n_iter=3, init=fitted, dtype=F64)
    assert again.history_[0] == pytest.approx(fitted.history_[-1], rel=1e-5, abs=1e-4)
    dense = Dense(torch.randn(n, 3, d, generator=gen, dtype=F64), noise_std=0.1)
    yd = observe(dense, x, gen)
    fitted_d = fit_gaussian(yd, dense, n_iter=10, dtype=F64)
    assert (np.diff(fitted_d.history_) >= -1e-8).all()


def test_fit_gaussian_mixture_recovers_two_components():
    d, n = 5, 1500
    gen = torch.Generator().manual_seed(35)
    truth = GaussianMixturePrior(
        [0.3, 0.7],
        torch.stack([torch.full((d,), 3.0), torch.full((d,), -3.0)]).to(F64),
        torch.full((2,), 0.25, dtype=F64),
    )
    x = torch.as_tensor(truth.sample(n, generator=36))
    op = Dense(torch.randn(n, 2, d, generator=gen, dtype=F64), noise_std=0.1)
    y = observe(op, x, gen)
    fitted = fit_gaussian_mixture(y, op, n_components=2, n_iter=40, generator=0, dtype=F64)
    history = np.asarray(fitted.history_)
    assert (np.diff(history) >= -1e-6).all()
    order = torch.argsort(fitted.weights)
    np.testing.assert_allclose(fitted.weights[order].numpy(), [0.3, 0.7], atol=0.05)
    torch.testing.assert_close(fitted.means[order], truth.means, atol=0.25, rtol=0)
    variances = fitted.cov_matrices[order].diagonal(dim1=-2, dim2=-1)
    assert ((variances - 0.25).abs() < 0.15).all()
    assert history[-1] >= float(truth.log_evidence(y, op).mean()) - 0.05


def _masked_two_clusters(n: int = 400, d: int = 6, seed: int = 40):
    gen = torch.Generator().manual_seed(seed)
    truth = GaussianMixturePrior(
        [0.4, 0.6],
        torch.stack([torch.full((d,), 2.0), torch.full((d,), -2.0)]).to(F64),
        torch.full((2,), 0.5, dtype=F64),
    )
    x = torch.as_tensor(truth.sample(n, generator=seed + 1))
    op = Mask(torch.rand(n, d, generator=gen) < 0.5, noise_std=0.1)
    return observe(op, x, gen), op


def test_fit_gaussian_mixture_shrinkage_m_step_is_closed_form():
    """With one component the responsibilities are 1, so the shrunk update is the plain one
    pulled towards the start: C' = (n C_plain + nu C_0) / (n + nu), exactly."""
    y, op = _masked_two_clusters()
    n, d = y.shape
    gen = torch.Generator().manual_seed(42)
    a = torch.randn(d, d, generator=gen, dtype=F64)
    start = GaussianMixturePrior(
        [1.0], torch.zeros(1, d, dtype=F64), (a @ a.T / d + torch.eye(d, dtype=F64))[None]
    )
    fit = functools.partial(
        fit_gaussian_mixture, y, op, 1, n_iter=1, init=start, ridge=0.0, dtype=F64
    )
    plain, nu = fit(), 50.0
    shrunk = fit(shrinkage=nu)
    expected = (n * plain.cov_matrices + nu * start.cov_matrices) / (n + nu)
    torch.testing.assert_close(shrunk.cov_matrices, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(shrunk.means, plain.means, rtol=1e-12, atol=1e-12)
    tied = fit(shrinkage=1e12)
    torch.testing.assert_close(tied.cov_matrices, start.cov_matrices, rtol=0, atol=1e-8)
    with pytest.raises(ValueError, match="shrinkage"):
        fit(shrinkage=-1.0)


def test_fit_gaussian_mixture_rank_one_component_is_the_projected_gaussian_em():
    """With one component and ``rank``, the mixture's M-step is fit_gaussian's "exact" one with
    the same rank (full update, then principal-axis factoring): same prior, same history."""
    y, op = _masked_two_clusters()
    d, rank = y.shape[1], 2
    gen = torch.Generator().manual_seed(43)
    factor = torch.randn(d, rank, generator=gen, dtype=F64)
    diag = torch.rand(d, generator=gen, dtype=F64) + 0.5
    gauss = GaussianPrior.low_rank(torch.zeros(d, dtype=F64), factor, diag)
    start = GaussianMixturePrior([1.0], gauss.mean[None], gauss.cov_matrix[None])
    kw = {"n_iter": 4, "rank": rank, "dtype": F64}
    mixture = fit_gaussian_mixture(y, op, 1, init=start, **kw)
    expected = fit_gaussian(y, op, init=gauss, method="exact", **kw)
    torch.testing.assert_close(mixture.cov_matrices[0], expected.cov_matrix, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(mixture.means[0], expected.mean, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(mixture.history_, expected.history_, rtol=1e-10)
    assert expected.rank == rank  # so the mixture's component is rank r plus a diagonal
    with pytest.raises(ValueError, match="rank"):
        fit_gaussian_mixture(y, op, 1, rank=d + 1)


def test_fit_gaussian_mixture_shrinkage_never_lowers_the_penalised_evidence():
    r"""Shrinkage is a MAP-EM: n * mean log-evidence - nu/2 sum_k (logdet C_k +
    tr(C_k^{-1} C_0)) never decreases, step after step."""
    y, op = _masked_two_clusters()
    n = len(y)
    nu = 30.0
    prior = fit_gaussian_mixture(y, op, 2, n_iter=0, random_state=0, dtype=F64)
    target = (prior.weights[:, None, None] * prior.cov_matrices).sum(0)

    def objective(mixture, mean_log_evidence: float) -> float:
        covs = mixture.cov_matrices
        penalty = torch.logdet(covs) + torch.linalg.solve(covs, target.expand_as(covs)).diagonal(
            dim1=-2, dim2=-1
        ).sum(-1)
        return n * mean_log_evidence - 0.5 * nu * float(penalty.sum())

    em = _MixtureEM(
        ObservationSet(y, op, None, torch.device("cpu")),
        prior.weights,
        prior.means,
        prior.cov_matrices,
        0.0,
        nu,
    )
    torch.testing.assert_close(em.target, target)
    values = [objective(prior, prior.history_[-1])]
    for _ in range(6):
        step = em.fit(1, 0.0, F64)  # continues from the last parameters
        values.append(objective(step, step.history_[-1]))
    assert (np.diff(values) >= -1e-8 * np.abs(values[:-1])).all(), values
    assert values[-1] > values[0] + 1.0  # EM moved


@pytest.mark.slow
def test_fit_gaussian_memory_bounded_large_n():
    d, n = 64, 20_000
    gen = torch.Generator().manual_seed(37)
    x = torch.randn(n, d, generator=gen)
    op = Mask(torch.rand(n, d, generator=gen) < 0.5, noise_std=0.1)
    y = observe(op, x.double(), gen)
    fitted = fit_gaussian(y, op, n_iter=3)
    assert (np.diff(fitted.history_) >= -1e-6).all()
    assert (fitted.covariance.diagonal() - 1).abs().max() < 0.1


# ---------------------------------------------------------------------------- fast mixture denoiser
def _brute_force_denoiser(prior: GaussianMixturePrior, x_t: torch.Tensor, sigma) -> torch.Tensor:
    resp, comp_means, _ = prior._denoise(x_t, sigma)
    return (resp.unsqueeze(-1) * comp_means).sum(1)


def _mixture(cov_type: str, d: int = 12, k: int = 5, seed: int = 0) -> GaussianMixturePrior:
    gen = torch.Generator().manual_seed(seed)
    means = 6.0 * torch.randn(k, d, generator=gen, dtype=F64) + 20.0
    weights = torch.rand(k, generator=gen, dtype=F64) + 0.1
    shape = (k,) if cov_type == "spherical" else (k, d)
    covs = torch.rand(shape, generator=gen, dtype=F64) + 0.05
    return GaussianMixturePrior(weights / weights.sum(), means, covs)


@pytest.mark.parametrize("cov_type", ["spherical", "diag"])
@pytest.mark.parametrize("per_row_sigma", [False, True])
def test_mixture_matrix_product_denoiser_matches_brute_force(
    cov_type: str, per_row_sigma: bool
) -> None:
    prior = _mixture(cov_type)
    gen = torch.Generator().manual_seed(1)
    for s in SIGMAS:
        x0 = torch.as_tensor(prior.sample(40, generator=gen)).to(F64)
        sigma = torch.full((40,), s, dtype=F64)
        if per_row_sigma:
            sigma = sigma * torch.exp(torch.randn(40, generator=gen, dtype=F64))
        noise = torch.randn(x0.shape, generator=gen, dtype=F64)
        x_t = (x0 + sigma[:, None] * noise).requires_grad_()
        v = torch.randn(x0.shape, generator=gen, dtype=F64)
        fast = prior(x_t, sigma)
        slow = _brute_force_denoiser(prior, x_t, sigma)
        (g_fast,) = torch.autograd.grad(fast, x_t, v)
        (g_slow,) = torch.autograd.grad(slow, x_t, v)
        fast, slow = fast.detach(), slow.detach()
        assert float((fast - slow).abs().max() / slow.abs().max()) < 1e-10
        assert float((g_fast - g_slow).abs().max() / g_slow.abs().max()) < 1e-10


@pytest.mark.parametrize("cov_type", ["spherical", "diag"])
@pytest.mark.parametrize("sigma", [1e-3, 1e2])
def test_mixture_matrix_product_denoiser_float32(cov_type: str, sigma: float) -> None:
    prior64 = _mixture(cov_type, d=200, k=25)
    prior = prior64.to(dtype=torch.float32)
    gen = torch.Generator().manual_seed(2)
    x0 = torch.as_tensor(prior64.sample(64, generator=gen))
    x_t = (x0 + sigma * torch.randn(x0.shape, generator=gen, dtype=F64)).float().requires_grad_()
    out = prior(x_t, sigma)
    (grad,) = torch.autograd.grad(out, x_t, torch.ones_like(out))
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    exact = prior64(x_t.detach().to(F64), sigma)
    out = out.detach()
    assert float((out.double() - exact).abs().max()) < 1e-4 * float(exact.abs().max())
