"""Validation and conversion of parameters and arrays: one home for the checks, with messages
that name the argument.

Scalar ranges are scikit-learn's :class:`~sklearn.utils._param_validation.Interval` (the
machinery of its estimators' parameter constraints), so that the messages read like
scikit-learn's ("n_iter must be an int in the range [0, inf), got -1."); failures raise its
``InvalidParameterError``, which is both a ``ValueError`` and a ``TypeError``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.utils._param_validation import Interval, InvalidParameterError
from torch import Tensor

__all__ = [
    "as_float_tensor",
    "check_finite",
    "check_image_shape",
    "check_int",
    "check_number",
]


def _check(value: Any, name: str, interval: Interval, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not interval.is_satisfied_by(value):
        none = " or None" if allow_none else ""
        raise InvalidParameterError(f"{name} must be {interval}{none}, got {value!r}.")


def check_int(
    value: Any, name: str, low: int, high: int | None = None, *, allow_none: bool = False
) -> Any:
    """``int(value)`` if it is an integer (Python or NumPy, not a bool) in ``[low, high]``;
    ``None`` if it is ``None`` and ``allow_none``; an ``InvalidParameterError`` (a
    ``ValueError``) naming ``name`` otherwise."""
    closed = "left" if high is None else "both"
    _check(value, name, Interval(numbers.Integral, low, high, closed=closed), allow_none)
    return None if value is None else int(value)


def check_number(
    value: Any,
    name: str,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``float(value)`` if it is a finite real in ``[low, high]`` (open at ``low`` with
    ``low_open``, at ``high`` with ``high_open``); an ``InvalidParameterError`` (a
    ``ValueError``) naming ``name`` otherwise."""
    high_open = high_open or high == math.inf
    closed = {(False, False): "both", (True, False): "right", (False, True): "left"}
    interval = Interval(
        numbers.Real,
        low,
        None if high == math.inf else high,
        closed=closed.get((low_open, high_open), "neither"),
    )
    if isinstance(value, numbers.Real) and not math.isfinite(value):
        raise InvalidParameterError(f"{name} must be finite, got {value!r}.")
    _check(value, name, interval, allow_none=False)
    return float(value)


def check_finite(tensor: Tensor, name: str) -> None:
    """Raises ``ValueError`` naming ``name`` if ``tensor`` has a NaN or infinite entry."""
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} must be finite; it contains NaN or inf.")


def as_float_tensor(
    value: Any,
    name: str,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Converts array-likes (NumPy, torch, lists, numbers) to a floating tensor (detached).

    Without ``dtype``, NumPy and Python input follows torch's default dtype (float32, like
    ``torch.tensor``) and floating tensors keep theirs. Raises ``TypeError`` naming ``name`` for
    anything that is not real numbers (strings, objects, booleans, complex).
    """
    if isinstance(value, Tensor):
        tensor = value.detach()
    else:
        try:
            array = np.asarray(value)
        except (TypeError, ValueError) as error:
            kind = type(value).__name__
            raise TypeError(f"{name} must be array-like of numbers, got {kind}.") from error
        if array.dtype.kind not in "iuf":
            raise TypeError(f"{name} must be real-valued numbers, got dtype {array.dtype}.")
        tensor = torch.as_tensor(np.ascontiguousarray(array) if array.ndim else array)
        if dtype is None:
            tensor = tensor.to(torch.get_default_dtype())
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"{name} must be real-valued numbers, got dtype {tensor.dtype}.")
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.get_default_dtype())
    return tensor.to(dtype=dtype, device=device)


def check_image_shape(image_shape: Any, name: str = "image_shape") -> tuple[int, int, int]:
    """Validates an image shape ``(C, H, W)`` of positive integers and returns it as a tuple.

    Raises ``TypeError`` if it is not a sequence, ``ValueError`` if it does not hold three
    positive integers.
    """
    if isinstance(image_shape, (str, bytes)) or not isinstance(
        image_shape, (Sequence, np.ndarray, torch.Size)
    ):
        raise TypeError(
            f"{name} must be a sequence (C, H, W) of positive integers, "
            f"got {type(image_shape).__name__}."
        )
    values = tuple(image_shape)
    positive = Interval(numbers.Integral, 1, None, closed="left")
    if len(values) != 3 or not all(
        not isinstance(v, bool) and positive.is_satisfied_by(v) for v in values
    ):
        raise ValueError(f"{name} must be (C, H, W) with positive integers, got {values!r}.")
    return (int(values[0]), int(values[1]), int(values[2]))
