"""Tests of diffem.metrics: known values, symmetry, invariances and input validation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from diffem.metrics import psnr, sinkhorn_divergence, sliced_wasserstein, wasserstein


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# ----------------------------------------------------------------------- exact Wasserstein
@pytest.mark.parametrize("p", [1, 2])
def test_wasserstein_is_exact_in_one_dimension(rng, p):
    """In 1-D the optimal plan matches quantiles: the sliced distance with one direction is
    exact, also between sets of different sizes."""
    x, y = rng.normal(size=(120, 1)), rng.gamma(2.0, size=(80, 1))
    assert wasserstein(x, y, p=p) == pytest.approx(sliced_wasserstein(x, y, p=p), rel=1e-8)


def test_wasserstein_translation_and_permutation(rng):
    X = rng.normal(size=(150, 3))
    shift = np.array([0.3, -1.2, 0.4])
    assert wasserstein(X, X + shift) == pytest.approx(np.linalg.norm(shift), rel=1e-10)
    assert wasserstein(X, X[rng.permutation(150)]) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="same number of features"):
        wasserstein(X, X[:, :2])


# ----------------------------------------------------------------------- sliced Wasserstein
def test_sw_identical_sets_is_zero(rng):
    X = rng.normal(size=(300, 4))
    assert sliced_wasserstein(X, X, random_state=0) == pytest.approx(0.0, abs=1e-12)
    assert sliced_wasserstein(X, X[rng.permutation(300)], random_state=0) == pytest.approx(
        0.0, abs=1e-12
    )


@pytest.mark.parametrize("shift", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("p", [1, 2, 3])
def test_sw_1d_shift_is_exact(rng, shift, p):
    x = rng.normal(size=500)
    assert sliced_wasserstein(x, x + shift, p=p) == pytest.approx(shift, rel=1e-10)


def test_sw_1d_different_sizes_matches_quantile_integral(rng):
    # W_p^p between uniform empirical measures equals the integral of |F^-1 - G^-1|^p,
    # evaluated here on a fine grid of levels (exact up to the grid resolution).
    x, y = rng.normal(size=7), rng.normal(size=5) + 0.3
    u = (np.arange(70000) + 0.5) / 70000
    qx = np.sort(x)[np.floor(u * 7).astype(int)]
    qy = np.sort(y)[np.floor(u * 5).astype(int)]
    expected = np.mean((qx - qy) ** 2) ** 0.5
    assert sliced_wasserstein(x, y) == pytest.approx(expected, rel=1e-6)
    assert sliced_wasserstein(y, x) == pytest.approx(expected, rel=1e-6)


def test_sw_1d_different_sizes_repeated_samples(rng):
    # Repeating every sample does not change the empirical measure.
    x, y = rng.normal(size=50), rng.normal(size=30)
    assert sliced_wasserstein(np.repeat(x, 3), y) == pytest.approx(
        sliced_wasserstein(x, y), rel=1e-10
    )


def test_sw_shift_in_higher_dimension_matches_projected_shift(rng):
    X = rng.normal(size=(400, 3))
    s = np.array([1.0, -0.5, 2.0])
    theta = rng.normal(size=(64, 3))
    theta /= np.linalg.norm(theta, axis=1, keepdims=True)
    expected = np.sqrt(np.mean((theta @ s) ** 2))
    assert sliced_wasserstein(X, X + s, projections=theta) == pytest.approx(expected, rel=1e-8)
    # With many random directions, E[(theta . s)^2] = |s|^2 / d.
    value = sliced_wasserstein(X, X + s, n_projections=4000, random_state=0)
    assert value == pytest.approx(np.linalg.norm(s) / np.sqrt(3), rel=0.05)


def test_sw_monotone_in_shift(rng):
    X, Y = rng.normal(size=(500, 2)), rng.normal(size=(400, 2))
    values = [
        sliced_wasserstein(X, Y + np.array([s, 0.0]), n_projections=64, random_state=1)
        for s in (0.0, 0.5, 1.0, 2.0, 4.0)
    ]
    assert all(a < b for a, b in itertools.pairwise(values))


def test_sw_symmetric_order_invariant_and_seeded(rng):
    X, Y = rng.normal(size=(200, 3)), rng.normal(size=(150, 3)) * 2
    a = sliced_wasserstein(X, Y, random_state=3)
    assert sliced_wasserstein(Y, X, random_state=3) == pytest.approx(a, rel=1e-12)
    assert sliced_wasserstein(X[::-1], Y[rng.permutation(150)], random_state=3) == pytest.approx(
        a, rel=1e-12
    )
    assert sliced_wasserstein(X, Y, random_state=3) == a


def test_sw_accepts_torch_and_float32(rng):
    X, Y = rng.normal(size=(100, 2)), rng.normal(size=(100, 2))
    a = sliced_wasserstein(X, Y, random_state=0)
    b = sliced_wasserstein(torch.tensor(X, dtype=torch.float32), torch.tensor(Y), random_state=0)
    assert isinstance(b, float)
    assert b == pytest.approx(a, rel=1e-5)


@pytest.mark.parametrize("p", [1, 2, 3])
def test_sw_is_pots_sliced_wasserstein_on_seeded_directions(rng, p):
    ot = pytest.importorskip("ot")
    X, Y = rng.normal(size=(70, 3)), rng.normal(size=(50, 3)) * 1.5 + 0.2
    theta = np.random.RandomState(4).standard_normal((32, 3))  # check_random_state(4)'s draws
    theta /= np.linalg.norm(theta, axis=1, keepdims=True)
    expected = ot.sliced_wasserstein_distance(X, Y, projections=theta.T, p=p)
    value = sliced_wasserstein(X, Y, n_projections=32, p=p, random_state=4)
    assert value == pytest.approx(float(expected), rel=1e-12)


def test_sw_validation(rng):
    X = rng.normal(size=(10, 2))
    with pytest.raises(ValueError, match="same number of features"):
        sliced_wasserstein(X, rng.normal(size=(10, 3)))
    with pytest.raises(ValueError, match="p must"):
        sliced_wasserstein(X, X, p=0.5)
    with pytest.raises(ValueError, match="n_projections"):
        sliced_wasserstein(X, X, n_projections=0)
    with pytest.raises(ValueError, match="finite"):
        sliced_wasserstein(X, np.full((3, 2), np.nan))
    with pytest.raises(ValueError, match="projections"):
        sliced_wasserstein(X, X, projections=np.ones((4, 3)))


# ----------------------------------------------------------------------- Sinkhorn
def test_sinkhorn_identical_sets_is_zero(rng):
    X = rng.normal(size=(150, 3))
    assert sinkhorn_divergence(X, X[rng.permutation(150)], reg=0.1) == pytest.approx(0, abs=1e-3)


def test_sinkhorn_pure_shift_gives_squared_shift(rng):
    # For Y = X + s, the debiased divergence equals |s|^2 (translation of the entropic plan).
    X = rng.normal(size=(150, 2))
    s = np.array([0.5, -0.3])
    value = sinkhorn_divergence(X, X + s, reg=0.1)
    assert value == pytest.approx(float(s @ s), rel=0.03)


def test_sinkhorn_monotone_symmetric_and_order_invariant(rng):
    X, Y = rng.normal(size=(120, 2)), rng.normal(size=(100, 2))
    values = [sinkhorn_divergence(X, Y + np.array([s, 0.0]), reg=0.1) for s in (0.0, 1.0, 2.0)]
    assert values[0] < values[1] < values[2]
    a = sinkhorn_divergence(X, Y, reg=0.1, tol=1e-3)
    assert sinkhorn_divergence(Y, X, reg=0.1, tol=1e-3) == pytest.approx(a, rel=1e-2, abs=1e-4)
    assert sinkhorn_divergence(X[::-1], Y, reg=0.1, tol=1e-3) == pytest.approx(
        a, rel=1e-2, abs=1e-4
    )


def test_sinkhorn_is_pots_debiased_entropic_value(rng):
    # S_eps as POT's ot.solve_sample(..., debias=True).value: the entropic KL terms included
    # (POT's value_linear, without them, differs).
    ot = pytest.importorskip("ot")
    X, Y = rng.normal(size=(60, 2)), rng.normal(size=(50, 2)) + np.array([1.0, 0.0])
    reference = ot.solve_sample(X, Y, reg=0.3, debias=True, tol=1e-12, max_iter=20000)
    pot = sinkhorn_divergence(X, Y, reg=0.3, solver="pot", tol=1e-6, dtype=torch.float64)
    assert pot == pytest.approx(float(reference.value), rel=1e-5)
    assert abs(float(reference.value_linear) - pot) > 0.05 * pot
    # the fixed-budget symmetric solver agrees at this reg
    fast = sinkhorn_divergence(X, Y, reg=0.3, dtype=torch.float64)
    assert fast == pytest.approx(float(reference.value), rel=0.02)
    shift = np.array([0.4, 0.2])
    assert sinkhorn_divergence(X, X + shift, reg=0.3, solver="pot") == pytest.approx(0.2, rel=0.03)


def test_sinkhorn_max_samples_and_validation(rng):
    X = rng.normal(size=(300, 2))
    value = sinkhorn_divergence(X, X + 1.0, reg=0.2, max_samples=100, random_state=0)
    assert 1.0 < value < 2.5  # |s|^2 = 2, up to the subsampling error
    with pytest.raises(ValueError, match="reg"):
        sinkhorn_divergence(X, X, reg=0.0)
    with pytest.raises(ValueError, match="same number of features"):
        sinkhorn_divergence(X, X[:, :1])
    with pytest.raises(ValueError, match="solver"):
        sinkhorn_divergence(X, X, solver="exact")


# ----------------------------------------------------------------------- PSNR
def test_psnr_known_value():
    x = np.zeros((2, 16))
    y = x + 0.1  # MSE 0.01, range 2: 10 log10(4 / 0.01)
    expected = 10 * math.log10(400)
    assert psnr(x, y) == pytest.approx(expected)
    assert psnr(x[0], y[0], data_range=2.0) == pytest.approx(expected)
    assert psnr(x, y, data_range=1.0) == pytest.approx(10 * math.log10(100))
    np.testing.assert_allclose(psnr(x, y, reduction="none"), [expected, expected])
    assert psnr(x, x) == math.inf


def test_psnr_mean_vs_pooled():
    x = np.zeros((2, 4))
    y = np.stack([np.full(4, 0.1), np.full(4, 0.2)])
    per_image = [10 * math.log10(4 / 0.01), 10 * math.log10(4 / 0.04)]
    assert psnr(x, y) == pytest.approx(np.mean(per_image))
    assert psnr(x, y, reduction="pooled") == pytest.approx(10 * math.log10(4 / 0.025))


def test_psnr_mask_only_counts_selected_entries():
    x = np.zeros((1, 4))
    y = np.array([[0.1, 0.1, 5.0, np.nan]])  # the unselected entries are ignored, even NaN
    mask = np.array([[True, True, False, False]])
    assert psnr(x, y, mask=mask) == pytest.approx(10 * math.log10(400))
    assert psnr(torch.tensor(x), torch.tensor(y), mask=torch.tensor(mask[0])) == pytest.approx(
        10 * math.log10(400)
    )
    with pytest.raises(ValueError, match="no entry"):
        psnr(x, y, mask=np.zeros_like(mask))


def test_psnr_symmetric_and_validation():
    rng = np.random.default_rng(1)
    x, y = rng.uniform(-1, 1, (5, 9)), rng.uniform(-1, 1, (5, 9))
    assert psnr(x, y) == pytest.approx(psnr(y, x))
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, y[:, :3])
    with pytest.raises(ValueError, match="data_range"):
        psnr(x, y, data_range=0)
    with pytest.raises(ValueError, match="reduction"):
        psnr(x, y, reduction="sum")
