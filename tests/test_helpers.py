"""The single homes of the helpers: parameter checks, tensor conversion, seeds and devices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffem._device import resolve_device
from diffem._random import draw_seed, numpy_random_state, optional_generator, torch_generator
from diffem._validation import as_float_tensor, check_image_shape, check_int, check_number


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "3", None])
def test_check_int_rejects_with_the_name_and_range(value):
    with pytest.raises(ValueError, match=r"n_iter must be an int in the range \[1, inf\)"):
        check_int(value, "n_iter", 1)


def test_check_int_and_number_accept():
    assert check_int(np.int64(3), "k", 1) == 3 and type(check_int(np.int64(3), "k", 1)) is int
    assert check_int(None, "rank", 1, allow_none=True) is None
    assert check_int(2, "k", 0, 2) == 2
    assert check_number(np.float32(0.5), "eta", 0.0, 1.0) == 0.5
    with pytest.raises(ValueError, match=r"eta must be a float in the range \(0.0, 1.0\]"):
        check_number(0.0, "eta", 0.0, 1.0, low_open=True)
    with pytest.raises(ValueError, match=r"missing must be a float in the range \[0.0, 1.0\)"):
        check_number(1.0, "missing", 0.0, 1.0, high_open=True)
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="sigma must be finite"):
            check_number(bad, "sigma", 0.0)
    # scikit-learn's InvalidParameterError: a ValueError and a TypeError
    with pytest.raises(TypeError):
        check_number("a", "sigma", 0.0)


def test_as_float_tensor():
    assert as_float_tensor(np.arange(3.0), "x").dtype == torch.get_default_dtype()
    assert as_float_tensor(torch.zeros(2, dtype=torch.float64), "x").dtype == torch.float64
    assert as_float_tensor(np.ones((2, 2))[::-1], "x", dtype=torch.float64).shape == (2, 2)
    assert as_float_tensor(0.5, "x").ndim == 0
    for bad in (["a", "b"], np.array([True]), torch.zeros(2, dtype=torch.complex64), object()):
        with pytest.raises(TypeError, match="x must be"):
            as_float_tensor(bad, "x")


def test_check_image_shape():
    assert check_image_shape(np.array([1, 8, 8])) == (1, 8, 8)
    with pytest.raises(TypeError, match="image_shape"):
        check_image_shape("1x8x8")
    with pytest.raises(ValueError, match="image_shape"):
        check_image_shape((1, 0, 8))


def test_random_state_semantics():
    # an int seeds the torch generator itself; a generator is used as is
    assert torch.equal(torch_generator(7).get_state(), torch.Generator().manual_seed(7).get_state())
    generator = torch.Generator()
    assert torch_generator(generator) is generator
    # a RandomState is drawn from, and None draws from NumPy's global state (scikit-learn)
    assert draw_seed(np.random.RandomState(1)) == np.random.RandomState(1).randint(0, 2**31 - 1)
    np.random.seed(2)  # noqa: NPY002 - the global state is what None means
    first = torch.rand(3, generator=torch_generator(None))
    np.random.seed(2)  # noqa: NPY002
    assert torch.equal(first, torch.rand(3, generator=torch_generator(None)))
    # torch-level generator=None stays torch's global generator
    assert optional_generator(None, "cpu") is None
    assert isinstance(numpy_random_state(torch.Generator().manual_seed(0)), np.random.RandomState)
    with pytest.raises(ValueError, match="random_state"):
        torch_generator("seed")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="device"):
        resolve_device("not-a-device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
