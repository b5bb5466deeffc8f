"""scikit-learn compatibility of DiffusionPriorEM: the estimator checks, cloning, nested
parameters, model selection with per-sample operators, pipelines and persistence."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
from conftest import tiny_denoiser, tiny_estimator
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils.estimator_checks import parametrize_with_checks

from diffem import DiffusionPriorEM
from diffem.denoisers import MLPDenoiser
from diffem.operators import Dense, Mask
from diffem.samplers import MMPS

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- estimator checks
def expected_failed_checks(estimator: DiffusionPriorEM) -> dict[str, str]:
    return {
        # By design the second argument of fit/score/fit_transform is the observation operator
        # (API contract), not a target named y; a target passed there is still accepted.
        "check_fit_score_takes_y": "the second argument is `operator`, not `y` (by design)",
    }


@parametrize_with_checks(
    [
        tiny_estimator(n_iter=0),  # the Gaussian prior: exact, deterministic methods
        tiny_estimator(n_iter=1),  # one EM iteration with a (tiny) diffusion prior
    ],
    expected_failed_checks=expected_failed_checks,
)
def test_sklearn_compatible_estimator(estimator, check) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        check(estimator)


def test_tags() -> None:
    tags = DiffusionPriorEM().__sklearn_tags__()
    assert tags.estimator_type == "density_estimator"
    assert tags.input_tags.allow_nan
    assert not tags.target_tags.required
    assert tags.non_deterministic
    assert not DiffusionPriorEM(n_iter=0).__sklearn_tags__().non_deterministic


# ---------------------------------------------------------------------- parameters
def test_clone_and_nested_params() -> None:
    est = DiffusionPriorEM(
        denoiser=MLPDenoiser(lr=3e-3, module__hidden_features=32),
        sampler=MMPS(cg_iter=2),
        n_iter=3,
        random_state=0,
    )
    params = est.get_params(deep=True)
    assert params["sampler__cg_iter"] == 2
    assert params["denoiser__lr"] == 3e-3
    assert params["denoiser__module__hidden_features"] == 32
    assert params["n_iter"] == 3

    copy = clone(est)
    assert copy is not est and copy.denoiser is not est.denoiser
    assert copy.get_params()["sampler__cg_iter"] == 2
    copy.set_params(sampler__cg_iter=3, denoiser__lr=1e-4, denoiser__module__n_blocks=1)
    assert copy.sampler.cg_iter == 3 and copy.denoiser.lr == 1e-4
    assert copy.get_params()["denoiser__module__n_blocks"] == 1
    # the original is untouched
    assert est.sampler.cg_iter == 2 and est.denoiser.lr == 3e-3


def test_fit_does_not_modify_parameters() -> None:
    denoiser, sampler = tiny_denoiser(), MMPS(steps=4)
    est = tiny_estimator(denoiser=denoiser, sampler=sampler, n_iter=1, random_state=0)
    Y = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    est.fit(Y)
    assert est.denoiser is denoiser and est.sampler is sampler
    assert not hasattr(denoiser, "module_")  # the estimator trained a clone
    assert est.denoiser_ is not denoiser and est.sampler_ is not sampler
    # schedules were made consistent on the clones
    assert est.sampler_.sigma_max == est.denoiser_.sigma_max
    assert est.sampler_.sigma_min == est.denoiser_.sigma_min
    assert est.denoiser_.sigma_data == pytest.approx(est.sigma_data_)
    assert denoiser.sigma_data == 1.0


# ---------------------------------------------------------------------- model selection
def _projection_problem(n: int = 60, seed: int = 0) -> tuple[np.ndarray, Dense]:
    """Per-sample random projections (2, 4) of Gaussian latents, noise 0.1."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)) @ np.diag([1.0, 0.7, 0.5, 0.3]) + 0.5
    A = rng.normal(size=(n, 2, 4)) / 2
    Y = np.einsum("nmd,nd->nm", A, x) + 0.1 * rng.normal(size=(n, 2))
    return Y.astype(np.float32), Dense(A, noise_std=0.1)


def test_grid_search_splits_operators() -> None:
    Y, op = _projection_problem()
    grid = [
        {"n_iter": [0]},
        {"n_iter": [1], "sampler__cg_iter": [1, 2], "denoiser__lr": [1e-3, 3e-3]},
    ]
    search = GridSearchCV(tiny_estimator(random_state=0), grid, cv=2, error_score="raise")
    search.fit(Y, op)
    assert len(search.cv_results_["params"]) == 5
    scores = search.cv_results_["mean_test_score"]
    assert np.isfinite(scores).all()
    assert search.best_estimator_.n_features_in_ == 4
    assert search.best_estimator_.n_iter_ == search.best_params_["n_iter"]
    # the Gaussian candidate's score is exact: recompute it by hand on the first split
    train, test = next(iter(KFold(2).split(Y)))
    manual = tiny_estimator(n_iter=0).fit(Y[train], op[train]).score(Y[test], op[test])
    assert search.cv_results_["split0_test_score"][0] == pytest.approx(manual, rel=1e-6)


def test_cross_val_score_with_masks() -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(90, 3)).astype(np.float32) + np.array([1.0, -1.0, 0.0], np.float32)
    mask = rng.random((90, 3)) < 0.7
    op = Mask(mask, noise_std=0.1)
    Y = np.where(mask, X + 0.1 * rng.normal(size=X.shape), np.nan).astype(np.float32)
    scores = cross_val_score(tiny_estimator(n_iter=0), Y, op, cv=3)
    assert scores.shape == (3,) and np.isfinite(scores).all()
    # the scores are those of the exact Gaussian prior fitted on each training fold
    for k, (train, test) in enumerate(KFold(3).split(Y)):
        fold = tiny_estimator(n_iter=0).fit(Y[train], op[train])
        assert scores[k] == pytest.approx(fold.score(Y[test], op[test]), rel=1e-6)
    # shared operator (batch 1) expanded to the data for splitting
    shared = cross_val_score(tiny_estimator(n_iter=0), X, Mask(np.ones(3, bool)).expand(90), cv=3)
    assert np.isfinite(shared).all()


def test_pipeline_last_step() -> None:
    Y, op = _projection_problem()
    pipe = Pipeline([("identity", FunctionTransformer()), ("prior", tiny_estimator(n_iter=0))])
    pipe.fit(Y, op)
    est = pipe.named_steps["prior"]
    assert est.n_features_in_ == 4
    assert pipe.score(Y, op) == pytest.approx(est.score(Y, op))
    mask_pipe = Pipeline([("identity", FunctionTransformer()), ("prior", tiny_estimator(1))])
    Z = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    out = mask_pipe.fit(Z).transform(Z)
    assert out.shape == (40, 3) and out.dtype == np.float32


# ---------------------------------------------------------------------- persistence
SUBPROCESS = textwrap.dedent(
    """
    import sys
    import joblib, numpy as np, torch
    torch.set_num_threads(1)
    est = joblib.load(sys.argv[1])
    np.save(sys.argv[2], est.sample(5, random_state=3))
    Y = np.load(sys.argv[3])
    np.save(sys.argv[4], est.sample_posterior(Y, n_samples=2, random_state=4))
    """
)


@pytest.mark.parametrize("n_iter", [0, 1])
def test_joblib_roundtrip_in_fresh_process(tmp_path: Path, n_iter: int) -> None:
    rng = np.random.default_rng(2)
    Y = rng.normal(size=(50, 3)).astype(np.float32)
    Y[::3, 1] = np.nan
    est = tiny_estimator(n_iter=n_iter, noise_std=0.1, random_state=0).fit(Y)
    joblib.dump(est, tmp_path / "est.joblib")
    np.save(tmp_path / "Y.npy", Y[:4])
    script = tmp_path / "load.py"
    script.write_text(SUBPROCESS)
    files = [tmp_path / name for name in ("est.joblib", "s.npy", "Y.npy", "p.npy")]
    subprocess.run(
        [sys.executable, str(script), *map(str, files)],
        check=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "", "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    np.testing.assert_array_equal(np.load(files[1]), est.sample(5, random_state=3))
    expected = est.sample_posterior(Y[:4], n_samples=2, random_state=4)
    np.testing.assert_array_equal(np.load(files[3]), expected)
    # and in this process, a loaded copy gives the same samples too
    loaded = joblib.load(files[0])
    np.testing.assert_array_equal(loaded.sample(5, random_state=3), est.sample(5, random_state=3))
    assert loaded.history_ == est.history_
    assert loaded.get_params()["denoiser__max_epochs"] == 2


def test_cuda_fitted_model_maps_to_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The loading logic of a model fitted on CUDA, exercised on a CPU-only machine: the
    recorded device is CUDA and CUDA is reported unavailable."""
    Y = np.random.default_rng(3).normal(size=(40, 3)).astype(np.float32)
    est = tiny_estimator(n_iter=1, random_state=0).fit(Y)
    expected = est.sample(4, random_state=1)
    est.device_ = torch.device("cuda:0")  # as if fitted on a GPU
    est.denoiser_.device = "cuda"  # skorch maps its modules when CUDA is unavailable
    path = tmp_path / "gpu.joblib"
    joblib.dump(est, path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="fitted on cuda:0"):
        loaded = joblib.load(path)
    assert loaded.device_ == torch.device("cpu")
    assert loaded.denoiser_.device == "cpu"
    assert next(loaded.denoiser_.module_.parameters()).device.type == "cpu"
    np.testing.assert_array_equal(loaded.sample(4, random_state=1), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fit_then_cpu_load(tmp_path: Path) -> None:
    """A model fitted on CUDA, loaded in a process where CUDA is hidden."""
    Y = np.random.default_rng(4).normal(size=(40, 3)).astype(np.float32)
    est = tiny_estimator(n_iter=1, device="cuda", random_state=0).fit(Y)
    assert est.device_.type == "cuda"
    assert next(est.denoiser_.module_.parameters()).device.type == "cuda"
    joblib.dump(est, tmp_path / "est.joblib")
    script = tmp_path / "load.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, joblib, numpy as np, torch
            assert not torch.cuda.is_available()
            est = joblib.load(sys.argv[1])
            assert est.device_.type == "cpu"
            np.save(sys.argv[2], est.sample(8, random_state=0))
            """
        )
    )
    out = tmp_path / "s.npy"
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "est.joblib"), str(out)],
        check=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "", "CUDA_VISIBLE_DEVICES": ""},
        timeout=300,
    )
    samples = np.load(out)
    assert samples.shape == (8, 3) and np.isfinite(samples).all()
