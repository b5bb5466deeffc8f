"""The log-evidence estimator behind ``DiffusionPriorEM.score``: the probability-flow ODE solved
relative to a Gaussian, Hutchinson's trace estimator with the Gaussian as control variate, and
importance sampling with its standard error, against the exact densities and evidences of
Gaussian priors (used as exact denoisers)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffem import DiffusionPriorEM
from diffem.denoisers import MLPDenoiser
from diffem.em.estimator import recipe_sampler
from diffem.em.evidence import (
    GaussianFlow,
    importance_log_evidence,
    moment_matched_gaussian,
    ode_log_density,
    reference_sample_size,
)
from diffem.em.prior import DiffusionPrior
from diffem.operators import Identity, Mask
from diffem.priors import GaussianPrior
from diffem.samplers import MMPS

D = 8
F64 = torch.float64
SCHEDULE = {"sigma_min": 1e-3, "sigma_max": 100.0}


def gaussian(seed: int = 0, d: int = D) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(d, d))
    return rng.normal(size=d), A @ A.T / d + 0.1 * np.eye(d)


@pytest.fixture(scope="module")
def truth() -> GaussianPrior:
    return GaussianPrior(*gaussian())


@pytest.fixture(scope="module")
def other() -> GaussianPrior:
    """A reference Gaussian that differs from the truth: the ODE has work to do."""
    mean, cov = gaussian()
    return GaussianPrior(mean + 0.3, 1.5 * cov)


@pytest.fixture(scope="module")
def observed(truth: GaussianPrior) -> tuple[torch.Tensor, Mask]:
    """200 latents of the truth, 60% of the entries observed with noise 0.1."""
    rng = np.random.default_rng(1)
    x = truth.sample(200, generator=2)
    mask = rng.random(x.shape) < 0.6
    Y = np.where(mask, x + 0.1 * rng.normal(size=x.shape), 0.0).astype(np.float32)
    return torch.as_tensor(Y), Mask(mask, noise_std=0.1)


def exact_log_density(prior: GaussianPrior, x: torch.Tensor) -> torch.Tensor:
    return torch.distributions.MultivariateNormal(
        prior.mean.to(F64), prior.cov_matrix.to(F64)
    ).log_prob(x.to(F64))


# ---------------------------------------------------------------------- the ODE
@pytest.mark.parametrize("n_probes", [D, 2])
def test_ode_is_exact_when_the_denoiser_is_its_reference(truth, n_probes: int) -> None:
    """Relative to its own Gaussian the flow is the identity in whitened coordinates and the
    trace correction is zero: exact for any number of steps, and the control variate leaves
    Hutchinson's estimator no variance."""
    x = torch.as_tensor(truth.sample(100, generator=0))
    for steps in (1, 3):
        density = ode_log_density(
            truth, x, GaussianFlow.from_prior(truth), steps=steps, n_probes=n_probes, **SCHEDULE
        )
        assert (density.value - exact_log_density(truth, x)).abs().max() < 1e-3
        assert density.variance.abs().max() < 1e-8


def test_ode_converges_relative_to_another_gaussian(truth, other) -> None:
    """Second order in the steps (Heun); within 0.02 nats at 16 steps for a reference whose
    mean is off by 0.3 and covariance by a factor 1.5."""
    x = torch.as_tensor(truth.sample(200, generator=0))
    exact = exact_log_density(truth, x)
    flow = GaussianFlow.from_prior(other)
    errors = {
        steps: float(
            (ode_log_density(truth, x, flow, steps=steps, n_probes=D, **SCHEDULE).value - exact)
            .abs()
            .mean()
        )
        for steps in (4, 16)
    }
    assert errors[16] < 0.02
    assert errors[16] < 0.25 * errors[4]


def test_hutchinson_trace_is_unbiased_and_reports_its_variance(truth, other) -> None:
    x = torch.as_tensor(truth.sample(400, generator=0))
    flow = GaussianFlow.from_prior(other)
    exact = ode_log_density(truth, x, flow, steps=8, n_probes=D, **SCHEDULE).value
    noisy = ode_log_density(
        truth, x, flow, steps=8, n_probes=2, generator=torch.Generator().manual_seed(0), **SCHEDULE
    )
    noise = noisy.value - exact
    assert abs(float(noise.mean())) < 4 * float(noise.std()) / math.sqrt(len(x))
    # the probes' spread estimates the noise variance (an unbiased estimate per point)
    ratio = float(noisy.variance.mean()) / float(noise.var())
    assert 0.75 < ratio < 1.33  # the sampling error of 400 variances is about 10%


# ---------------------------------------------------------------------- importance sampling
def evidence(denoiser, Y, op, proposal, seed: int = 0, **kwargs):
    return importance_log_evidence(
        denoiser,
        Y,
        op,
        proposal,
        generator=torch.Generator().manual_seed(seed),
        **SCHEDULE,
        **kwargs,
    )


def test_importance_sampling_is_exact_under_its_own_gaussian(truth, observed) -> None:
    """Without inflation, every weight equals the evidence: no variance, no bias."""
    Y, op = observed
    result = evidence(truth, Y, op, truth, n_samples=4, inflation=1.0)
    exact = torch.as_tensor(truth.log_evidence(Y, op)).to(F64)
    assert (result.log_evidence - exact).abs().max() < 1e-3
    assert result.std.max() < 1e-3 and (result.ess > 4 - 1e-3).all()


def test_importance_sampling_matches_the_exact_evidence(truth, other, observed) -> None:
    """With proposals from another Gaussian, the mean estimate is within its standard error
    of the exact mean log-evidence, and the error falls with more proposals."""
    Y, op = observed
    exact = torch.as_tensor(truth.log_evidence(Y, op)).to(F64)
    near = GaussianPrior(truth.mean + 0.1, 1.2 * truth.cov_matrix)
    errors = {}
    for k in (2, 32):
        result = evidence(truth, Y, op, near, n_samples=k)
        assert ((result.ess >= 1 - 1e-9) & (result.ess <= k + 1e-6)).all()
        error = result.log_evidence - exact
        se_mean = float(result.std.pow(2).sum().sqrt()) / len(Y)
        errors[k] = float(error.abs().mean())
        if k == 32:
            assert abs(float(error.mean())) < 3 * se_mean + 0.01
    assert errors[32] < 0.5 * errors[2]
    # a far reference still gives a finite, lower-ESS answer
    far = evidence(truth, Y[:20], op[:20], other, n_samples=8)
    assert torch.isfinite(far.log_evidence).all() and torch.isfinite(far.std).all()


def test_standard_error_matches_the_spread_of_repeated_estimates(truth, observed) -> None:
    Y, op = observed
    Y, op = Y[:60], op[:60]
    near = GaussianPrior(truth.mean + 0.1, 1.2 * truth.cov_matrix)
    runs = [evidence(truth, Y, op, near, seed=seed, n_samples=16) for seed in range(8)]
    spread = torch.stack([r.log_evidence for r in runs]).std(0)
    reported = torch.stack([r.std for r in runs]).pow(2).mean(0).sqrt()
    ratio = float(spread.pow(2).mean().sqrt() / reported.pow(2).mean().sqrt())
    assert 0.6 < ratio < 1.5


def test_noiseless_identity_evidence_is_the_density(truth) -> None:
    """With y = x (no noise) the evidence is the prior density; the estimator floors the
    noise at a tiny std and recovers it."""
    x = torch.as_tensor(truth.sample(50, generator=3))
    near = GaussianPrior(truth.mean + 0.1, 1.2 * truth.cov_matrix)
    result = evidence(truth, x, Identity(D).expand(50), near, n_samples=16, min_noise_std=1e-3)
    exact = torch.as_tensor(truth.log_evidence(x, Identity(D))).to(F64)
    assert abs(float((result.log_evidence - exact).mean())) < 0.05


def test_moment_matched_gaussian() -> None:
    mean, cov = gaussian(seed=4)
    x = torch.as_tensor(np.random.default_rng(0).multivariate_normal(mean, cov, size=4000))
    fitted = moment_matched_gaussian(x)
    assert (fitted.mean - torch.as_tensor(mean)).abs().max() < 4 * math.sqrt(cov.max() / 4000)
    rel = torch.linalg.norm(fitted.cov_matrix - torch.as_tensor(cov)) / np.linalg.norm(cov)
    assert rel < 0.1
    # many samples: the empirical covariance, which keeps the small eigenvalues
    centred = x - x.mean(0)
    torch.testing.assert_close(fitted.cov_matrix, centred.mT @ centred / len(x))
    few = moment_matched_gaussian(x[:5])  # fewer samples than dimensions: still positive
    assert torch.linalg.eigvalsh(few.cov_matrix).min() > 0


def test_reference_sample_size() -> None:
    """At most a nat, D (D + 3) / (4 N), from the moment-matched Gaussian, and N >= 64 D,
    within the bounds."""
    assert reference_sample_size(8) == 4096
    assert reference_sample_size(100) == 6400
    assert reference_sample_size(256) == math.ceil(256 * 259 / 4)
    assert reference_sample_size(4096) == 32768
    for d in (100, 256, 360):
        assert d * (d + 3) / (4 * reference_sample_size(d)) <= 1.0


def smooth_field(side: int) -> GaussianPrior:
    """A stationary Gaussian field on a ``side x side`` grid (squared-exponential covariance,
    length scale 2 pixels, nugget 0.01): many small eigenvalues, as in images."""
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1)
    points = grid.reshape(-1, 2).astype(float)
    dist2 = ((points[:, None] - points[None]) ** 2).sum(-1)
    return GaussianPrior(np.zeros(side**2), np.exp(-dist2 / 8.0) + 0.01 * np.eye(side**2))


def test_reference_from_unconditional_samples_scores_a_smooth_field() -> None:
    """``proposal_``'s recipe with an exact prior: the Gaussian moment-matched to
    ``reference_sample_size(D)`` samples drawn by the diffusion sampler (the E-step's
    solver and steps). On a 10x10 field, whose many small eigenvalues make the proposals
    sensitive to the reference, the estimate is within its sampling error of the exact
    evidence."""
    field = smooth_field(10)
    prior = GaussianPrior(field.mean.float(), field.cov_matrix.float())
    rng = np.random.default_rng(0)
    x = prior.sample(100, generator=1)
    mask = rng.random(x.shape) < 0.6
    Y = torch.as_tensor(np.where(mask, x + 0.1 * rng.normal(size=x.shape), 0.0)).float()
    op = Mask(mask, noise_std=0.1)
    exact = torch.as_tensor(prior.log_evidence(Y, op)).to(F64)
    diffusion = DiffusionPrior(prior, recipe_sampler().set_params(**SCHEDULE), prior)
    n = reference_sample_size(prior.n_features)
    reference = moment_matched_gaussian(torch.as_tensor(diffusion.sample(n, generator=2)))
    result = evidence(prior, Y, op, reference, n_samples=16)
    error = float((result.log_evidence - exact).mean())
    se = float(result.std.pow(2).sum().sqrt()) / len(Y)
    assert abs(error) < 4 * se, (error, se)


# ---------------------------------------------------------------------- the estimator's methods
def test_score_samples_return_std(truth, observed) -> None:
    Y, op = observed
    Y, op = Y.numpy(), op
    gaussian_fit = DiffusionPriorEM(n_iter=0).fit(Y, op)
    values, std = gaussian_fit.score_samples(Y[:10], op[:10], return_std=True)
    assert values.shape == std.shape == (10,) and (std == 0).all()
    est = DiffusionPriorEM(
        MLPDenoiser(max_epochs=2, module__hidden_features=16, module__n_blocks=1),
        MMPS(steps=4),
        n_iter=1,
        n_score_samples=4,
        score_steps=2,
        random_state=0,
    ).fit(Y, op)
    assert est.proposal_.n_features == D and est.proposal_seconds_ > 0
    values, std = est.score_samples(Y[:10], op[:10], return_std=True)
    assert values.dtype == std.dtype == np.float32 and values.shape == std.shape == (10,)
    assert np.isfinite(values).all() and np.isfinite(std).all() and (std > 0).all()
    np.testing.assert_array_equal(values, est.score_samples(Y[:10], op[:10]))
    assert est.score(Y[:10], op[:10]) == pytest.approx(float(values.mean()), rel=1e-6)
