"""Tests of diffem.datasets: shapes, ranges, reproducibility, noise levels, CIFAR round trip."""

from __future__ import annotations

import pickle
import tarfile

import numpy as np
import pytest
import torch

from diffem.datasets import (
    CIFAR10,
    load_cifar10,
    load_digits_corrupted,
    load_image_patches,
    make_manifold,
)
from diffem.operators import Dense, Mask


# ----------------------------------------------------------------------- manifold
def test_manifold_shapes_range_and_operator():
    data = make_manifold(n_samples=2000, random_state=0)
    X, Y, op = data
    assert X.shape == (2000, 5) and Y.shape == (2000, 2)
    assert X.dtype == np.float32 and Y.dtype == np.float32
    assert isinstance(op, Dense) and op.shape == (2000, 2, 5)
    assert X.min() >= -2 and X.max() <= 2
    # The scaling maps the whole curve onto [-2, 2]: a large sample nearly reaches both ends.
    assert np.all(X.min(axis=0) < -1.8) and np.all(X.max(axis=0) > 1.8)
    np.testing.assert_allclose(torch.linalg.norm(op.matrix(), dim=-1), 1.0, atol=1e-6)
    assert float(op.noise_std.max()) == pytest.approx(0.01)
    assert data.t.shape == (2000,) and 0 <= data.t.min() and data.t.max() <= 1


def test_manifold_noise_level():
    X, Y, op = make_manifold(n_samples=8000, noise_std=0.05, random_state=1)
    residual = Y - op.apply(torch.from_numpy(X)).numpy()
    # std of 16000 Gaussians: relative standard error 1/sqrt(2 * 16000) < 0.6 %.
    assert residual.std() == pytest.approx(0.05, rel=0.03)
    assert abs(residual.mean()) < 4 * 0.05 / np.sqrt(residual.size)
    X0, Y0, op0 = make_manifold(n_samples=100, noise_std=0.0, random_state=1)
    np.testing.assert_allclose(Y0, op0.apply(torch.from_numpy(X0)).numpy(), atol=1e-5)


def test_manifold_is_a_smooth_curve():
    data = make_manifold(n_samples=3000, random_state=2)
    order = np.argsort(data.t)
    steps = np.linalg.norm(np.diff(data.X[order], axis=0), axis=1)
    # Neighbouring parameters give neighbouring points (a 1-D manifold, not a cloud).
    assert np.quantile(steps, 0.99) < 0.2
    assert np.linalg.matrix_rank(np.cov(data.X.T)) == 5  # but it spans all of R^5


def test_manifold_reproducible_and_curve_shared():
    a = make_manifold(n_samples=500, random_state=0)
    b = make_manifold(n_samples=500, random_state=0)
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.Y, b.Y)
    c = make_manifold(n_samples=500, random_state=1)
    assert not np.allclose(a.X, c.X)
    # The curve depends on the seed only, not on n_samples ...
    small = make_manifold(n_samples=10, random_state=0)
    np.testing.assert_array_equal(small.X, a.X[:10])
    # ... and a held-out set on the same curve comes from manifold_random_state.
    held = make_manifold(n_samples=2000, random_state=5, manifold_random_state=0)
    train = make_manifold(n_samples=2000, random_state=0)
    dist = np.linalg.norm(held.X[:200, None] - train.X[None], axis=-1).min(axis=1)
    assert np.quantile(dist, 0.95) < 0.1
    assert not np.allclose(held.t[:10], train.t[:10])


def test_manifold_validation():
    with pytest.raises(ValueError, match="n_samples"):
        make_manifold(n_samples=0)
    with pytest.raises(ValueError, match="noise_std"):
        make_manifold(n_samples=10, noise_std=-1.0)


# ----------------------------------------------------------------------- digits
def test_digits_shapes_range_and_missing_fraction():
    data = load_digits_corrupted(missing=0.75, noise_std=0.05, random_state=0)
    X, Y, op = data
    assert X.shape == Y.shape == (1797, 64) and X.dtype == np.float32
    assert data.image_shape == (1, 8, 8) and data.target.shape == (1797,)
    assert X.min() == -1.0 and X.max() == 1.0
    assert isinstance(op, Mask) and op.shape == (1797, 64, 64)
    np.testing.assert_array_equal(op.mask.numpy(), data.mask)
    np.testing.assert_array_equal(np.isnan(Y), ~data.mask)
    n = data.mask.size
    hidden = 1 - data.mask.mean()
    assert abs(hidden - 0.75) < 4 * np.sqrt(0.75 * 0.25 / n)  # binomial tolerance
    # Masks differ from image to image.
    assert len({row.tobytes() for row in data.mask}) > 1700


def test_digits_noise_level_and_fill_value():
    data = load_digits_corrupted(missing=0.3, noise_std=0.1, random_state=1, fill_value=0.0)
    residual = (data.Y - data.X)[data.mask]
    assert residual.std() == pytest.approx(0.1, rel=0.03)
    assert np.all(data.Y[~data.mask] == 0.0)
    clean = load_digits_corrupted(missing=0.0, noise_std=0.0, random_state=1)
    np.testing.assert_array_equal(clean.X, clean.Y)
    assert clean.mask.all()


def test_digits_reproducible_and_subset():
    a = load_digits_corrupted(random_state=3, n_samples=100)
    b = load_digits_corrupted(random_state=3, n_samples=100)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(np.nan_to_num(a.Y), np.nan_to_num(b.Y))
    assert a.X.shape == (100, 64) and len(a.operator) == 100
    c = load_digits_corrupted(random_state=4, n_samples=100)
    assert not np.array_equal(a.mask, c.mask)
    with pytest.raises(ValueError, match="missing"):
        load_digits_corrupted(missing=1.0)
    with pytest.raises(ValueError, match="n_samples"):
        load_digits_corrupted(n_samples=5000)


def test_digits_operator_from_nan_agrees():
    data = load_digits_corrupted(missing=0.5, random_state=0, n_samples=50)
    inferred = Mask.from_nan(data.Y)
    np.testing.assert_array_equal(inferred.mask.numpy(), data.mask)


# ----------------------------------------------------------------------- image patches
@pytest.mark.parametrize("grayscale, channels", [(True, 1), (False, 3)])
def test_image_patches(grayscale, channels):
    data = load_image_patches(patch_size=6, n_patches=500, grayscale=grayscale, random_state=0)
    X, image_shape = data
    assert X.shape == (500, channels * 36) and X.dtype == np.float32
    assert image_shape == (channels, 6, 6)
    assert -1.0 <= X.min() < -0.5 and 0.5 < X.max() <= 1.0
    assert set(np.unique(data.source)) == {0, 1}
    again = load_image_patches(patch_size=6, n_patches=500, grayscale=grayscale, random_state=0)
    np.testing.assert_array_equal(X, again.X)
    # Natural-image patches are smooth: neighbouring pixels are strongly correlated.
    images = X.reshape(500, *image_shape)
    corr = np.corrcoef(images[..., :-1].ravel(), images[..., 1:].ravel())[0, 1]
    assert corr > 0.7


def test_image_patches_validation():
    with pytest.raises(ValueError, match="patch_size"):
        load_image_patches(patch_size=1000)


# ----------------------------------------------------------------------- CIFAR-10
def _write_batch(path, data, labels):
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"test", b"data": data, b"labels": labels}, f)


@pytest.fixture
def cifar_dir(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for k in range(1, 6):
        data = rng.integers(0, 256, size=(2, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=2)]
        _write_batch(folder / f"data_batch_{k}", data, labels)
        batches[f"data_batch_{k}"] = (data, labels)
    data = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
    data[0, 0], data[0, 1] = 0, 255
    _write_batch(folder / "test_batch", data, [0, 9, 4])
    batches["test_batch"] = (data, [0, 9, 4])
    return folder, batches


def test_cifar_round_trip(cifar_dir):
    folder, batches = cifar_dir
    train = load_cifar10(folder)
    assert isinstance(train, CIFAR10)
    assert train.X.shape == (10, 3072) and train.X.dtype == np.float32
    assert train.image_shape == (3, 32, 32) and len(train.class_names) == 10
    raw = np.concatenate([batches[f"data_batch_{k}"][0] for k in range(1, 6)])
    labels = [v for k in range(1, 6) for v in batches[f"data_batch_{k}"][1]]
    np.testing.assert_allclose(train.X, raw / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(train.target, labels)
    np.testing.assert_array_equal(np.round((train.X + 1) * 127.5).astype(np.uint8), raw)
    test = load_cifar10(folder.parent, train=False)  # the parent folder works too
    X, target = test
    assert X.shape == (3, 3072) and list(target) == [0, 9, 4]
    assert X[0, 0] == -1.0 and X[0, 1] == 1.0


def test_cifar_from_archive(cifar_dir, tmp_path):
    folder, _ = cifar_dir
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    from_archive = load_cifar10(archive)
    np.testing.assert_array_equal(from_archive.X, load_cifar10(folder).X)


def test_cifar_subset(cifar_dir):
    folder, _ = cifar_dir
    full = load_cifar10(folder)
    first = load_cifar10(folder, subset=4)
    np.testing.assert_array_equal(first.X, full.X[:4])
    a = load_cifar10(folder, subset=4, random_state=0)
    b = load_cifar10(folder, subset=4, random_state=0)
    np.testing.assert_array_equal(a.X, b.X)
    assert a.X.shape == (4, 3072)
    with pytest.raises(ValueError, match="subset"):
        load_cifar10(folder, subset=11)


def test_cifar_missing_and_malformed(cifar_dir, tmp_path):
    folder, _ = cifar_dir
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cifar10(tmp_path / "nowhere")
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_cifar10(folder)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_3"):
        load_cifar10(folder)
    _write_batch(folder / "data_batch_3", np.zeros((2, 100), dtype=np.uint8), [0, 1])
    with pytest.raises(ValueError, match="3072"):
        load_cifar10(folder)
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), dtype=np.uint8)}, f)
    with pytest.raises(ValueError, match="labels"):
        load_cifar10(folder)
