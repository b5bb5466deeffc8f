"""DiffusionPriorEM on a problem with a known answer: latents from a Gaussian in D = 8, each
observed through a random mask (60% of entries) with noise 0.1."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_estimator

from diffem import DiffusionPriorEM
from diffem.denoisers import MLPDenoiser
from diffem.operators import Identity, Mask
from diffem.priors import GaussianPrior, fit_gaussian
from diffem.samplers import MMPS

D = 8
N_TRAIN = 800
N_TEST = 100
NOISE = 0.1


class Problem:
    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        A = rng.normal(size=(D, D))
        self.cov = A @ A.T / D + 0.1 * np.eye(D)
        self.mean = rng.normal(size=D)
        n = N_TRAIN + N_TEST
        self.X = rng.multivariate_normal(self.mean, self.cov, size=n).astype(np.float32)
        self.mask = rng.random((n, D)) < 0.6
        noisy = self.X + NOISE * rng.normal(size=self.X.shape)
        self.Y = np.where(self.mask, noisy, np.nan).astype(np.float32)
        self.op = Mask(self.mask, noise_std=NOISE)
        self.truth = GaussianPrior(self.mean, self.cov)
        self.shifted = GaussianPrior(self.mean + 0.5, self.cov)

    @property
    def train(self) -> tuple[np.ndarray, Mask]:
        return self.Y[:N_TRAIN], self.op[:N_TRAIN]

    @property
    def test(self) -> tuple[np.ndarray, Mask]:
        return self.Y[N_TRAIN:], self.op[N_TRAIN:]


def rel_cov_error(samples: np.ndarray, cov: np.ndarray) -> float:
    return float(np.linalg.norm(np.cov(samples.T) - cov) / np.linalg.norm(cov))


@pytest.fixture(scope="module")
def problem() -> Problem:
    return Problem()


@pytest.fixture(scope="module")
def gaussian(problem: Problem) -> DiffusionPriorEM:
    return DiffusionPriorEM(n_iter=0, random_state=0).fit(*problem.train)


@pytest.fixture(scope="module")
def diffusion(problem: Problem) -> DiffusionPriorEM:
    """A short diffusion EM: 2 iterations of 40 epochs, MMPS with 128 steps (fewer steps bias
    the sampled variance downwards)."""
    denoiser = MLPDenoiser(
        max_epochs=40, batch_size=128, lr=2e-3, module__hidden_features=64, module__n_blocks=2
    )
    est = DiffusionPriorEM(
        denoiser,
        MMPS(steps=128),
        n_iter=2,
        random_state=0,
        n_score_samples=16,
        score_steps=12,
        n_transform_samples=8,
    )
    return est.fit(*problem.train)


# ---------------------------------------------------------------------- Gaussian prior (n_iter=0)
def test_gaussian_em_recovers_mean_and_covariance(problem: Problem, gaussian) -> None:
    prior = gaussian.gaussian_prior_
    assert gaussian.denoiser_ is prior and gaussian.n_iter_ == 0 and gaussian.history_ == []
    # exactly the closed-form EM
    reference = fit_gaussian(*problem.train, n_iter=16)
    np.testing.assert_allclose(prior.mean.numpy(), reference.mean.numpy(), rtol=1e-5, atol=1e-6)
    # within the sampling error of 800 observations, 60% of entries each
    mean_err = np.abs(prior.mean.numpy() - problem.mean)
    assert (mean_err < 4 * np.sqrt(np.diag(problem.cov) / (0.6 * N_TRAIN))).all()
    oracle = rel_cov_error(problem.X[:N_TRAIN], problem.cov)  # fully observed, noiseless
    err = np.linalg.norm(prior.cov_matrix.numpy() - problem.cov) / np.linalg.norm(problem.cov)
    assert err < max(0.25, 3 * oracle)
    # samples come from that Gaussian exactly
    samples = gaussian.sample(20000, random_state=1)
    assert np.abs(samples.mean(0) - prior.mean.numpy()).max() < 4 * math.sqrt(3.0 / 20000)
    assert rel_cov_error(samples, prior.cov_matrix.numpy()) < 0.05


def test_gaussian_score_is_exact(problem: Problem, gaussian) -> None:
    Y, op = problem.test
    exact = gaussian.gaussian_prior_.log_evidence(Y, op)
    np.testing.assert_allclose(gaussian.score_samples(Y, op), exact, rtol=1e-6)
    truth = problem.truth.log_evidence(Y, op).mean()
    shifted = problem.shifted.log_evidence(Y, op).mean()
    score = gaussian.score(Y, op)
    assert abs(score - truth) < 0.1
    assert score > shifted + 0.5


def test_gaussian_posterior_is_exact(problem: Problem, gaussian) -> None:
    Y, op = problem.test
    prior = gaussian.gaussian_prior_
    np.testing.assert_allclose(gaussian.transform(Y, op), prior.posterior_mean(Y, op), rtol=1e-5)
    draws = gaussian.sample_posterior(Y[:2], op[:2], n_samples=20000, random_state=0)
    expected = prior.posterior_mean(Y[:2], op[:2])
    assert np.abs(draws.mean(1) - expected).max() < 4 * math.sqrt(3.0 / 20000)


# ---------------------------------------------------------------------- diffusion prior
def test_diffusion_em_recovers_mean_and_covariance(problem: Problem, diffusion) -> None:
    assert diffusion.n_iter_ == 2 and isinstance(diffusion.denoiser_, MLPDenoiser)
    samples = diffusion.sample(4000, random_state=0)
    assert np.isfinite(samples).all()
    assert np.abs(samples.mean(0) - problem.mean).max() < 0.35
    assert rel_cov_error(samples, problem.cov) < 0.4
    # the learned prior is much closer to the truth than a standard normal is
    assert rel_cov_error(samples, problem.cov) < 0.5 * rel_cov_error(
        np.random.default_rng(0).normal(size=(4000, D)), problem.cov
    )


def test_diffusion_score_close_to_true_evidence(problem: Problem, diffusion) -> None:
    Y, op = problem.test
    truth = float(problem.truth.log_evidence(Y, op).mean())
    shifted = float(problem.shifted.log_evidence(Y, op).mean())
    values = diffusion.score_samples(Y, op)
    assert values.shape == (N_TEST,) and values.dtype == np.float32
    assert np.isfinite(values).all()
    score = diffusion.score(Y, op)
    assert abs(score - truth) < 0.3
    assert score > shifted + 0.5
    # reproducible with the estimator's random_state
    assert diffusion.score(Y, op) == score


def test_diffusion_transform_close_to_exact_posterior_mean(problem: Problem, diffusion) -> None:
    Y, op = problem.test
    estimate = diffusion.transform(Y, op)
    exact = problem.truth.posterior_mean(Y, op)
    rmse = np.sqrt(((estimate - exact) ** 2).mean())
    prior_rmse = np.sqrt(((problem.mean - exact) ** 2).mean())  # no information from Y
    assert rmse < 0.5 * prior_rmse


def test_history(diffusion) -> None:
    history = diffusion.history_
    assert [record["iteration"] for record in history] == [1, 2]
    for record in history:
        for key in ("e_step_seconds", "m_step_seconds", "evidence_seconds", "train_loss"):
            assert np.isfinite(record[key]) and record[key] >= 0
        for key in ("log_evidence", "log_evidence_std", "log_evidence_change"):
            assert np.isfinite(record[key])
        assert record["log_evidence_rows"] == 128
        assert record["n_epochs"] == 40
        assert 0 < record["sample_std"] < 3
        assert "sampler_cg_residual" in record and "sampler_wall_time" in record
    assert not diffusion.interrupted_ and diffusion.resumed_from_ is None
    assert diffusion.device_ == torch.device("cpu") and diffusion.n_features_in_ == D
    # the kept network (keep_best) has been trained by the M-steps up to its iteration
    assert diffusion.best_iteration_ in (1, 2)
    assert len(diffusion.denoiser_.history) == 40 * diffusion.best_iteration_
    # the fit's private state (E-step samples, bookkeeping) is not kept
    assert not hasattr(diffusion, "_e_samples") and not hasattr(diffusion, "_network")


def test_evidence_along_em_is_consistent(problem: Problem, diffusion) -> None:
    """On Gaussian data the Gaussian initialisation is the maximum-likelihood prior: the
    learned prior's estimated evidence must be close to the true prior's exact one, and the
    initial estimate close to the initialisation's exact evidence (the SMC estimate is biased
    low by O(1/K))."""
    Y, op = problem.train
    truth = float(problem.truth.log_evidence(Y, op).mean())
    exact = diffusion.initial_exact_log_evidence_
    assert abs(exact - truth) < 0.1  # the fitted Gaussian is close to the truth
    assert exact - 0.5 < diffusion.initial_log_evidence_ <= exact + 0.2
    for record in diffusion.history_:
        # 128 of the 800 observations: their sampling error is in log_evidence_std
        assert abs(record["log_evidence"] - truth) < 0.5 + 3 * record["log_evidence_std"]


# ---------------------------------------------------------------------- API behaviour
def test_shapes_and_dtypes(problem: Problem, gaussian) -> None:
    Y, op = problem.test
    for est in (gaussian, tiny_estimator(random_state=0).fit(*problem.train)):
        assert est.sample().shape == (1, D)
        s = est.sample(5)
        assert s.shape == (5, D) and s.dtype == np.float32
        p = est.sample_posterior(Y[:3], op[:3], n_samples=4)
        assert p.shape == (3, 4, D) and p.dtype == np.float32
        assert est.sample_posterior(Y[:3], op[:3]).shape == (3, 1, D)
        t = est.transform(Y[:6], op[:6])
        assert t.shape == (6, D) and t.dtype == np.float32 and np.isfinite(t).all()
        v = est.score_samples(Y[:6], op[:6])
        assert v.shape == (6,) and v.dtype == np.float32
        assert isinstance(est.score(Y[:6], op[:6]), float)
        # torch input, float64 input
        np.testing.assert_allclose(
            est.sample_posterior(torch.as_tensor(Y[:3], dtype=torch.float64), op[:3], 2, 7),
            est.sample_posterior(Y[:3], op[:3], 2, 7),
            rtol=1e-5,
            atol=1e-6,
        )


def test_torch_input_gives_the_same_fit(problem: Problem, gaussian) -> None:
    Y, op = problem.train
    est = DiffusionPriorEM(n_iter=0, random_state=0).fit(torch.as_tensor(Y).double(), op)
    np.testing.assert_allclose(
        est.gaussian_prior_.mean.numpy(), gaussian.gaussian_prior_.mean.numpy(), rtol=1e-5
    )


def test_operator_none_with_nan_is_an_imputer(problem: Problem) -> None:
    Y = problem.Y[:N_TRAIN]
    est = DiffusionPriorEM(n_iter=0, noise_std=NOISE).fit(Y)
    filled = est.transform(Y)
    assert np.isfinite(filled).all()
    # the operator inferred is Mask.from_nan(Y, noise_std=noise_std)
    expected = est.gaussian_prior_.posterior_mean(Y, Mask.from_nan(Y, noise_std=NOISE))
    np.testing.assert_allclose(filled, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        est.gaussian_prior_.mean.numpy(),
        fit_gaussian(Y, problem.op[:N_TRAIN], n_iter=16).mean.numpy(),
        rtol=1e-5,
    )
    missing = np.isnan(Y)
    truth = problem.X[:N_TRAIN]
    rmse = np.sqrt(((filled - truth)[missing] ** 2).mean())
    column_mean = np.nanmean(Y, axis=0)
    baseline = np.sqrt(((np.broadcast_to(column_mean, Y.shape) - truth)[missing] ** 2).mean())
    assert rmse < 0.9 * baseline  # better than mean imputation (the covariance helps)
    assert np.abs(filled - Y)[~missing].max() < 5 * NOISE  # observed entries barely move
    # without NaN and without operator: identity observations
    clean = DiffusionPriorEM(n_iter=0, noise_std=0.5).fit(problem.X)
    assert clean.n_features_in_ == D
    np.testing.assert_allclose(
        clean.transform(problem.X[:5]),
        clean.gaussian_prior_.posterior_mean(problem.X[:5], Identity(D, noise_std=0.5)),
        rtol=1e-5,
    )


def test_random_state_reproducibility(problem: Problem) -> None:
    Y, op = problem.Y[:200], problem.op[:200]
    a = tiny_estimator(random_state=0).fit(Y, op)
    b = tiny_estimator(random_state=0).fit(Y, op)
    np.testing.assert_array_equal(a.sample(10), b.sample(10))
    np.testing.assert_array_equal(a.sample(10, random_state=3), b.sample(10, random_state=3))
    np.testing.assert_array_equal(a.sample(10), a.sample(10, random_state=0))
    np.testing.assert_array_equal(
        a.sample_posterior(Y[:5], op[:5], 3, random_state=4),
        b.sample_posterior(Y[:5], op[:5], 3, random_state=4),
    )
    assert a.history_[0]["train_loss"] == b.history_[0]["train_loss"]
    assert not np.array_equal(a.sample(10, random_state=1), a.sample(10, random_state=2))
    c = tiny_estimator(random_state=1).fit(Y, op)
    assert not np.array_equal(a.sample(10, random_state=3), c.sample(10, random_state=3))
    free = tiny_estimator(n_iter=0).fit(Y, op)  # random_state=None: fresh draws
    assert not np.array_equal(free.sample(4), free.sample(4))


def test_verbose_output(problem: Problem, capfd: pytest.CaptureFixture[str]) -> None:
    Y, op = problem.Y[:100], problem.op[:100]
    tiny_estimator(verbose=0).fit(Y, op)
    assert capfd.readouterr().err == ""
    tiny_estimator(verbose=1).fit(Y, op)
    err = capfd.readouterr().err
    assert "DiffusionPriorEM" in err and "1/1" in err and "MMPS" not in err
    tiny_estimator(verbose=2, n_iter=2).fit(Y, op)  # the first E-step is exact
    err = capfd.readouterr().err
    assert "DiffusionPriorEM" in err and "M-step" in err and "MMPS" in err


def test_fit_transform_matches_fit_then_transform(problem: Problem) -> None:
    Y, op = problem.Y[:100], problem.op[:100]
    out = DiffusionPriorEM(n_iter=0).fit_transform(Y, op)
    ref = DiffusionPriorEM(n_iter=0).fit(Y, op).transform(Y, op)
    np.testing.assert_allclose(out, ref, rtol=1e-6)


def test_low_rank_gaussian_initialisation(problem: Problem) -> None:
    est = DiffusionPriorEM(n_iter=0, gaussian_rank=3).fit(*problem.train)
    assert est.gaussian_prior_.rank == 3
    assert np.isfinite(est.score(*problem.test))
    assert est.sample(3).shape == (3, D)


@pytest.mark.slow
def test_longer_diffusion_em_is_accurate(problem: Problem) -> None:
    """More EM iterations, epochs and sampling steps: a tighter fit of the known prior."""
    denoiser = MLPDenoiser(
        max_epochs=100, batch_size=128, lr=2e-3, module__hidden_features=128, module__n_blocks=2
    )
    est = DiffusionPriorEM(
        denoiser, MMPS(steps=256), n_iter=4, random_state=0, n_score_samples=32, score_steps=16
    ).fit(*problem.train)
    samples = est.sample(8000, random_state=0)
    assert np.abs(samples.mean(0) - problem.mean).max() < 0.2
    assert rel_cov_error(samples, problem.cov) < 0.25
    Y, op = problem.test
    truth = float(problem.truth.log_evidence(Y, op).mean())
    assert abs(est.score(Y, op) - truth) < 0.2


def test_first_e_step_is_the_exact_gaussian_posterior(problem: Problem) -> None:
    Y, op = problem.Y[:200], problem.op[:200]
    captured = {}

    def callback(estimator, record) -> None:
        if record.get("iteration") == 0:
            captured.update(record)

    est = tiny_estimator(random_state=0, callback=callback, e_step_samples=3).fit(Y, op)
    assert est.n_iter_ == 1 and captured["iteration"] == 0
    # The exact posterior samples' spread equals that of exact draws from the same prior.
    exact = est.gaussian_prior_.sample_posterior(Y, op, 3, generator=1).reshape(-1, D)
    assert abs(captured["sample_std"] - float(exact.std(axis=0).mean())) < 0.05
    assert captured["log_evidence_exact"] == est.initial_exact_log_evidence_


def test_smc_is_a_drop_in_e_step_sampler(problem: Problem) -> None:
    from diffem.samplers import SMC

    Y, op = problem.Y[:100], problem.op[:100]
    est = tiny_estimator(n_iter=2, sampler=SMC(steps=4, particles=3), random_state=0).fit(Y, op)
    record = est.history_[1]
    assert 1.0 <= record["sampler_ess"] <= 3.0 and record["sampler_resamples"] >= 0
    assert est.sampler_.sigma_data == est.sigma_data_
    posterior = est.sample_posterior(Y[:3], op[:3], n_samples=2, random_state=0)
    assert posterior.shape == (3, 2, D) and np.isfinite(posterior).all()
