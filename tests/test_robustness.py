"""Robustness of DiffusionPriorEM: input validation as users trigger it, interruption,
divergence and checkpoint/resume."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_denoiser as _tiny_denoiser
from conftest import tiny_estimator as _tiny_estimator
from sklearn.exceptions import NotFittedError
from skorch.callbacks import Callback

from diffem import DiffusionPriorEM
from diffem.denoisers import DivergenceError, MLPDenoiser
from diffem.operators import Dense, Identity, Mask
from diffem.samplers import MMPS


def tiny_denoiser(**kwargs) -> MLPDenoiser:
    """The shared tiny denoiser with two mini-batches per epoch of the data below."""
    return _tiny_denoiser(**{"batch_size": 32, **kwargs})


def tiny_estimator(**kwargs) -> DiffusionPriorEM:
    """The shared tiny estimator, seeded, with :func:`tiny_denoiser`."""
    return _tiny_estimator(**{"random_state": 0, "denoiser": tiny_denoiser(), **kwargs})


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, Mask]:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(64, 4)).astype(np.float32)
    mask = rng.random((64, 4)) < 0.7
    Y = np.where(mask, X + 0.1 * rng.normal(size=X.shape), np.nan).astype(np.float32)
    return Y, Mask(mask, noise_std=0.1)


@pytest.fixture(scope="module")
def fitted(data) -> DiffusionPriorEM:
    Y, op = data
    return tiny_estimator(n_iter=0).fit(Y, op)


@pytest.fixture(scope="module")
def reference_one_iteration(data) -> np.ndarray:
    """Prior samples of a clean one-iteration fit (what an estimator stopped after its first
    iteration must reproduce exactly)."""
    Y, op = data
    return tiny_estimator(n_iter=1).fit(Y, op).sample(16, random_state=5)


# ---------------------------------------------------------------------- validation
class TestValidation:
    def test_Y_not_2d(self) -> None:
        with pytest.raises(ValueError, match=r"(?s)Y must be a 2-D array.*Reshape your data"):
            DiffusionPriorEM(n_iter=0).fit(np.zeros(5))
        with pytest.raises(ValueError, match="Y must be a 2-D array"):
            DiffusionPriorEM(n_iter=0).fit(np.zeros((4, 3, 2)))
        with pytest.raises(ValueError, match="Y must be a 2-D array"):
            DiffusionPriorEM(n_iter=0).fit(torch.zeros(5))

    def test_Y_empty(self) -> None:
        with pytest.raises(ValueError, match=r"Y .*0 sample"):
            DiffusionPriorEM(n_iter=0).fit(np.zeros((0, 3)))
        with pytest.raises(ValueError, match=r"Y .*0 feature"):
            DiffusionPriorEM(n_iter=0).fit(np.zeros((5, 0)))
        with pytest.raises(ValueError, match=r"Y .*1 sample"):
            DiffusionPriorEM(n_iter=0).fit(np.zeros((1, 3)))

    def test_Y_not_numeric(self) -> None:
        with pytest.raises((TypeError, ValueError), match="Y"):
            DiffusionPriorEM(n_iter=0).fit(np.array([["a", "b"], ["c", "d"]]))
        with pytest.raises(TypeError, match="Y"):
            DiffusionPriorEM(n_iter=0).fit(np.array([[{}, 1.0], [2.0, 3.0]], dtype=object))
        with pytest.raises(TypeError, match="Y"):
            DiffusionPriorEM(n_iter=0).fit("not an array")
        with pytest.raises(ValueError, match="Complex"):
            DiffusionPriorEM(n_iter=0).fit(np.ones((4, 2), dtype=complex))

    def test_sparse_rejected(self) -> None:
        import scipy.sparse as sp

        with pytest.raises(TypeError, match="sparse"):
            DiffusionPriorEM(n_iter=0).fit(sp.csr_matrix(np.eye(4)))

    def test_nan_or_inf_where_observed(self) -> None:
        Y = np.random.default_rng(0).normal(size=(10, 3))
        Y[2, 1] = np.nan
        with pytest.raises(ValueError, match=r"Y has NaN.*observes"):
            DiffusionPriorEM(n_iter=0).fit(Y, Identity(3, noise_std=0.1))
        Y_inf = np.ones((10, 3))
        Y_inf[0, 0] = np.inf
        with pytest.raises(ValueError, match=r"Y .*infinity"):
            DiffusionPriorEM(n_iter=0).fit(Y_inf)
        # NaN at the unobserved (pinned) entries of a mask is fine
        mask = ~np.isnan(Y)
        DiffusionPriorEM(n_iter=0).fit(Y, Mask(mask, noise_std=0.1))

    def test_operator_length_mismatch(self) -> None:
        Y = np.ones((10, 3))
        op = Mask(np.ones((5, 3), bool), noise_std=0.1)
        with pytest.raises(ValueError, match=r"operator has 5 samples but Y has 10 rows"):
            DiffusionPriorEM(n_iter=0).fit(Y, op)
        # a shared operator (batch 1) is expanded
        est = DiffusionPriorEM(n_iter=0).fit(Y + np.arange(30).reshape(10, 3), Identity(3))
        assert est.n_features_in_ == 3

    def test_measurement_size_mismatch(self) -> None:
        op = Dense(np.ones((10, 2, 4)), noise_std=0.1)
        with pytest.raises(ValueError, match=r"Y has 3 columns but operator.n_measurements = 2"):
            DiffusionPriorEM(n_iter=0).fit(np.ones((10, 3)), op)

    def test_wrong_n_features_at_predict_time(self, fitted, data) -> None:
        Y, _ = data
        with pytest.raises(
            ValueError, match="X has 3 features, but DiffusionPriorEM is expecting 4"
        ):
            fitted.transform(Y[:, :3])
        with pytest.raises(ValueError, match="Reshape your data"):
            fitted.transform(Y[0])
        other = Dense(np.ones((2, 3)), noise_std=0.1)  # acts on 3 features, not 4
        with pytest.raises(ValueError, match=r"operator acts on 3 features"):
            fitted.score_samples(np.ones((5, 2)), other)
        with pytest.raises(ValueError, match=r"n_samples must be an int in the range \[1, inf\)"):
            fitted.sample(0)

    def test_second_argument_not_an_operator(self, data) -> None:
        Y, op = data
        with pytest.raises(TypeError, match=r"operator must be a diffem.operators.Operator"):
            DiffusionPriorEM(n_iter=0).fit(Y, ~np.isnan(Y))  # a raw mask
        with pytest.raises(TypeError, match=r"diffem.operators.Operator .*or None"):
            DiffusionPriorEM(n_iter=0).fit(Y, "mask")
        with pytest.raises(TypeError, match=r"diffem.operators.Operator"):
            DiffusionPriorEM(n_iter=0).fit(Y, op).transform(Y, op.mask)
        with pytest.raises(TypeError, match="either as operator or as the keyword y"):
            DiffusionPriorEM(n_iter=0).fit(Y, op, y=op)

    def test_invalid_parameters_at_fit_time(self, data) -> None:
        Y, op = data
        cases = {
            "noise_std": -0.1,
            "n_iter": -1,
            "gaussian_iter": 1.5,
            "gaussian_rank": 0,
            "batch_size": 0,
            "n_transform_samples": 0,
            "n_score_samples": 0,
            "score_steps": 0,
            "verbose": -1,
            "device": "not-a-device",
            "e_step_samples": 0,
            "lr_decay": 0.0,
            "first_epochs": 0,
            "tol": -0.1,
            "n_iter_no_change": 0,
            "init_shrinkage": -1.0,
        }
        for name, value in cases.items():
            est = DiffusionPriorEM(**{name: value})  # construction never validates
            with pytest.raises(ValueError, match=name):
                est.fit(Y, op)
        with pytest.raises(ValueError, match="noise_std"):
            DiffusionPriorEM(noise_std=float("nan")).fit(Y)

    def test_not_fitted(self, data) -> None:
        Y, op = data
        for method in ("transform", "score_samples", "score", "sample_posterior"):
            with pytest.raises(NotFittedError):
                getattr(DiffusionPriorEM(), method)(Y, op)
        with pytest.raises(NotFittedError):
            DiffusionPriorEM().sample(3)

    def test_failed_validation_keeps_previous_fit(self, fitted, data) -> None:
        Y, op = data
        before = fitted.sample(3, random_state=0)
        with pytest.raises(ValueError):
            fitted.set_params(n_iter=-1).fit(Y, op)
        fitted.set_params(n_iter=0)
        np.testing.assert_array_equal(fitted.sample(3, random_state=0), before)


# ---------------------------------------------------------------------- interruption
def _patch_e_step(monkeypatch: pytest.MonkeyPatch, fail_at: int, exc: BaseException | None):
    """Makes the ``fail_at``-th E-step raise ``exc`` (or return NaN if None)."""
    calls = {"n": 0}
    original = DiffusionPriorEM._e_step

    def e_step(self, Y, operator, generator):
        calls["n"] += 1
        if calls["n"] == fail_at:
            if exc is None:
                return torch.full((Y.shape[0], operator.n_features), float("nan"))
            raise exc
        return original(self, Y, operator, generator)

    monkeypatch.setattr(DiffusionPriorEM, "_e_step", e_step)
    return calls


def test_keyboard_interrupt_in_e_step(monkeypatch, data, reference_one_iteration) -> None:
    Y, op = data
    _patch_e_step(monkeypatch, fail_at=2, exc=KeyboardInterrupt())
    est = tiny_estimator(n_iter=3)
    with pytest.warns(UserWarning, match="interrupted during EM iteration 2"):
        assert est.fit(Y, op) is est
    assert est.interrupted_ and est.n_iter_ == 1 and len(est.history_) == 1
    assert est.history_[-1]["iteration"] == 1
    # the estimator is exactly the one-iteration prior, and fully usable
    np.testing.assert_array_equal(est.sample(16, random_state=5), reference_one_iteration)
    assert est.transform(Y, op).shape == Y.shape
    assert np.isfinite(est.score(Y[:4], op[:4]))


class _SigintOnSecondTraining(Callback):
    """Sends SIGINT (Ctrl-C) after the first epoch of the second M-step."""

    trainings = 0

    def on_train_begin(self, net, **kwargs) -> None:
        type(self).trainings += 1

    def on_epoch_end(self, net, **kwargs) -> None:
        if type(self).trainings == 2:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or os.name == "nt", reason="POSIX signals")
def test_ctrl_c_during_m_step_restores_weights(data, reference_one_iteration) -> None:
    """skorch swallows KeyboardInterrupt inside training; the estimator still notices Ctrl-C,
    and restores the weights from before the interrupted M-step."""
    Y, op = data
    _SigintOnSecondTraining.trainings = 0
    denoiser = tiny_denoiser(max_epochs=3, callbacks=[_SigintOnSecondTraining()])
    est = tiny_estimator(n_iter=3, denoiser=denoiser)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when run as a background job
    with pytest.warns(UserWarning, match="interrupted during EM iteration 2"):
        est.fit(Y, op)
    assert _SigintOnSecondTraining.trainings == 2
    assert est.interrupted_ and est.n_iter_ == 1 and len(est.history_) == 1
    assert len(est.denoiser_.history) == 3  # the epochs of the first M-step only
    reference = tiny_estimator(n_iter=1, denoiser=tiny_denoiser(max_epochs=3))
    expected = reference.fit(Y, op).sample(16, random_state=5)
    np.testing.assert_array_equal(est.sample(16, random_state=5), expected)
    # the SIGINT handler is restored after fit
    assert signal.getsignal(signal.SIGINT) is before


def test_interrupt_in_first_iteration_gives_gaussian(monkeypatch, data) -> None:
    Y, op = data
    _patch_e_step(monkeypatch, fail_at=1, exc=KeyboardInterrupt())
    with pytest.warns(UserWarning, match="interrupted during EM iteration 1"):
        est = tiny_estimator(n_iter=2).fit(Y, op)
    assert est.n_iter_ == 0 and est.history_ == [] and est.interrupted_
    assert est.denoiser_ is est.gaussian_prior_
    exact = est.gaussian_prior_.posterior_mean(Y, op)
    np.testing.assert_allclose(est.transform(Y, op), exact, rtol=1e-6)


# ---------------------------------------------------------------------- divergence
class _PoisonSecondTraining(Callback):
    """Sets a weight to NaN at the start of the second M-step (a diverging update)."""

    trainings = 0

    def on_train_begin(self, net, **kwargs) -> None:
        type(self).trainings += 1

    def on_batch_begin(self, net, **kwargs) -> None:
        if type(self).trainings == 2:
            with torch.no_grad():
                next(net.module_.parameters()).fill_(float("nan"))


def test_divergence_restores_last_good_iteration(data) -> None:
    Y, op = data
    _PoisonSecondTraining.trainings = 0
    est = tiny_estimator(n_iter=3, denoiser=tiny_denoiser(callbacks=[_PoisonSecondTraining()]))
    with pytest.raises(DivergenceError, match=r"EM iteration 2.*restored to iteration 1"):
        est.fit(Y, op)
    assert est.n_iter_ == 1 and len(est.history_) == 1 and not est.interrupted_
    for param in est.denoiser_.module_.parameters():
        assert torch.isfinite(param).all()
    reference = tiny_estimator(n_iter=1).fit(Y, op)
    np.testing.assert_array_equal(
        est.sample(8, random_state=1), reference.sample(8, random_state=1)
    )


def test_divergence_error_is_a_runtime_error(monkeypatch, data) -> None:
    Y, op = data
    _patch_e_step(monkeypatch, fail_at=2, exc=None)  # the E-step returns NaN
    est = tiny_estimator(n_iter=2)
    with pytest.raises(RuntimeError, match="non-finite samples"):
        est.fit(Y, op)
    assert est.n_iter_ == 1
    assert np.isfinite(est.sample(4, random_state=0)).all()


def test_divergence_in_first_m_step_gives_gaussian(data) -> None:
    Y, op = data
    _PoisonSecondTraining.trainings = 1  # poison the first training
    est = tiny_estimator(n_iter=2, denoiser=tiny_denoiser(callbacks=[_PoisonSecondTraining()]))
    with pytest.raises(DivergenceError, match="EM iteration 1"):
        est.fit(Y, op)
    assert est.n_iter_ == 0 and est.denoiser_ is est.gaussian_prior_
    assert est.transform(Y, op).shape == Y.shape


# ---------------------------------------------------------------------- checkpoints
def test_checkpoint_every_iteration_and_resume(monkeypatch, tmp_path: Path, data) -> None:
    Y, op = data
    uninterrupted = tiny_estimator(n_iter=3).fit(Y, op)
    # a fit interrupted at iteration 3 leaves the checkpoint of iteration 2
    calls = _patch_e_step(monkeypatch, fail_at=3, exc=KeyboardInterrupt())
    with pytest.warns(UserWarning, match="interrupted"):
        tiny_estimator(n_iter=3, checkpoint_dir=tmp_path).fit(Y, op)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["em_iter0002.joblib"]
    monkeypatch.undo()
    # a new estimator with the same settings resumes: only iteration 3 runs
    calls = _patch_e_step(monkeypatch, fail_at=0, exc=None)
    resumed = tiny_estimator(n_iter=3, checkpoint_dir=tmp_path).fit(Y, op)
    assert calls["n"] == 1
    assert resumed.resumed_from_ == 2 and resumed.n_iter_ == 3 and len(resumed.history_) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["em_iter0003.joblib"]
    # ... and ends where the uninterrupted fit ends
    np.testing.assert_array_equal(
        resumed.sample(8, random_state=2), uninterrupted.sample(8, random_state=2)
    )
    # nothing left to do: a third fit runs no iteration
    again = tiny_estimator(n_iter=3, checkpoint_dir=tmp_path).fit(Y, op)
    assert calls["n"] == 1 and again.resumed_from_ == 3 and again.n_iter_ == 3


def test_incompatible_checkpoint_is_ignored(tmp_path: Path, data) -> None:
    Y, op = data
    tiny_estimator(n_iter=1, checkpoint_dir=tmp_path).fit(Y, op)
    with pytest.warns(UserWarning, match="other hyper-parameters or data"):
        est = tiny_estimator(n_iter=1, checkpoint_dir=tmp_path).fit(Y[:40], op[:40])
    assert est.resumed_from_ is None and est.n_iter_ == 1
    with pytest.warns(UserWarning, match="other hyper-parameters or data"):
        est = tiny_estimator(n_iter=1, checkpoint_dir=tmp_path, gaussian_iter=2).fit(
            Y[:40], op[:40]
        )
    assert est.resumed_from_ is None


def test_callback_sees_every_iteration_with_its_prior():
    """``callback(estimator, record)`` runs after the initialisation and each EM iteration."""
    rng = np.random.default_rng(0)
    Y = rng.normal(size=(64, 3)).astype(np.float32)
    seen = []

    def callback(est, record):
        seen.append((record["iteration"], est.n_iter_, est.sample(4, random_state=0).shape))

    est = DiffusionPriorEM(
        denoiser=MLPDenoiser(max_epochs=1, module__hidden_features=16, module__n_blocks=1),
        sampler=MMPS(steps=4),
        n_iter=2,
        gaussian_iter=2,
        noise_std=0.1,
        device="cpu",
        random_state=0,
        callback=callback,
    ).fit(Y)
    assert [(k, n) for k, n, _ in seen] == [(0, 0), (1, 1), (2, 2)]
    assert all(shape == (4, 3) for *_, shape in seen)
    assert est.n_iter_ == 2


def test_callback_must_be_callable():
    with pytest.raises(TypeError, match="callback"):
        DiffusionPriorEM(n_iter=0, noise_std=0.1, callback=3).fit(np.zeros((8, 2)))
