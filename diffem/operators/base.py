r"""Batched linear-Gaussian observation models :math:`y_i = A_i x_i + e_i`.

An :class:`Operator` is a batch of ``n`` per-sample linear maps :math:`A_i : \mathbb{R}^D \to
\mathbb{R}^M` with diagonal Gaussian noise :math:`e_i \sim \mathcal{N}(0, \operatorname{diag}
(\sigma_{y,i}^2))`. Parameters shared by all samples (one matrix, one mask) are stored once with a
leading batch dimension of 1 and broadcast; :meth:`Operator.expand` turns such an operator into a
length-``n`` batch so that cross-validation can split it alongside ``Y``.

Subclasses declare their per-sample tensors in ``_batched`` (attribute names whose leading
dimension is the batch, of size ``n`` or 1) and implement :meth:`Operator.apply` and
:meth:`Operator.adjoint`; indexing, ``expand``, ``to``, pickling and the noise model come from
this base class.

Measurements that an operator does not observe (the hidden entries of a
:class:`~diffem.operators.Mask`) are *pinned*: :math:`A_i` maps every :math:`x` to 0 there, the
observation value is taken as 0 and
its noise variance as 1, so that they carry no information about :math:`x` and every sampler and
solver treats them without a special case. :attr:`Operator.observed` tells which measurements are
real, and :meth:`Operator.prepare` maps user observations onto this convention.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["Operator", "as_noise_std", "check_finite", "check_positive_int"]

Index = int | slice | Sequence[int] | np.ndarray | Tensor | tuple


def _as_float_tensor(value: Any, name: str, dtype: torch.dtype | None = None) -> Tensor:
    """Converts ``value`` to a floating tensor, or raises a ``TypeError`` naming ``name``."""
    try:
        tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, Tensor) else value)
    except (TypeError, ValueError, RuntimeError) as error:
        kind = type(value).__name__
        raise TypeError(f"{name} must be array-like of numbers, got {kind}.") from error
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"{name} must be real-valued numbers, got dtype {tensor.dtype}.")
    if not (isinstance(value, Tensor) and tensor.is_floating_point()):
        # NumPy and Python numbers follow torch's default dtype (float32), like torch.tensor.
        tensor = tensor.to(torch.get_default_dtype())
    if dtype is not None:
        tensor = tensor.to(dtype)
    return tensor


def as_noise_std(noise_std: Any, n: int | None, m: int) -> Tensor:
    r"""Validates a noise standard deviation and returns it with shape ``(n | 1, m | 1)``.

    Accepts a scalar (shared), a ``(n,)`` vector (per sample) or a ``(n, m)`` array (per
    measurement). ``n=None`` means the operator's batch size is not known yet (shared
    parameters): then a vector fixes it.
    """
    std = _as_float_tensor(noise_std, "noise_std")
    if std.ndim == 0:
        std = std.reshape(1, 1)
    elif std.ndim == 1:
        if n is not None and std.shape[0] not in (1, n):
            raise ValueError(
                f"noise_std must be a scalar, of shape (n,) = ({n},) or (n, m) = ({n}, {m}); "
                f"got shape {tuple(std.shape)}."
            )
        std = std.reshape(-1, 1)
    elif std.ndim == 2:
        if (n is not None and std.shape[0] not in (1, n)) or std.shape[1] not in (1, m):
            raise ValueError(
                f"noise_std must be a scalar, of shape (n,) = ({n},) or (n, m) = ({n}, {m}); "
                f"got shape {tuple(std.shape)}."
            )
    else:
        raise ValueError(
            f"noise_std must be a scalar, a (n,) or a (n, m) array; got {std.ndim} dimensions."
        )
    if not torch.isfinite(std).all():
        raise ValueError("noise_std must be finite; it contains NaN or inf.")
    if (std < 0).any():
        raise ValueError(f"noise_std must be non-negative; its minimum is {std.min().item():g}.")
    return std


def _normalize_index(index: Index, n: int) -> Tensor:
    """Turns any supported index into a 1-D ``int64`` tensor of positions in ``range(n)``."""
    if isinstance(index, tuple):
        # scikit-learn's cross-validation indexes with ``(index_array, Ellipsis)``.
        full = (Ellipsis, slice(None))
        rest = [i for i in index[1:] if not any(i is f or i == f for f in full)]
        if len(index) == 0 or rest:
            raise IndexError(
                f"operators can only be indexed along the sample axis, got {index!r}."
            )
        index = index[0]
    positions = torch.arange(n)
    if isinstance(index, (int, np.integer)):
        return positions[int(index)].reshape(1)
    if isinstance(index, slice):
        return positions[index]
    if isinstance(index, Tensor):
        index = index.cpu()
    else:
        index = torch.as_tensor(np.asarray(index))
    if index.dtype == torch.bool:
        if index.shape != (n,):
            raise IndexError(f"boolean index must have shape ({n},), got {tuple(index.shape)}.")
        return positions[index]
    if index.is_floating_point() and index.numel() > 0:
        raise IndexError(f"operator indices must be integers or booleans, got {index.dtype}.")
    return positions[index.long().reshape(-1)]


class Operator:
    r"""Base class of batched linear observation operators :math:`A_i` with Gaussian noise.

    Shapes: ``apply`` maps ``(n, D) -> (n, M)``, ``adjoint`` maps ``(n, M) -> (n, D)``, where
    ``n = len(op)``. An operator of batch size 1 broadcasts against any batch.

    Subclasses set ``self._n``, ``self._m``, ``self._d`` and ``self.noise_std`` (via
    :meth:`_set_noise`), list their per-sample tensor attributes in ``_batched`` and implement
    :meth:`apply` and :meth:`adjoint`.
    """

    _batched: tuple[str, ...] = ()

    _n: int
    _m: int
    _d: int
    noise_std: Tensor

    # ------------------------------------------------------------------ the linear map
    def apply(self, x: Tensor) -> Tensor:
        r""":math:`A_i x_i`, shape ``(n, D) -> (n, M)``."""
        raise NotImplementedError

    def adjoint(self, y: Tensor) -> Tensor:
        r""":math:`A_i^\top y_i`, shape ``(n, M) -> (n, D)``."""
        raise NotImplementedError

    def __call__(self, x: Tensor) -> Tensor:
        return self.apply(x)

    def matrix(self) -> Tensor:
        r"""The dense matrices :math:`A_i`, shape ``(n | 1, M, D)``.

        Built column by column from :meth:`apply`; subclasses with an explicit matrix override
        it. Meant for exact computations at moderate ``D``.
        """
        n = 1 if self._all_shared() else self._n
        eye = torch.eye(self._d, dtype=self.dtype, device=self.device)
        columns = [self.apply(eye[j].expand(n, -1)) for j in range(self._d)]
        return torch.stack(columns, dim=-1)

    # ------------------------------------------------------------------ noise model
    def _set_noise(self, noise_std: Any) -> None:
        known = None if self._all_shared(ignore_noise=True) else self._n
        std = as_noise_std(noise_std, known, self._m)
        if known is None and std.shape[0] > 1:
            self._n = std.shape[0]
        self.noise_std = std

    @property
    def observed(self) -> Tensor:
        """Boolean tensor broadcastable to ``(n, M)``: which measurements are real observations."""
        return torch.ones(1, 1, dtype=torch.bool, device=self.device)

    @property
    def noise_var(self) -> Tensor:
        r"""Noise variances :math:`\sigma_{y}^2`, broadcastable to ``(n, M)``.

        Pinned (unobserved) measurements have variance 1; see the module docstring.
        """
        var = self.noise_std**2
        observed = self.observed
        if observed.all():
            return var
        return torch.where(observed, var, torch.ones_like(var))

    def prepare(self, y: Tensor) -> Tensor:
        """Maps observations ``(n, M)`` onto the pinned convention: zeros where unobserved.

        Raises ``ValueError`` if an observed entry is NaN or infinite.
        """
        observed = self.observed.expand_as(y) if self.observed.ndim else self.observed
        bad = ~torch.isfinite(y) & observed
        if bad.any():
            rows = torch.nonzero(bad.any(dim=-1)).flatten()[:5].tolist()
            raise ValueError(
                "Y has NaN or inf entries where the operator observes a value "
                f"(first rows: {rows}); mark missing entries with a Mask operator instead."
            )
        return torch.where(observed, y, torch.zeros_like(y))

    def n_observed(self) -> Tensor:
        """Number of real (unpinned) measurements per sample, shape ``(n | 1,)``."""
        return self.observed.expand(-1, self._m).sum(dim=-1)

    # ------------------------------------------------------------------ sizes
    @property
    def n_features(self) -> int:
        """``D``, the dimension of the latents."""
        return self._d

    @property
    def n_measurements(self) -> int:
        """``M``, the dimension of the observations."""
        return self._m

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(n, M, D)``."""
        return (self._n, self._m, self._d)

    def __len__(self) -> int:
        return self._n

    @property
    def device(self) -> torch.device:
        return self.noise_std.device

    @property
    def dtype(self) -> torch.dtype:
        return self.noise_std.dtype

    # ------------------------------------------------------------------ batching
    def _tensors(self) -> tuple[str, ...]:
        return (*self._batched, "noise_std")

    def _all_shared(self, ignore_noise: bool = False) -> bool:
        names = self._batched if ignore_noise else self._tensors()
        return all(getattr(self, name).shape[0] == 1 for name in names if hasattr(self, name))

    def __getitem__(self, index: Index) -> Operator:
        """The sub-batch ``op[index]``: an int, slice, int array, boolean mask or ``(idx, ...)``."""
        positions = _normalize_index(index, self._n)
        new = copy.copy(self)
        for name in self._tensors():
            tensor = getattr(self, name)
            if tensor.shape[0] != 1:
                setattr(new, name, tensor[positions.to(tensor.device)])
        new._n = int(positions.numel())
        return new

    def expand(self, n: int) -> Operator:
        """A length-``n`` batch of this operator, which must have batch size 1 (shared).

        Shared tensors are kept once; only the reported length changes, so the result costs
        no memory and can be indexed by cross-validation splitters.
        """
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}.")
        if self._n == n:
            return self
        if not self._all_shared():
            raise ValueError(
                f"only an operator of batch size 1 (shared parameters) can be expanded; this one "
                f"has {self._n} samples and cannot be expanded to {n}."
            )
        new = copy.copy(self)
        new._n = int(n)
        return new

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> Operator:
        """A copy on ``device`` with floating tensors cast to ``dtype``."""
        new = copy.copy(self)
        for name in self._tensors():
            tensor = getattr(self, name)
            cast = dtype if (dtype is not None and tensor.is_floating_point()) else None
            setattr(new, name, tensor.to(device=device, dtype=cast))
        return new

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_device"] = str(self.device)
        for name in self._tensors():
            state[name] = state[name].cpu()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        device = torch.device(state.pop("_device", "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            device = torch.device("cpu")
        self.__dict__.update(state)
        for name in self._tensors():
            setattr(self, name, getattr(self, name).to(device))

    # ------------------------------------------------------------------ helpers
    def _check_input(self, value: Tensor, size: int, name: str) -> None:
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}.")
        if value.ndim != 2 or value.shape[-1] != size:
            raise ValueError(
                f"{name} must have shape (n, {size}), got {tuple(value.shape)}."
            )
        if self._n != 1 and value.shape[0] not in (1, self._n):
            raise ValueError(
                f"{name} has {value.shape[0]} rows but the operator has {self._n} samples."
            )

    def __repr__(self) -> str:
        n, m, d = self.shape
        std = self.noise_std
        noise = f"{std.item():g}" if std.numel() == 1 else f"tensor{tuple(std.shape)}"
        return f"{type(self).__name__}(n={n}, m={m}, d={d}, noise_std={noise})"


def check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def check_finite(tensor: Tensor, name: str) -> None:
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} must be finite; it contains NaN or inf.")

