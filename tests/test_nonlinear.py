"""Nonlinear observation models: the operator and its linearisation, the samplers and the Gaussian
computations through it, the range-sensor example against Metropolis-Hastings, the estimator."""

from __future__ import annotations

import math
import pickle

import joblib
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from sklearn.model_selection import cross_val_score
from torch import Tensor

from diffem import DiffusionPriorEM
from diffem.datasets import make_range_sensors
from diffem.datasets.range_sensors import metropolis_reference, ranges, source_prior
from diffem.denoisers import MLPDenoiser
from diffem.operators import Dense, Linearized, Nonlinear
from diffem.priors import GaussianMixturePrior, GaussianPrior, fit_gaussian, fit_gaussian_mixture
from diffem.priors.linearize import linearize_observations
from diffem.samplers import DPS, MMPS, SMC, TMPD, PiGDM, random_walk_metropolis

F64 = torch.float64


def warp(x: Tensor, params: Tensor) -> Tensor:
    """A smooth nonlinear map ``(B, 3) -> (B, 4)`` with per-sample scales ``params`` ``(B, 2)``."""
    a, b = params[:, :1], params[:, 1:]
    return torch.cat(
        [torch.tanh(a * x[:, :2]), torch.sin(b * x[:, 1:2]) * x[:, 2:], (x**2).sum(-1, True)], -1
    )


def _range_problem(n: int, seed: int = 0) -> tuple[Tensor, Nonlinear, GaussianMixturePrior]:
    data = make_range_sensors(n, random_state=seed)
    return torch.as_tensor(data.Y, dtype=F64), data.operator.to(F64), data.prior.to(dtype=F64)


# ---------------------------------------------------------------------------- the operator
@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(0, 2**31 - 1), st.booleans())
def test_linearization_matches_finite_differences(n: int, seed: int, shared: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    params = 0.5 + torch.rand(1 if shared else n, 2, generator=g, dtype=F64)
    op = Nonlinear(warp, 3, 4, params, noise_std=0.1).to(F64)
    x, v = torch.randn(n, 3, generator=g, dtype=F64), torch.randn(n, 3, generator=g, dtype=F64)
    u = torch.randn(n, 4, generator=g, dtype=F64)
    jacobian = op.linearize(x)
    assert isinstance(jacobian, Linearized) and jacobian.shape == (n, 4, 3)
    torch.testing.assert_close(jacobian.value(), op.apply(x))
    eps = 1e-6  # central differences: error O(eps^2) against rounding O(1e-16 / eps)
    fd = (op.apply(x + eps * v) - op.apply(x - eps * v)) / (2 * eps)
    torch.testing.assert_close(jacobian.apply(v), fd, rtol=1e-7, atol=1e-8)
    # The adjoint: <u, J v> = <J^T u, v>, and J^T u is the gradient of u . f by differences.
    lhs = (u * jacobian.apply(v)).sum(-1)
    torch.testing.assert_close(lhs, (jacobian.adjoint(u) * v).sum(-1), rtol=1e-10, atol=1e-12)
    basis = torch.eye(3, dtype=F64)
    fd_adjoint = torch.stack(
        [
            ((u * (op.apply(x + eps * e) - op.apply(x - eps * e))).sum(-1)) / (2 * eps)
            for e in basis
        ],
        -1,
    )
    torch.testing.assert_close(jacobian.adjoint(u), fd_adjoint, rtol=1e-7, atol=1e-8)
    # The dense Jacobians that the Gaussian computations use.
    columns = torch.stack([jacobian.apply(e.expand(n, 3)) for e in basis], -1)
    torch.testing.assert_close(jacobian.matrix().expand(n, -1, -1), columns)


def test_linear_operators_are_their_own_linearisation() -> None:
    op = Dense(torch.randn(4, 3))
    assert op.linearize(torch.randn(5, 3)) is op and op.is_linear
    assert not Nonlinear(warp, 3, 4, torch.ones(1, 2)).is_linear


def test_indexing_expand_to_and_pickling() -> None:
    data = make_range_sensors(10, random_state=0)
    op = data.operator
    assert op.shape == (10, 3, 2) and len(op) == 10
    x = torch.as_tensor(data.X)
    for index in ([1, 4, 7], np.arange(10) % 3 == 0, slice(2, 5), (np.array([0, 9]), Ellipsis)):
        sub = op[index]
        rows = torch.arange(10)[index[0] if isinstance(index, tuple) else index]
        assert len(sub) == len(rows)
        torch.testing.assert_close(sub.apply(x[rows]), op.apply(x)[rows])
        torch.testing.assert_close(sub.params, op.params[rows])
    assert len(op[3]) == 1
    # Noise std per sample (n,) and per measurement (n, M) is indexed with the operator.
    sensors = torch.as_tensor(data.sensors)
    for std in (torch.linspace(0.1, 1.0, 10), torch.rand(10, 3) + 0.1):
        noisy = Nonlinear(ranges, 2, 3, sensors, noise_std=std)
        torch.testing.assert_close(
            noisy[[2, 5]].noise_var.expand(2, 3), (std**2).reshape(10, -1)[[2, 5]].expand(2, 3)
        )
    shared_noise = Nonlinear(ranges, 2, 3, sensors[:1], noise_std=torch.linspace(0.1, 1.0, 10))
    assert len(shared_noise) == 10 and shared_noise.linearize(x).noise_std.shape == (10, 1)
    # A shared operator (one set of sensors, or none) expands for cross-validation.
    shared = Nonlinear(ranges, 2, 3, torch.as_tensor(data.sensors[:1]), noise_std=0.3)
    assert len(shared.expand(10)) == 10 and len(shared.expand(10)[2:5]) == 3
    torch.testing.assert_close(shared.apply(x), ranges(x, torch.as_tensor(data.sensors[:1])))
    with pytest.raises(ValueError, match="expanded"):
        op.expand(20)
    # dtype moves; pickling and joblib keep the top-level forward, the params and the noise.
    op64 = op.to(F64)
    assert op64.params.dtype == F64 and op64.noise_std.dtype == F64
    for loads, dumps in ((pickle.loads, pickle.dumps), (joblib.load, None)):
        if dumps is None:
            import io

            buffer = io.BytesIO()
            joblib.dump(op, buffer)
            buffer.seek(0)
            again = loads(buffer)
        else:
            again = loads(dumps(op))
        assert again.forward is ranges and again.shape == op.shape
        torch.testing.assert_close(again.apply(x), op.apply(x))
    jacobian = op.linearize(x)
    jacobian.adjoint(torch.ones(10, 3))  # builds (and caches) the graph, which does not pickle
    again = pickle.loads(pickle.dumps(jacobian))
    torch.testing.assert_close(again.apply(x), jacobian.apply(x))
    torch.testing.assert_close(
        jacobian[2:4].adjoint(torch.ones(2, 3)), again.adjoint(torch.ones(10, 3))[2:4]
    )


def test_input_validation() -> None:
    with pytest.raises(TypeError, match="forward"):
        Nonlinear("ranges", 2, 3)
    with pytest.raises(ValueError, match="n_features"):
        Nonlinear(ranges, 0, 3)
    with pytest.raises(ValueError, match="params"):
        Nonlinear(ranges, 2, 3, torch.full((4, 3, 2), math.nan))
    with pytest.raises(ValueError, match="params"):
        Nonlinear(ranges, 2, 3, torch.tensor(1.0))
    with pytest.raises(ValueError, match="noise_std"):
        Nonlinear(ranges, 2, 3, torch.zeros(4, 3, 2), noise_std=-1.0)
    with pytest.raises(ValueError, match="noise_std"):
        Nonlinear(ranges, 2, 3, torch.zeros(4, 3, 2), noise_std=torch.ones(5))
    op = Nonlinear(ranges, 2, 4, torch.zeros(4, 3, 2))  # wrong n_measurements
    with pytest.raises(ValueError, match="forward must return"):
        op.apply(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="x must have shape"):
        op.apply(torch.zeros(4, 3))
    good = Nonlinear(ranges, 2, 3, torch.zeros(4, 3, 2))
    with pytest.raises(TypeError, match="linearise"):
        good.adjoint(torch.zeros(4, 3))
    with pytest.raises(TypeError, match="linearise"):
        good.matrix()
    # The mixture prior has no linearised posteriors: a clear error, not a wrong answer.
    with pytest.raises(TypeError, match="Nonlinear"):
        source_prior().posterior_mean(np.ones((4, 3)), good)
    with pytest.raises(TypeError, match="linear operator"):
        fit_gaussian_mixture(np.ones((4, 3)), good, 2, n_iter=1)


# ---------------------------------------------------------------------------- Gaussian priors
def _affine_pair(n: int = 40) -> tuple[Tensor, Nonlinear, Dense]:
    g = torch.Generator().manual_seed(3)
    A = torch.randn(n, 4, 3, generator=g, dtype=F64)
    x = torch.randn(n, 3, generator=g, dtype=F64)
    Y = (A @ x.unsqueeze(-1)).squeeze(-1) + 0.2 * torch.randn(n, 4, generator=g, dtype=F64)
    wrapped = Nonlinear(lambda x, a: (a @ x.unsqueeze(-1)).squeeze(-1), 3, 4, A, noise_std=0.2)
    return Y, wrapped.to(F64), Dense(A, noise_std=0.2).to(F64)


def test_gaussian_prior_through_a_wrapped_linear_operator_is_exact() -> None:
    Y, wrapped, dense = _affine_pair()
    prior = GaussianPrior(torch.ones(3, dtype=F64), torch.diag(torch.tensor([1.0, 2.0, 0.5])))
    for method in ("posterior_mean", "log_evidence"):
        np.testing.assert_allclose(
            getattr(prior, method)(Y, wrapped), getattr(prior, method)(Y, dense), rtol=1e-9
        )
    np.testing.assert_allclose(
        prior.sample_posterior(Y, wrapped, 3, generator=0),
        prior.sample_posterior(Y, dense, 3, generator=0),
        rtol=1e-9,
        atol=1e-12,
    )
    fit_w = fit_gaussian(Y, wrapped, n_iter=5, dtype=F64, return_history=True)
    fit_d = fit_gaussian(Y, dense, n_iter=5, dtype=F64, return_history=True)
    torch.testing.assert_close(fit_w[0].mean, fit_d[0].mean)
    torch.testing.assert_close(fit_w[0].covariance, fit_d[0].covariance)
    np.testing.assert_allclose(fit_w[1], fit_d[1], rtol=1e-10)


def test_iterated_linearisation_reaches_a_map_point() -> None:
    # At the fixed point, the linearised posterior mean x* is a stationary point of the MAP
    # objective 0.5 |y - f(x)|^2 / s^2 + 0.5 (x - mu)^T C^-1 (x - mu).
    Y, op, _ = _range_problem(64, seed=2)
    cov = torch.tensor([[1.9, -0.2], [-0.2, 1.6]], dtype=F64)
    prior = GaussianPrior(torch.tensor([0.2, 0.1], dtype=F64), cov)
    _, jacobian = linearize_observations(prior, Y, op, n_iter=200, rtol=1e-12)
    x = jacobian.point.clone().requires_grad_(True)
    v = x - prior.mean
    energy = 0.5 * ((Y - op.apply(x)) ** 2).sum() / 0.3**2
    energy = energy + 0.5 * (v * torch.linalg.solve(cov, v.T).T).sum()
    (grad,) = torch.autograd.grad(energy, x)
    assert grad.abs().max() < 1e-6
    # The default number of updates gets there up to a small fraction of the posterior spread.
    error = (torch.as_tensor(prior.posterior_mean(Y, op)) - x.detach()).abs()
    assert error.median() < 1e-6 and error.max() < 0.1


def test_linearised_gaussian_em_recovers_the_moments() -> None:
    data = make_range_sensors(1024, random_state=0)
    prior, history = fit_gaussian(data.Y, data.operator, n_iter=8, return_history=True)
    mean, cov = data.X.mean(0), np.cov(data.X.T)
    # Linearised EM is a Laplace approximation, not exact: the mean within four standard errors
    # of the latents' mean, the covariance of the right scale and orientation (the sampling
    # error alone is about 5% in Frobenius norm), the linearised evidence increased.
    np.testing.assert_allclose(prior.mean, mean, atol=4 * math.sqrt(cov.diagonal().max() / 1024))
    assert np.linalg.norm(prior.covariance.numpy() - cov) < 0.15 * np.linalg.norm(cov)
    assert history[-1] > history[0] and all(math.isfinite(h) for h in history)


# ---------------------------------------------------------------------------- samplers
SAMPLERS = [
    MMPS(steps=8, cg_iter=2),
    MMPS(steps=8, cg_iter=3, solver="dpmpp_2m", warm_start=True),
    DPS(steps=8),
    PiGDM(steps=8),
    TMPD(steps=8),
    SMC(steps=8, particles=4),
]


@pytest.mark.parametrize("sampler", SAMPLERS, ids=repr)
def test_samplers_through_a_wrapped_linear_operator_match_dense(sampler) -> None:
    Y, wrapped, dense = _affine_pair()
    prior = GaussianPrior(torch.zeros(3, dtype=F64), torch.eye(3, dtype=F64))
    a = sampler.sample(prior, Y, wrapped, generator=torch.Generator().manual_seed(0))
    b = sampler.sample(prior, Y, dense, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("sampler", SAMPLERS, ids=repr)
def test_samplers_finite_on_an_untrained_network(sampler) -> None:
    Y, op, _ = _range_problem(64)
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(4 * torch.randn(p.shape, generator=g))
    net = net.to(F64)

    def denoiser(x: Tensor, sigma: Tensor) -> Tensor:
        return 3 * net(torch.cat([x, sigma.log().unsqueeze(-1)], -1))

    x = sampler.sample(denoiser, Y, op, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()
    assert all(math.isfinite(v) for v in sampler.diagnostics_.values())


def _mh_reference(
    prior: GaussianMixturePrior, Y: Tensor, op: Nonlinear, chains: int, burn_in: int, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Posterior means ``(n, 2)`` by random-walk Metropolis-Hastings with the true prior, and
    their Monte Carlo standard errors from the spread of independent chains' means."""
    result = metropolis_reference(
        prior,
        Y,
        op,
        chains=chains,
        n_samples=24,
        burn_in=burn_in,
        thin=20,
        generator=torch.Generator().manual_seed(seed),
    )
    means = result.samples.mean(1).reshape(len(Y), chains, 2)
    return means.mean(1), means.std(1) / math.sqrt(chains)


def _smc_z_scores(
    prior: GaussianMixturePrior,
    Y: Tensor,
    op: Nonlinear,
    reference: tuple[Tensor, Tensor],
    particles: int,
    replicas: int,
) -> Tensor:
    """|z| of SMC's posterior means against the reference, from ``replicas`` independent runs
    per observation (one draw each); shape ``(n, 2)``."""
    n = len(Y)
    rows = torch.arange(n).repeat_interleave(replicas)
    sampler = SMC(steps=32, particles=particles, solver="dpmpp_2m", sigma_data=2.0)
    x = sampler.sample(prior, Y[rows], op[rows], generator=torch.Generator().manual_seed(1))
    x = x.reshape(n, replicas, 2)
    se = x.std(1) / math.sqrt(replicas)
    mean, se_ref = reference
    return ((x.mean(1) - mean) / torch.sqrt(se**2 + se_ref**2)).abs()


def test_smc_converges_to_metropolis_hastings_on_range_sensors() -> None:
    # Two arc-shaped posteriors under the true mixture prior (exact denoiser), on which the
    # linearised Gaussian likelihood of MMPS (SMC with one particle) puts mass in a wrong
    # cluster. The reference is a Metropolis-Hastings run with the true prior.
    Y, op, prior = _range_problem(8, seed=1)
    Y, op = Y[[1, 3]], op[[1, 3]]
    reference = _mh_reference(prior, Y, op, chains=48, burn_in=500)
    z = {k: _smc_z_scores(prior, Y, op, reference, k, replicas=96) for k in (1, 16)}
    # K = 1: a bias many standard errors wide; K = 16: z-scores of sampling noise alone
    # (P(max of 4 |z| > 3.5) < 0.2% without bias).
    assert z[1].max() > 6, z
    assert z[16].max() < 3.5, z


@pytest.mark.slow
def test_smc_converges_to_metropolis_hastings_on_more_observations() -> None:
    # Eight observations, some with several modes between which the random walk rarely moves
    # (their standard errors, from independent chains, are then large, and so is the bound).
    Y, op, prior = _range_problem(8, seed=1)
    reference = _mh_reference(prior, Y, op, chains=64, burn_in=20000, seed=2)
    z1 = _smc_z_scores(prior, Y, op, reference, 1, replicas=128)
    z64 = _smc_z_scores(prior, Y, op, reference, 64, replicas=128)
    assert z1.max() > 6, z1
    assert z64.max() < 4.0, z64  # 16 z-scores: P(max > 4) < 0.1% without bias


def test_metropolis_hastings_samples_a_known_gaussian() -> None:
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=F64)
    precision = torch.linalg.inv(cov)

    def log_density(x: Tensor) -> Tensor:
        return -0.5 * ((x @ precision) * x).sum(-1)

    chains = 200
    result = random_walk_metropolis(
        log_density,
        torch.zeros(chains, 2, dtype=F64),
        n_samples=20,
        step_size=(0.5, 1.5),
        burn_in=200,
        thin=10,
        generator=torch.Generator().manual_seed(0),
    )
    assert result.samples.shape == (chains, 20, 2) and result.acceptance.shape == (chains,)
    assert 0.1 < float(result.acceptance.mean()) < 0.9
    means = result.samples.mean(1)
    z = means.mean(0) / (means.std(0) / math.sqrt(chains))
    assert z.abs().max() < 4
    second = (result.samples**2).mean(1)
    z2 = (second.mean(0) - cov.diagonal()) / (second.std(0) / math.sqrt(chains))
    assert z2.abs().max() < 4
    with pytest.raises(ValueError, match="step_size"):
        random_walk_metropolis(log_density, torch.zeros(2, 2), 1, 0.0)
    with pytest.raises(ValueError, match="finite"):
        random_walk_metropolis(lambda x: torch.full((2,), -math.inf), torch.zeros(2, 2), 1, 0.1)


# ---------------------------------------------------------------------------- data and estimator
def test_range_sensor_data() -> None:
    data = make_range_sensors(2000, noise_std=0.2, random_state=0)
    X, Y, op = data
    assert X.shape == (2000, 2) and Y.shape == (2000, 3) and data.sensors.shape == (2000, 3, 2)
    residual = Y - op.apply(torch.as_tensor(X)).numpy()
    assert abs(residual.std() - 0.2) < 4 * 0.2 / math.sqrt(2 * residual.size)
    again = make_range_sensors(2000, noise_std=0.2, random_state=0)
    np.testing.assert_array_equal(again.Y, Y)
    assert repr(data) == "RangeSensorData(n_samples=2000, n_sensors=3)"
    with pytest.raises(ValueError, match="distance"):
        make_range_sensors(10, distance=-1.0)


def test_estimator_fits_transforms_and_scores_with_a_nonlinear_operator() -> None:
    data = make_range_sensors(256, random_state=0)
    Y, op = data.Y, data.operator
    gaussian = DiffusionPriorEM(n_iter=0, gaussian_iter=4, random_state=0).fit(Y, op)
    means = gaussian.transform(Y[:8], op[:8])
    assert means.shape == (8, 2) and np.isfinite(means).all()
    assert np.isfinite(gaussian.score(Y, op))
    denoiser = MLPDenoiser(max_epochs=2, batch_size=128, module__hidden_features=32)
    est = DiffusionPriorEM(
        denoiser=denoiser,
        sampler=MMPS(steps=8, cg_iter=2),
        n_iter=1,
        gaussian_iter=4,
        random_state=0,
        n_transform_samples=4,
        n_score_samples=4,
        score_steps=2,
    ).fit(Y, op)
    assert est.n_iter_ == 1 and np.isfinite(est.history_[0]["log_evidence"])
    assert est.sample(5).shape == (5, 2)
    draws = est.sample_posterior(Y[:3], op[:3], n_samples=2, random_state=1)
    assert draws.shape == (3, 2, 2)
    # A pickled fitted estimator samples the same posteriors through the unpickled operator.
    again = pickle.loads(pickle.dumps((est, op)))
    redraws = again[0].sample_posterior(Y[:3], again[1][:3], n_samples=2, random_state=1)
    np.testing.assert_array_equal(redraws, draws)
    assert clone(est).get_params()["sampler"].steps == 8 and not hasattr(clone(est), "n_iter_")
    assert np.isfinite(est.transform(Y[:4], op[:4])).all()
    assert np.isfinite(est.score_samples(Y[:4], op[:4])).all()
    # Cross-validation splits the per-sample sensors with Y.
    scores = cross_val_score(DiffusionPriorEM(n_iter=0, gaussian_iter=2), Y, op, cv=2)
    assert scores.shape == (2,) and np.isfinite(scores).all()
