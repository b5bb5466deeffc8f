"""Parallel model selection on existing engines: ``GridSearchCV(n_jobs=2)`` with joblib's
loky processes and with the dask backend on a ``dask.distributed.LocalCluster`` give the same
``cv_results_`` as the serial search for a fixed ``random_state``."""

from __future__ import annotations

import numpy as np
import pytest
from joblib import parallel_backend
from sklearn.model_selection import GridSearchCV

from diffem import DiffusionPriorEM
from diffem.denoisers import MLPDenoiser
from diffem.operators import Mask
from diffem.samplers import MMPS

GRID = [{"n_iter": [0]}, {"n_iter": [1], "denoiser__lr": [1e-3, 3e-3]}]


def _problem(n: int = 60, d: int = 3, seed: int = 0) -> tuple[np.ndarray, Mask]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) @ np.diag([1.0, 0.7, 0.4]) + 0.5
    mask = rng.random((n, d)) < 0.7
    Y = np.where(mask, X + 0.1 * rng.normal(size=X.shape), np.nan).astype(np.float32)
    return Y, Mask(mask, noise_std=0.1)


def _estimator() -> DiffusionPriorEM:
    denoiser = MLPDenoiser(
        max_epochs=2, batch_size=32, module__hidden_features=16, module__n_blocks=1
    )
    return DiffusionPriorEM(
        denoiser,
        MMPS(steps=4),
        n_iter=1,
        gaussian_iter=4,
        n_score_samples=2,
        score_steps=2,
        device="cpu",
        random_state=0,
    )


def _search(n_jobs: int | None = None) -> dict:
    Y, op = _problem()
    search = GridSearchCV(_estimator(), GRID, cv=2, n_jobs=n_jobs, error_score="raise")
    return search.fit(Y, op).cv_results_


def _assert_same_results(results: dict, reference: dict) -> None:
    assert results.keys() == reference.keys()
    for key, expected in reference.items():
        if key.endswith("_time"):
            continue  # wall times differ
        if key == "params":
            assert results[key] == expected
        else:
            np.testing.assert_array_equal(np.asarray(results[key]), np.asarray(expected), key)


@pytest.fixture(scope="module")
def serial() -> dict:
    results = _search()
    assert np.isfinite(results["mean_test_score"]).all()
    return results


def test_grid_search_with_loky_processes_equals_serial(serial: dict) -> None:
    _assert_same_results(_search(n_jobs=2), serial)


def test_grid_search_on_a_dask_cluster_equals_serial(serial: dict) -> None:
    """Two worker processes of one thread each, as on a cluster (one worker per GPU). Threaded
    workers in one process are not reproducible: the denoiser seeds its weight initialisation
    through torch's global random generator, which concurrent fits share."""
    distributed = pytest.importorskip("dask.distributed")
    dask = pytest.importorskip("dask")
    with (
        # forked workers start without importing torch again
        dask.config.set({"distributed.worker.multiprocessing-method": "fork"}),
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster),
        parallel_backend("dask"),
    ):
        results = _search(n_jobs=-1)
    _assert_same_results(results, serial)
