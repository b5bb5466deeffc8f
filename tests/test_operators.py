"""Tests of ``diffem.operators``: linear algebra, batching, noise model, validation, pickling."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import joblib
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.signal import convolve2d
from sklearn.model_selection import KFold, train_test_split
from sklearn.utils._indexing import _safe_indexing
from sklearn.utils.validation import _num_samples, check_consistent_length

from diffem.operators import (
    Blur,
    Dense,
    Downsample,
    FourierMask,
    Grayscale,
    Identity,
    Mask,
    Operator,
)

KINDS = ("identity", "mask", "dense", "blur", "downsample", "grayscale", "fourier")
PER_SAMPLE = ("mask", "dense", "blur", "fourier")
NOISES = ("scalar", "sample", "measure")
SETTINGS = settings(max_examples=25, deadline=None)
F64 = torch.float64


def build(kind: str, n: int, shared: bool, noise: str, seed: int) -> Operator:
    """A random float64 operator of batch ``n`` (expanded if its parameters are all shared)."""
    rng = np.random.default_rng(seed)
    shared = shared or kind not in PER_SAMPLE
    lead: tuple[int, ...] = () if shared else (n,)
    c = 3 if kind == "grayscale" else int(rng.integers(1, 3))
    h, w = int(rng.integers(2, 6)), int(rng.integers(2, 6))
    image_shape = (c, h, w)
    d = c * h * w
    make: Callable[[Any], Operator]
    if kind == "identity":
        size = int(rng.integers(1, 8))
        make = lambda s: Identity(size, noise_std=s)  # noqa: E731
    elif kind == "mask":
        mask = rng.random((*lead, d)) < 0.6
        make = lambda s: Mask(mask, noise_std=s)  # noqa: E731
    elif kind == "dense":
        matrix = rng.standard_normal((*lead, int(rng.integers(1, 6)), d))
        make = lambda s: Dense(matrix, noise_std=s)  # noqa: E731
    elif kind == "blur":
        kh, kw = (int(k) for k in rng.choice([1, 3, 5], size=2))
        kernel = rng.standard_normal((*lead, kh, kw))
        make = lambda s: Blur(kernel, image_shape, noise_std=s)  # noqa: E731
    elif kind == "downsample":
        f = int(rng.integers(1, 4))
        big = (c, f * int(rng.integers(1, 4)), f * int(rng.integers(1, 4)))
        make = lambda s: Downsample(f, big, noise_std=s)  # noqa: E731
    elif kind == "grayscale":
        make = lambda s: Grayscale(image_shape, noise_std=s)  # noqa: E731
    else:
        mask = rng.random((*lead, h, w)) < 0.5
        make = lambda s: FourierMask(mask, image_shape, noise_std=s)  # noqa: E731
    m = make(0.0).n_measurements
    noise_std = {
        "scalar": 0.3,
        "sample": rng.uniform(0.1, 1.0, size=n),
        "measure": rng.uniform(0.1, 1.0, size=(n, m)),
    }[noise]
    op = make(noise_std)
    if len(op) == 1 and n > 1:
        op = op.expand(n)
    assert len(op) == n
    return op.to(dtype=F64)


operators = st.builds(
    build,
    kind=st.sampled_from(KINDS),
    n=st.integers(1, 4),
    shared=st.booleans(),
    noise=st.sampled_from(NOISES),
    seed=st.integers(0, 2**32 - 1),
)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _factories(n: int) -> list[Callable[[Any], Operator]]:
    """For every kind, a function of ``noise_std`` giving an operator of batch ``n`` or 1."""
    rng = np.random.default_rng(0)
    mask, matrix = rng.random((n, 12)) < 0.5, rng.standard_normal((n, 4, 12))
    kernel, kspace = rng.standard_normal((n, 3, 3)), rng.random((n, 3, 4)) < 0.5
    return [
        lambda s: Identity(5, noise_std=s),
        lambda s: Mask(mask, noise_std=s),
        lambda s: Dense(matrix, noise_std=s),
        lambda s: Blur(kernel, (1, 3, 4), noise_std=s),
        lambda s: Downsample(2, (2, 4, 6), noise_std=s),
        lambda s: Grayscale((3, 2, 3), noise_std=s),
        lambda s: FourierMask(kspace, (2, 3, 4), noise_std=s),
    ]


def one_of_each(n: int = 3, noise_std: Any = 0.2) -> list[Operator]:
    """One operator of every kind, batch ``n`` where the parameters allow it."""
    return [make(noise_std) for make in _factories(n)]


# ---------------------------------------------------------------------- linear algebra


@SETTINGS
@given(op=operators, seed=st.integers(0, 1000))
def test_adjoint_identity(op: Operator, seed: int) -> None:
    """<A x, y> == <x, A^T y> for every sample, in float64."""
    n, m, d = op.shape
    x, y = randn(n, d, seed=seed), randn(n, m, seed=seed + 1)
    ax, aty = op.apply(x), op.adjoint(y)
    assert ax.shape == (n, m) and aty.shape == (n, d)
    assert ax.dtype == aty.dtype == F64
    lhs, rhs = (ax * y).sum(-1), (x * aty).sum(-1)
    scale = ax.norm(dim=-1) * y.norm(dim=-1) + 1.0
    torch.testing.assert_close(lhs / scale, rhs / scale, rtol=0, atol=1e-12)


@SETTINGS
@given(op=operators, seed=st.integers(0, 1000))
def test_matrix_matches_apply_and_adjoint(op: Operator, seed: int) -> None:
    n, m, d = op.shape
    a = op.matrix()
    assert a.shape[0] in (1, n) and a.shape[1:] == (m, d)
    x, y = randn(n, d, seed=seed), randn(n, m, seed=seed + 1)
    ax = (a @ x.unsqueeze(-1)).squeeze(-1)
    aty = (a.mT @ y.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(ax, op.apply(x).expand(n, -1), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(aty, op.adjoint(y).expand(n, -1), rtol=1e-10, atol=1e-10)


@SETTINGS
@given(op=operators, batch=st.integers(2, 4), seed=st.integers(0, 1000))
def test_broadcasting(op: Operator, batch: int, seed: int) -> None:
    """A batch-1 operator maps any batch; a batch-1 input is mapped by every sample."""
    n, m, d = op.shape
    single = op[[0]]
    x = randn(batch, d, seed=seed)
    rows = torch.cat([single.apply(x[[b]]) for b in range(batch)])
    torch.testing.assert_close(single.apply(x), rows.expand(batch, -1))
    x1 = randn(1, d, seed=seed)
    torch.testing.assert_close(op.apply(x1).expand(n, -1), op.apply(x1.expand(n, -1)))
    y1 = randn(1, m, seed=seed)
    torch.testing.assert_close(op.adjoint(y1).expand(n, -1), op.adjoint(y1.expand(n, -1)))


@SETTINGS
@given(op=operators, seed=st.integers(0, 1000))
def test_float32_operator_on_float64_input(op: Operator, seed: int) -> None:
    op32 = op.to(dtype=torch.float32)
    assert op32.dtype == torch.float32
    n, m, d = op.shape
    x = randn(n, d, seed=seed)
    out = op32.apply(x)
    assert out.dtype == F64
    torch.testing.assert_close(out, op.apply(x), rtol=1e-5, atol=1e-5)
    assert op32.adjoint(randn(n, m, seed=seed)).dtype == F64


# ---------------------------------------------------------------------- batching


@st.composite
def indices(draw: st.DrawFn, n: int) -> tuple[Any, list[int]]:
    """An index of one supported kind, and the positions it selects."""
    kind = draw(
        st.sampled_from(
            ["int", "slice", "list", "numpy", "negative", "torch", "bool", "tbool", "sklearn"]
        )
    )
    positions = draw(st.lists(st.integers(0, n - 1), max_size=2 * n))
    if kind == "int":
        i = draw(st.integers(-n, n - 1))
        return i, [i % n]
    if kind == "slice":
        sl = slice(
            draw(st.none() | st.integers(-n, n)),
            draw(st.none() | st.integers(-n, n)),
            draw(st.none() | st.integers(1, 3)),
        )
        return sl, list(range(n))[sl]
    if kind in ("bool", "tbool"):
        mask = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
        index = mask if kind == "bool" else torch.from_numpy(mask)
        return index, np.flatnonzero(mask).tolist()
    if kind == "list":
        return positions, positions
    if kind == "negative":
        return np.array([p - n for p in positions], dtype=np.int64), positions
    if kind == "torch":
        return torch.tensor(positions, dtype=torch.long), positions
    array = np.array(positions, dtype=np.int64)
    return ((array, Ellipsis) if kind == "sklearn" else array), positions


@SETTINGS
@given(op=operators, data=st.data(), seed=st.integers(0, 1000))
def test_indexing_commutes_with_apply(op: Operator, data: st.DataObject, seed: int) -> None:
    """op[idx].apply(x[idx]) == op.apply(x)[idx], for every kind of index."""
    n, m, d = op.shape
    index, positions = data.draw(indices(n))
    sub = op[index]
    k = len(positions)
    assert len(sub) == k and sub.shape == (k, m, d)
    x, y = randn(n, d, seed=seed), randn(n, m, seed=seed + 1)
    torch.testing.assert_close(sub.apply(x[positions]).expand(k, -1), op.apply(x)[positions])
    torch.testing.assert_close(sub.adjoint(y[positions]).expand(k, -1), op.adjoint(y)[positions])
    var = op.noise_var.broadcast_to(n, m)[positions]
    torch.testing.assert_close(sub.noise_var.broadcast_to(k, m), var)
    observed = op.observed.broadcast_to(n, m)[positions]
    assert torch.equal(sub.observed.broadcast_to(k, m), observed)


@SETTINGS
@given(op=operators, data=st.data(), seed=st.integers(0, 1000))
def test_sklearn_safe_indexing(op: Operator, data: st.DataObject, seed: int) -> None:
    """scikit-learn's splitters index operators like arrays (through ``op[idx, ...]``)."""
    n, _, d = op.shape
    assert _num_samples(op) == n
    check_consistent_length(op, np.zeros((n, 2)))
    positions = data.draw(st.lists(st.integers(0, n - 1), max_size=2 * n))
    as_bool = data.draw(st.booleans())
    index = np.isin(np.arange(n), positions) if as_bool else np.array(positions, dtype=np.int64)
    expected = np.flatnonzero(index).tolist() if as_bool else positions
    sub = _safe_indexing(op, index)
    assert isinstance(sub, type(op)) and len(sub) == len(expected)
    x = randn(n, d, seed=seed)
    torch.testing.assert_close(
        sub.apply(x[expected]).expand(len(expected), -1), op.apply(x)[expected]
    )


@SETTINGS
@given(
    kind=st.sampled_from(KINDS),
    n=st.integers(2, 5),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
)
def test_expand_then_index(kind: str, n: int, data: st.DataObject, seed: int) -> None:
    """A shared operator expanded to ``n`` and indexed acts as the original, broadcast."""
    op = build(kind, 1, True, "scalar", seed)
    big = op.expand(n)
    assert len(big) == n and big.shape == (n, *op.shape[1:])
    index, positions = data.draw(indices(n))
    x = randn(n, op.n_features, seed=seed % 1000)
    out = big[index].apply(x[positions])
    torch.testing.assert_close(out, op.apply(x[positions]))
    torch.testing.assert_close(out, op.apply(x)[positions])


def test_expand_rejects_per_sample_operators() -> None:
    op = Mask(np.ones((3, 4), dtype=bool))
    assert op.expand(3) is op
    with pytest.raises(ValueError, match="batch size 1"):
        op.expand(5)
    with pytest.raises(ValueError, match="n must be an int in the range"):
        Identity(3).expand(0)


@pytest.mark.parametrize(
    "index",
    [5, -6, [0, 5], np.array([0.5]), np.ones((2, 2), dtype=int), np.ones(4, dtype=bool), True],
)
def test_bad_indices_raise_index_error(index: Any) -> None:
    op = Mask(np.ones((5, 3), dtype=bool))
    with pytest.raises(IndexError):
        op[index]


def test_index_tuple_must_select_whole_trailing_axes() -> None:
    op = Mask(np.ones((5, 3), dtype=bool))
    assert len(op[np.array([1, 2]), :]) == 2
    with pytest.raises(IndexError, match="sample axis"):
        op[np.array([1, 2]), 0]


def test_cross_validation_splits_operator_with_y() -> None:
    rng = np.random.default_rng(0)
    op = Dense(rng.standard_normal((10, 2, 3)), noise_std=rng.uniform(0.1, 1, 10))
    Y = np.arange(10.0)[:, None].repeat(2, axis=1)
    y_train, y_test, op_train, op_test = train_test_split(Y, op, test_size=0.3, random_state=0)
    assert (len(op_train), len(op_test)) == (len(y_train), len(y_test)) == (7, 3)
    rows = y_test[:, 0].astype(int)
    torch.testing.assert_close(op_test.weight, op.weight[rows])
    torch.testing.assert_close(op_test.noise_std, op.noise_std[rows])
    for train, test in KFold(3).split(Y):
        assert len(_safe_indexing(op, train)) == len(train)
        assert len(_safe_indexing(op, test)) == len(test)
    with pytest.raises(ValueError, match="inconsistent"):
        check_consistent_length(op, Y[:5])


# ---------------------------------------------------------------------- known values


def test_identity_is_identity() -> None:
    op = Identity(4, noise_std=0.5)
    x = randn(2, 4)
    assert torch.equal(op(x), x) and torch.equal(op.adjoint(x), x)
    assert op.shape == (1, 4, 4)
    torch.testing.assert_close(op.noise_var, torch.full((1, 1), 0.25))


def test_mask_zeroes_hidden_entries() -> None:
    mask = np.array([[True, False, True], [False, False, True]])
    op = Mask(mask, noise_std=0.1)
    x = randn(2, 3) + 5.0
    out = op.apply(x)
    assert torch.equal(out[~torch.from_numpy(mask)], torch.zeros(3, dtype=F64))
    assert torch.equal(out[torch.from_numpy(mask)], x[torch.from_numpy(mask)])
    var = op.noise_var.broadcast_to(2, 3)
    torch.testing.assert_close(var, torch.where(torch.from_numpy(mask), 0.01, 1.0))
    assert op.n_observed().tolist() == [2, 1]
    y = torch.tensor([[1.0, float("nan"), 2.0], [float("nan"), float("inf"), 3.0]])
    assert torch.equal(op.adjoint(y), torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]]))


def test_mask_from_nan_and_prepare() -> None:
    Y = np.array([[1.0, np.nan, 3.0], [np.nan, 2.0, np.nan]])
    op = Mask.from_nan(Y, noise_std=0.1)
    assert op.mask.tolist() == [[True, False, True], [False, True, False]]
    prepared = op.prepare(torch.as_tensor(Y))
    assert torch.equal(prepared, torch.tensor([[1.0, 0.0, 3.0], [0.0, 2.0, 0.0]], dtype=F64))
    torch.testing.assert_close(op.prepare(Y), prepared.float())  # arrays are accepted too
    with pytest.raises(ValueError, match="inf"):
        Mask.from_nan(np.array([[1.0, np.inf]]))
    with pytest.raises(ValueError, match=r"\(n, D\)"):
        Mask.from_nan(np.ones(3))


def test_prepare_rejects_nan_in_observed_entries_and_bad_shapes() -> None:
    op = Mask(np.array([True, False, True]))
    with pytest.raises(ValueError, match="NaN or inf"):
        op.prepare(torch.tensor([[np.nan, 0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        op.prepare(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="NaN or inf"):
        Identity(2).prepare(torch.tensor([[1.0, np.inf]]))
    with pytest.raises(ValueError, match="rows"):
        Dense(np.ones((3, 2, 2))).prepare(torch.zeros(2, 2))


def test_downsample_known_values() -> None:
    op = Downsample(2, (1, 4, 4))
    assert op.shape == (1, 4, 16)
    const = torch.full((2, 16), 3.5, dtype=F64)
    torch.testing.assert_close(op.apply(const), torch.full((2, 4), 3.5, dtype=F64))
    x = torch.arange(16, dtype=F64).reshape(1, 16)
    # blocks of [[0, 1], [4, 5]], [[2, 3], [6, 7]], ...
    torch.testing.assert_close(op.apply(x), torch.tensor([[2.5, 4.5, 10.5, 12.5]], dtype=F64))
    up = op.adjoint(torch.tensor([[4.0, 8.0, 12.0, 16.0]], dtype=F64)).reshape(4, 4)
    expected = torch.tensor([[1.0, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]], dtype=F64)
    torch.testing.assert_close(up, expected)


def test_grayscale_known_values() -> None:
    op = Grayscale((3, 2, 2))
    assert op.shape == (1, 4, 12)
    channel = randn(2, 4)
    rgb = channel.repeat(1, 3)  # equal channels: gray == channel (default weights sum to 1)
    torch.testing.assert_close(op.apply(rgb), channel.float().to(F64), rtol=1e-6, atol=1e-6)
    custom = Grayscale((2, 1, 2), weights=[2.0, -1.0])
    x = torch.tensor([[1.0, 2.0, 10.0, 20.0]])
    torch.testing.assert_close(custom.apply(x), torch.tensor([[-8.0, -16.0]]))
    torch.testing.assert_close(
        custom.adjoint(torch.tensor([[1.0, 3.0]])), torch.tensor([[2.0, 6.0, -1.0, -3.0]])
    )


def test_fourier_full_mask_is_an_isometry() -> None:
    op = FourierMask(np.ones((2, 4, 5), dtype=bool), (3, 4, 5)).to(dtype=F64)
    x = randn(2, 60)
    torch.testing.assert_close(op.adjoint(op.apply(x)), x)
    torch.testing.assert_close(op.apply(x).norm(dim=-1), x.norm(dim=-1))
    gram = op.matrix()[0].T @ op.matrix()[0]
    torch.testing.assert_close(gram, torch.eye(60, dtype=F64))


def test_fourier_measurements_and_pinning() -> None:
    h, w = 4, 3
    mask = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    op = FourierMask(mask, (2, h, w), noise_std=0.1).to(dtype=F64)
    x = randn(1, 2 * h * w)
    z = torch.fft.fft2(x.reshape(2, h, w), norm="ortho")
    real, imag = op.apply(x).reshape(2, 2, h, w).unbind(0)
    torch.testing.assert_close(real, z.real * mask)
    # The imaginary parts of real coefficients (frequencies (0, 0) and (2, 0)) are pinned.
    self_conjugate = torch.zeros(h, w, dtype=torch.bool)
    self_conjugate[0, 0] = self_conjugate[2, 0] = True
    torch.testing.assert_close(imag, z.imag * (mask & ~self_conjugate))
    observed = op.observed.reshape(2, 2, h, w)
    assert torch.equal(observed[0], mask.expand(2, h, w))
    assert torch.equal(observed[1], (mask & ~self_conjugate).expand(2, h, w))
    assert op.n_observed().item() == 2 * (2 * int(mask.sum()) - 2)
    var = op.noise_var.broadcast_to(1, op.n_measurements).reshape(2, 2, h, w)
    torch.testing.assert_close(var, torch.where(observed, 0.01, 1.0).to(F64))
    y = torch.full((1, op.n_measurements), float("nan"), dtype=F64)
    y[op.observed.broadcast_to(y.shape)] = 1.0
    prepared = op.prepare(y)
    assert torch.equal(prepared, op.observed.to(F64))
    assert op.shape == (1, 48, 24)
    assert FourierMask(np.ones((3, 5), dtype=bool)).image_shape == (1, 3, 5)


def test_blur_delta_kernel_is_identity() -> None:
    delta = np.zeros((5, 5))
    delta[2, 2] = 1.0
    op = Blur(delta, (2, 3, 4)).to(dtype=F64)
    x = randn(3, 24)
    torch.testing.assert_close(op.apply(x), x)
    torch.testing.assert_close(op.adjoint(x), x)


def test_blur_is_a_convolution_with_zero_padding() -> None:
    rng = np.random.default_rng(1)
    kernels = rng.standard_normal((2, 3, 5))  # asymmetric, per sample
    op = Blur(kernels, (2, 6, 7)).to(dtype=F64)
    x = randn(2, 84)
    out = op.apply(x).reshape(2, 2, 6, 7).numpy()
    images = x.reshape(2, 2, 6, 7).numpy()
    for i in range(2):
        for c in range(2):
            expected = convolve2d(images[i, c], kernels[i].astype(np.float32), mode="same")
            np.testing.assert_allclose(out[i, c], expected, rtol=1e-6, atol=1e-6)


def test_blur_gaussian() -> None:
    op = Blur.gaussian([0.5, 2.0], 5, (1, 8, 8))
    assert op.kernel.shape == (2, 5, 5) and len(op) == 2
    torch.testing.assert_close(op.kernel.sum(dim=(-2, -1)), torch.ones(2))
    torch.testing.assert_close(op.kernel, op.kernel.flip(-1))
    torch.testing.assert_close(op.kernel, op.kernel.mT)
    assert op.kernel[0, 2, 2] > op.kernel[1, 2, 2]  # narrower is more peaked
    # away from the borders a constant image is unchanged
    out = op.apply(torch.ones(2, 64)).reshape(2, 8, 8)
    torch.testing.assert_close(out[:, 2:6, 2:6], torch.ones(2, 4, 4))
    assert (out[:, 0, 0] < 1).all()


# ---------------------------------------------------------------------- noise model


@pytest.mark.parametrize("index", range(7))
def test_noise_shapes_broadcast(index: int) -> None:
    n = 3
    shared = one_of_each(n, noise_std=0.5)[index]
    _, m, _ = shared.shape
    observed = shared.observed.broadcast_to(len(shared), m)
    expected = torch.where(observed, 0.25, 1.0)
    torch.testing.assert_close(shared.noise_var.broadcast_to(len(shared), m), expected)

    per_sample = one_of_each(n, noise_std=np.array([0.1, 0.2, 0.3]))[index]
    assert len(per_sample) == n
    var = per_sample.noise_var.broadcast_to(n, m)
    observed = per_sample.observed.broadcast_to(n, m)
    expected = torch.where(observed, torch.tensor([[0.01], [0.04], [0.09]]), 1.0)
    torch.testing.assert_close(var, expected)

    std = np.random.default_rng(0).uniform(0.1, 1.0, (n, m))
    per_measure = _factories(n)[index](std)
    var = per_measure.noise_var.broadcast_to(n, m)
    observed = per_measure.observed.broadcast_to(n, m)
    expected = torch.where(observed, torch.as_tensor(std**2, dtype=torch.float32), 1.0)
    torch.testing.assert_close(var, expected)
    assert len(per_measure[[0, 2]]) == 2


@pytest.mark.parametrize("index", range(7))
@pytest.mark.parametrize(
    "noise_std",
    [-0.1, float("nan"), float("inf"), np.ones((3, 2)), np.ones((3, 1, 1)), [0.1, -0.1, 0.1]],
)
def test_bad_noise_raises_value_error_naming_noise_std(index: int, noise_std: Any) -> None:
    make = _factories(3)[index]
    with pytest.raises(ValueError, match="noise_std"):
        make(noise_std)
    if len(make(0.0)) == 3:  # per-sample parameters fix n: another length is an error
        with pytest.raises(ValueError, match=r"noise_std.*\(n,\) = \(3,\)"):
            make(np.ones(4))


def test_non_numeric_noise_raises_type_error() -> None:
    with pytest.raises(TypeError, match="noise_std"):
        Identity(3, noise_std="loud")


def test_matrix_of_shared_map_with_per_sample_noise_is_shared() -> None:
    op = Blur(np.ones((3, 3)) / 9, (1, 3, 3), noise_std=np.array([0.1, 0.2]))
    assert len(op) == 2 and op.matrix().shape == (1, 9, 9)


# ---------------------------------------------------------------------- validation


BAD_ARGUMENTS: list[tuple[Callable[[], Any], type[Exception], str]] = [
    (lambda: Blur(np.ones((2, 2)), (1, 4, 4)), ValueError, "kernel.*odd"),
    (lambda: Blur(np.ones((3, 3, 3, 3)), (1, 4, 4)), ValueError, r"kernel.*\(k, k\)"),
    (lambda: Blur(np.full((3, 3), np.nan), (1, 4, 4)), ValueError, "kernel.*finite"),
    (lambda: Blur("wide", (1, 4, 4)), TypeError, "kernel"),
    (lambda: Blur(np.ones((3, 3)), (4, 4)), ValueError, r"image_shape.*\(C, H, W\)"),
    (lambda: Blur(np.ones((3, 3)), (1, 0, 4)), ValueError, "image_shape"),
    (lambda: Blur(np.ones((3, 3)), 16), TypeError, "image_shape"),
    (lambda: Blur(np.ones((2, 3, 3)), (1, 4, 4), noise_std=np.ones(3)), ValueError, "noise_std"),
    (lambda: Blur.gaussian(-1.0, 3, (1, 4, 4)), ValueError, "width"),
    (lambda: Blur.gaussian(1.0, 4, (1, 4, 4)), ValueError, "size"),
    (lambda: Downsample(3, (1, 4, 4)), ValueError, "divisible"),
    (lambda: Downsample(0, (1, 4, 4)), ValueError, "factor"),
    (lambda: Downsample(2.5, (1, 4, 4)), ValueError, "factor"),
    (lambda: Grayscale((1, 4, 4)), ValueError, r"weights.*\(C,\)"),
    (lambda: Grayscale((3, 4, 4), weights=[np.nan, 0, 0]), ValueError, "weights"),
    (lambda: Grayscale((3, 4, 4), weights=None), TypeError, "weights"),
    (lambda: FourierMask(np.ones((4, 4), dtype=bool), (1, 4, 5)), ValueError, r"mask.*\(H, W\)"),
    (lambda: FourierMask(np.full((4, 4), 0.5)), ValueError, "mask"),
    (lambda: FourierMask(np.ones(4, dtype=bool)), ValueError, r"mask.*\(n, H, W\)"),
    (lambda: FourierMask(None), TypeError, "mask"),
    (lambda: Mask(np.ones((2, 2, 2), dtype=bool)), ValueError, r"mask.*\(n, D\)"),
    (lambda: Mask(np.array([0, 2])), ValueError, "mask"),
    (lambda: Mask(object()), TypeError, "mask"),
    (lambda: Dense(np.full((2, 3), np.nan)), ValueError, "matrix.*finite"),
    (lambda: Dense(np.ones(3)), ValueError, r"matrix.*\(M, D\)"),
    (lambda: Dense(None), TypeError, "matrix"),
    (lambda: Identity(0), ValueError, "n_features"),
]


@pytest.mark.parametrize(("make", "error", "match"), BAD_ARGUMENTS)
def test_bad_arguments(make: Callable[[], Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("index", range(7))
def test_apply_validates_its_input(index: int) -> None:
    op = one_of_each(3)[index]
    n, m, d = op.shape
    with pytest.raises(ValueError, match=rf"x must have shape \(n, {d}\)"):
        op.apply(torch.zeros(n, d + 1))
    with pytest.raises(ValueError, match=rf"y must have shape \(n, {m}\)"):
        op.adjoint(torch.zeros(n, m, 1))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        op.apply(np.zeros((n, d)))
    if n > 1:
        with pytest.raises(ValueError, match="rows"):
            op.apply(torch.zeros(n + 1, d))


# ---------------------------------------------------------------------- devices and pickling


@pytest.mark.parametrize("index", range(7))
def test_pickle_and_joblib_round_trips(index: int, tmp_path: Any) -> None:
    op = one_of_each(3, noise_std=np.array([0.1, 0.2, 0.3]))[index]
    n, m, d = op.shape
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    y = torch.randn(n, m, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "op.joblib"
    joblib.dump(op, path)
    for copy in (pickle.loads(pickle.dumps(op)), joblib.load(path)):
        assert type(copy) is type(op) and copy.shape == op.shape
        assert torch.equal(copy.apply(x), op.apply(x))
        assert torch.equal(copy.adjoint(y), op.adjoint(y))
        assert torch.equal(copy.noise_var, op.noise_var)
        assert torch.equal(copy[[2, 0]].apply(x[[2, 0]]), op.apply(x)[[2, 0]])


@pytest.mark.parametrize("index", range(7))
def test_to_dtype_and_device(index: int) -> None:
    op = one_of_each(3)[index]
    assert op.dtype == torch.float32
    for double in (op.to(dtype=F64), op.to(torch.float64), op.to("cpu", F64)):
        assert double.dtype == F64 and double.device.type == "cpu"
        for name in (*double._batched, *double._buffers):
            tensor = getattr(double, name)
            assert tensor.dtype in (F64, torch.bool), name
        x = randn(len(op), op.n_features)
        out = double.apply(x)
        assert out.dtype == F64
        torch.testing.assert_close(out.float(), op.apply(x.float()), rtol=1e-5, atol=1e-5)
    assert op.dtype == torch.float32  # ``to`` returns a copy
    with pytest.raises(TypeError, match="floating"):
        op.to(dtype=torch.int64)


def test_repr_and_len() -> None:
    op = Downsample(2, (3, 4, 4), noise_std=np.array([0.1, 0.2]))
    assert len(op) == 2 and op.shape == (2, 12, 48)
    assert repr(op) == "Downsample(n=2, m=12, d=48, noise_std=tensor(2, 1))"
    assert op.n_features == 48 and op.n_measurements == 12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_shared_matrix_fast_path(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    matrix = torch.randn(4, 30, generator=gen, dtype=torch.float64)
    shared = Dense(matrix.float(), noise_std=0.5).expand(50)
    batched = Dense(matrix.float().expand(50, -1, -1).clone(), noise_std=0.5)
    x = torch.randn(50, 30, generator=gen, dtype=dtype)
    y = torch.randn(50, 4, generator=gen, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for a, b in ((shared.apply(x), batched.apply(x)), (shared.adjoint(y), batched.adjoint(y))):
        assert a.dtype == dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    torch.testing.assert_close(shared.apply(x), x @ matrix.float().to(dtype).T)
    torch.testing.assert_close(shared.adjoint(y), y @ matrix.float().to(dtype))
