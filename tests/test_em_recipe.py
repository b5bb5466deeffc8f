"""The EM loop's evidence, convergence and prior protocol: the evidence estimate of every
iteration, scikit-learn's early stopping (``tol``, ``n_iter_no_change``, ``converged_``,
``ConvergenceWarning``), ``keep_best``, and the one prior protocol behind every method."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning

from diffem import DiffusionPriorEM
from diffem.denoisers import MLPDenoiser
from diffem.em import DiffusionPrior
from diffem.operators import Dense
from diffem.priors import GaussianMixturePrior, GaussianPrior, Prior
from diffem.samplers import SMC

D = 2
N = 256


@pytest.fixture(scope="module")
def bimodal() -> tuple[np.ndarray, Dense, GaussianMixturePrior]:
    """Two well-separated modes in D = 2, each point seen through its own random 1x2
    projection with noise 0.05: the Gaussian initialisation is far from the truth."""
    rng = np.random.default_rng(0)
    truth = GaussianMixturePrior([0.5, 0.5], [[-1.5, 0.0], [1.5, 0.0]], [0.1 * np.eye(D)] * 2)
    X = truth.sample(N, generator=0)
    A = rng.normal(size=(N, 1, D))
    A /= np.linalg.norm(A, axis=-1, keepdims=True)
    op = Dense(A.astype(np.float32), noise_std=0.05)
    Y = (np.einsum("nmd,nd->nm", A, X) + 0.05 * rng.normal(size=(N, 1))).astype(np.float32)
    return Y, op, truth


def small_estimator(**kwargs) -> DiffusionPriorEM:
    params = dict(
        denoiser=MLPDenoiser(
            max_epochs=4, batch_size=128, lr=3e-3, module__hidden_features=32, module__n_blocks=1
        ),
        sampler=SMC(steps=8, particles=4),
        evidence_sampler=SMC(steps=8, particles=8),
        evidence_rows=64,
        n_iter=2,
        e_step_samples=2,
        device="cpu",
        random_state=0,
        n_transform_samples=2,
    )
    params.update(kwargs)
    return DiffusionPriorEM(**params)


# ---------------------------------------------------------------------- the SMC evidence
@pytest.mark.parametrize("noise", [0.1, 0.01])
def test_smc_evidence_is_consistent(noise: float) -> None:
    """On a Gaussian prior (exact denoiser), SMC's log-normalising constant converges to the
    exact log-evidence as the particles grow: its bias is negative, O(1/K)."""
    g = torch.Generator().manual_seed(0)
    d, m, n = 5, 2, 128
    L = torch.randn(d, d, generator=g) * 0.7
    prior = GaussianPrior(torch.randn(d, generator=g), L @ L.T + 0.1 * torch.eye(d))
    A = torch.randn(n, m, d, generator=g)
    op = Dense(A / A.norm(dim=-1, keepdim=True), noise_std=noise)
    y = op.apply(torch.as_tensor(prior.sample(n, generator=1))) + noise * torch.randn(n, m)
    exact = torch.as_tensor(prior.log_evidence(y, op)).double()
    errors = {}
    for K in (2, 32):
        smc = SMC(steps=32, particles=K, cg_iter=3, solver="dpmpp_2m", sigma_data=1.5)
        smc.sample(prior, y, op, generator=torch.Generator().manual_seed(3))
        error = torch.as_tensor(smc.log_evidence_).double() - exact
        errors[K] = (float(error.mean()), float(error.std()) / math.sqrt(n))
    (low, low_se), (high, high_se) = errors[2], errors[32]
    assert low < high - 3 * math.hypot(low_se, high_se)  # more particles: less bias
    assert high < 3 * high_se  # biased low (Jensen), never high
    assert abs(high) < 0.3 + 3 * high_se


# ---------------------------------------------------------------------- evidence along EM
def test_every_record_carries_the_evidence(bimodal) -> None:
    Y, op, _ = bimodal
    seen = []
    est = small_estimator(callback=lambda e, r: seen.append(dict(r)), tol=None).fit(Y, op)
    assert [r["iteration"] for r in seen] == [0, 1, 2]
    initial = seen[0]
    assert initial["log_evidence_exact"] == pytest.approx(est.initial_exact_log_evidence_)
    assert initial["log_evidence"] == pytest.approx(est.initial_log_evidence_)
    for record in est.history_:
        assert record["log_evidence_rows"] == 64
        for key in ("log_evidence", "log_evidence_std", "log_evidence_change"):
            assert math.isfinite(record[key])
        assert record["log_evidence_std"] > 0 and record["log_evidence_change_std"] > 0
    change = est.history_[1]["log_evidence"] - est.history_[0]["log_evidence"]
    assert est.history_[1]["log_evidence_change"] == pytest.approx(change, abs=1e-9)


def test_evidence_rises_within_its_error_bars(bimodal) -> None:
    """EM does not decrease the evidence: on the bimodal problem, with M-steps long enough to
    (nearly) maximise their objective, the first iteration raises the evidence above the
    Gaussian's by more than 2 standard errors of the paired change (same observations, same
    random numbers), and no iteration lowers it by more than 2 of them."""
    Y, op, _ = bimodal
    denoiser = MLPDenoiser(
        max_epochs=64, batch_size=128, lr=3e-3, module__hidden_features=32, module__n_blocks=1
    )
    evidence = SMC(steps=16, particles=64)  # 8 particles: standard errors of ~1 nat
    est = small_estimator(denoiser=denoiser, evidence_sampler=evidence, tol=None).fit(Y, op)
    changes = [r["log_evidence_change"] for r in est.history_]
    errors = [r["log_evidence_change_std"] for r in est.history_]
    assert changes[0] > 2 * errors[0], (changes, errors)
    for change, error in zip(changes, errors, strict=True):
        assert change > -2 * error, (changes, errors)


# ---------------------------------------------------------------------- convergence
def test_early_stopping_when_the_evidence_stops_rising(bimodal) -> None:
    Y, op, _ = bimodal
    # an improvement must exceed a huge tol: none does after the first iteration
    est = small_estimator(n_iter=5, tol=1e6, n_iter_no_change=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        est.fit(Y, op)
    assert est.converged_ and est.n_iter_ == 2 and len(est.history_) == 2


def test_convergence_warning_when_n_iter_runs_out(bimodal) -> None:
    Y, op, _ = bimodal
    with pytest.warns(ConvergenceWarning, match="n_iter = 1"):
        est = small_estimator(n_iter=1, tol=0.0, n_iter_no_change=3).fit(Y, op)
    assert not est.converged_ and est.n_iter_ == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        small_estimator(n_iter=1, tol=None).fit(Y, op)  # no early stopping: no warning


def test_keep_best_keeps_the_iteration_with_the_highest_evidence(bimodal) -> None:
    Y, op, _ = bimodal
    snapshots = {}

    def callback(est, record) -> None:
        if record["iteration"] > 0:
            state = est.denoiser_.module_.state_dict()
            snapshots[record["iteration"]] = {k: v.clone() for k, v in state.items()}

    est = small_estimator(n_iter=3, tol=None, keep_best=True, callback=callback)
    est.fit(Y, op)
    evidences = [r["log_evidence"] for r in est.history_]
    best = int(np.argmax(evidences)) + 1
    assert est.best_iteration_ == best and est.n_iter_ == 3
    kept = est.denoiser_.module_.state_dict()
    for name, value in snapshots[best].items():
        torch.testing.assert_close(kept[name], value)
    last = small_estimator(n_iter=3, tol=None, keep_best=False).fit(Y, op)
    assert last.best_iteration_ == 3


def test_lr_decay_scales_each_m_step(bimodal) -> None:
    """Iteration k's M-step trains at lr * lr_decay ** (k - 1)."""
    Y, op, _ = bimodal
    denoiser = MLPDenoiser(
        max_epochs=2,
        batch_size=128,
        lr=4e-3,
        lr_schedule="constant",
        module__hidden_features=8,
        module__n_blocks=1,
    )
    est = small_estimator(denoiser=denoiser, n_iter=3, tol=None, keep_best=False, lr_decay=0.5)
    est.fit(Y, op)
    lrs = est.denoiser_.history[:, "lr"]
    np.testing.assert_allclose(lrs, [4e-3] * 2 + [2e-3] * 2 + [1e-3] * 2, rtol=1e-6)


def test_first_epochs_lengthens_the_first_m_step_only(bimodal) -> None:
    Y, op, _ = bimodal
    denoiser = MLPDenoiser(
        max_epochs=1, batch_size=128, module__hidden_features=8, module__n_blocks=1
    )
    est = small_estimator(denoiser=denoiser, n_iter=3, tol=None, keep_best=False, first_epochs=3)
    est.fit(Y, op)
    assert [r["n_epochs"] for r in est.history_] == [3, 1, 1]
    assert est.denoiser_.max_epochs == 1


# ---------------------------------------------------------------------- the prior protocol
def test_both_priors_answer_the_same_protocol(bimodal) -> None:
    Y, op, _ = bimodal
    gaussian = small_estimator(n_iter=0).fit(Y, op)
    diffusion = small_estimator(n_iter=1, tol=None).fit(Y, op)
    assert isinstance(gaussian.prior_, GaussianPrior)
    assert isinstance(diffusion.prior_, DiffusionPrior)
    for est in (gaussian, diffusion):
        prior = est.prior_
        assert isinstance(prior, Prior)
        assert prior.sample(3, generator=0).shape == (3, D)
        assert prior.sample_posterior(Y[:4], op[:4], 2, generator=0).shape == (4, 2, D)
        assert prior.posterior_mean(Y[:4], op[:4]).shape == (4, D)
        assert prior.log_evidence(Y[:4], op[:4]).shape == (4,)
        # the estimator delegates to it
        np.testing.assert_array_equal(
            est.sample(5, random_state=1), prior.sample(5, generator=est._predict_generator(1))
        )


def test_mixture_initialisation(bimodal) -> None:
    """init_components > 1 starts EM from an extreme-deconvolution mixture: its exact
    evidence is higher than the Gaussian's on bimodal data, and it is the n_iter=0 prior."""
    Y, op, truth = bimodal
    gaussian = small_estimator(n_iter=0).fit(Y, op)
    mixture = small_estimator(n_iter=0, init_components=2).fit(Y, op)
    assert isinstance(mixture.prior_, GaussianMixturePrior)
    assert mixture.initial_exact_log_evidence_ > gaussian.initial_exact_log_evidence_ + 0.2
    exact = float(truth.log_evidence(Y, op).mean())
    assert abs(mixture.score(Y, op) - exact) < 0.1


def test_prior_samples_follow_the_probability_flow_ode() -> None:
    """DiffusionPrior.sample is deterministic given its starting noise (sample_eta=0) and, with
    the exact denoiser of a Gaussian, has that Gaussian's moments at 32 DPM-Solver++(2M) steps
    (tolerance: 6% on variances, from the sampling error of 4000 draws, ~2%, and the
    discretisation error, measured at 2-4%)."""
    variances = torch.tensor([0.01, 1.0, 4.0], dtype=torch.float64)
    gaussian = GaussianPrior(torch.tensor([0.5, -1.0, 0.0]), torch.diag(variances))
    sampler = SMC(steps=32, solver="dpmpp_2m", sigma_min=1e-3, sigma_max=1e2)
    prior = DiffusionPrior(gaussian, sampler, gaussian)
    assert prior.sample_eta == 0.0
    x = torch.as_tensor(prior.sample(4000, generator=0), dtype=torch.float64)
    np.testing.assert_allclose(x.var(0), variances, rtol=0.06)
    np.testing.assert_allclose(x.mean(0), [0.5, -1.0, 0.0], atol=4 * math.sqrt(4.0 / 4000))


def test_recipe_denoiser_for_images() -> None:
    """recipe_denoiser(image_shape) is the recommended image denoiser (a U-Net on that shape
    with the recipe's EMA and log-normal noise levels), trains on flattened images with a base
    (refine_init), and rejects a shape that is not (C, H, W); without a shape it is the MLP
    recipe."""
    from diffem.denoisers import UNetDenoiser
    from diffem.em import recipe_denoiser

    assert isinstance(recipe_denoiser(), MLPDenoiser)
    net = recipe_denoiser((1, 4, 4))
    assert isinstance(net, UNetDenoiser)
    assert net.image_shape == (1, 4, 4)
    assert net.sigma_distribution == "log_normal"
    assert net.ema_decay == recipe_denoiser().ema_decay
    base = GaussianPrior(torch.zeros(16), torch.eye(16))
    net.set_params(max_epochs=1, batch_size=32, random_state=0, base=base)
    x_t = torch.randn(8, 16)
    net.fit(torch.randn(64, 16))
    assert net(x_t, 0.5).shape == (8, 16)
    with pytest.raises(ValueError, match="image_shape"):
        recipe_denoiser((4, 4))
