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

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffem._device import loadable_device
from diffem._validation import as_float_tensor, check_finite, check_int

__all__ = ["Operator", "as_batched", "as_noise_std"]

Index = int | slice | Sequence[int] | np.ndarray | Tensor | tuple


def _as_bool_tensor(value: Any, name: str) -> Tensor:
    """Converts ``value`` (booleans, or numbers equal to 0 or 1) to a ``bool`` tensor.

    Raises ``TypeError`` naming ``name`` if ``value`` is not array-like, ``ValueError`` if it
    holds NaN, inf or numbers other than 0 and 1.
    """
    try:
        tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, Tensor) else value)
    except (TypeError, ValueError, RuntimeError) as error:
        kind = type(value).__name__
        raise TypeError(f"{name} must be a boolean array, got {kind}.") from error
    if tensor.dtype == torch.bool:
        return tensor
    if tensor.is_complex():
        raise TypeError(f"{name} must be a boolean array, got dtype {tensor.dtype}.")
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise ValueError(f"{name} must be boolean (or 0/1); it contains NaN or inf.")
    if not ((tensor == 0) | (tensor == 1)).all():
        raise ValueError(f"{name} must be boolean or contain only 0 and 1.")
    return tensor.bool()


def as_batched(value: Any, name: str, ndim: int, shapes: str) -> Tensor:
    """``value`` as a floating tensor with a leading batch dimension: a shared parameter of
    ``ndim`` dimensions gets one of size 1, one of ``ndim + 1`` dimensions is per sample.

    Raises ``ValueError`` naming ``name`` and the accepted ``shapes`` for other shapes, an
    empty dimension, or a NaN or infinite entry.
    """
    tensor = as_float_tensor(value, name)
    if tensor.ndim == ndim:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != ndim + 1 or 0 in tensor.shape:
        raise ValueError(f"{name} must have shape {shapes}, got {tuple(tensor.shape)}.")
    check_finite(tensor, name)
    return tensor


def as_noise_std(noise_std: Any, n: int | None, m: int) -> Tensor:
    r"""Validates a noise standard deviation and returns it with shape ``(n | 1, m | 1)``.

    Accepts a scalar (shared), a ``(n,)`` vector (per sample) or a ``(n, m)`` array (per
    measurement). ``n=None`` means the operator's batch size is not known yet (shared
    parameters): then a vector fixes it.
    """
    std = as_float_tensor(noise_std, "noise_std")
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


def _is_full_slice(item: Any) -> bool:
    """Whether ``item`` selects a whole trailing axis: ``...`` or ``:``."""
    return item is Ellipsis or (isinstance(item, slice) and item == slice(None))


def _normalize_index(index: Index, n: int) -> Tensor:
    """Turns any supported index into a 1-D ``int64`` tensor of positions in ``range(n)``.

    Accepts an int, a slice, a sequence / NumPy array / tensor of ints or of booleans (shape
    ``(n,)``), and the tuple ``(index, ...)`` that scikit-learn's ``_safe_indexing`` passes.
    An int selects a sub-batch of length 1.
    """
    if isinstance(index, tuple):
        # scikit-learn's cross-validation indexes with ``(index_array, Ellipsis)``.
        if len(index) == 0 or not all(_is_full_slice(item) for item in index[1:]):
            raise IndexError(f"operators can only be indexed along the sample axis, got {index!r}.")
        index = index[0]
    positions = torch.arange(n)
    if isinstance(index, (bool, np.bool_)):
        raise IndexError("a scalar boolean is not a valid operator index; use a (n,) mask.")
    if isinstance(index, (int, np.integer)):
        if not -n <= int(index) < n:
            raise IndexError(f"index {int(index)} is out of range for an operator of {n} samples.")
        return positions[int(index)].reshape(1)
    if isinstance(index, slice):
        return positions[index]
    if isinstance(index, Tensor):
        index = index.detach().cpu()
    else:
        try:
            index = torch.as_tensor(np.asarray(index))
        except (TypeError, ValueError, RuntimeError) as error:
            raise IndexError(f"unsupported operator index {index!r}.") from error
    if index.ndim > 1:
        raise IndexError(f"operator indices must be 1-D, got shape {tuple(index.shape)}.")
    if index.dtype == torch.bool:
        if index.shape != (n,):
            raise IndexError(f"boolean index must have shape ({n},), got {tuple(index.shape)}.")
        return positions[index]
    if index.numel() == 0:
        return positions[:0]
    if index.is_floating_point() or index.is_complex():
        raise IndexError(f"operator indices must be integers or booleans, got {index.dtype}.")
    index = index.long().reshape(-1)
    if ((index < -n) | (index >= n)).any():
        raise IndexError(f"indices {index.tolist()} are out of range for {n} samples.")
    return positions[index]


class Operator:
    r"""Base class of batched linear observation operators :math:`A_i` with Gaussian noise.

    Shapes: ``apply`` maps ``(n, D) -> (n, M)``, ``adjoint`` maps ``(n, M) -> (n, D)``, where
    ``n = len(op)``. An operator of batch size 1 broadcasts against any batch, and an input of
    batch size 1 broadcasts against the operator's batch.

    Subclasses set ``self._n``, ``self._m``, ``self._d`` and ``self.noise_std`` (via
    :meth:`_set_noise`), list their per-sample tensor attributes in ``_batched`` (leading
    dimension ``n`` or 1) and their other tensor attributes in ``_buffers`` (moved by :meth:`to`
    and pickling, never indexed), and implement :meth:`apply` and :meth:`adjoint`.
    """

    _batched: tuple[str, ...] = ()
    _buffers: tuple[str, ...] = ()

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

        Built from :meth:`apply` on the canonical basis (one call per sample, or one call per
        column, whichever is fewer); subclasses with an explicit matrix override it. Meant for
        exact computations at moderate ``D``. The batch is 1 when the map itself is shared,
        even if the noise is per sample.
        """
        eye = torch.eye(self._d, dtype=self.dtype, device=self.device)
        if self._all_shared(ignore_noise=True):
            return self._single(0).apply(eye).mT.unsqueeze(0)
        if self._n <= self._d:
            return torch.stack([self._single(i).apply(eye).mT for i in range(self._n)])
        columns = [self.apply(eye[j].expand(self._n, -1)) for j in range(self._d)]
        return torch.stack(columns, dim=-1)

    def as_diagonal(self) -> Tensor | None:
        r"""The diagonals :math:`a_i` of :math:`A_i = \operatorname{diag}(a_i)`, or ``None``.

        Shape ``(n | 1, D)`` when every :math:`A_i` is a square diagonal matrix (then ``M = D``),
        ``None`` otherwise (the default). It lets Gaussian computations use
        :math:`A_i \operatorname{diag}(v) A_i^\top = \operatorname{diag}(a_i^2 v)` at
        :math:`O(D)` cost instead of building :meth:`matrix`. Pinned measurements have
        :math:`a_{ij} = 0`.
        """
        return None

    def _single(self, i: int) -> Operator:
        """Sample ``i`` as an operator of batch size 1 (which then broadcasts)."""
        new = self.__copy__()
        for name in self._tensors():
            tensor = getattr(self, name)
            if tensor.shape[0] != 1:
                setattr(new, name, tensor[i : i + 1])
        new._n = 1
        return new

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

    def prepare(self, y: Any) -> Tensor:
        """Maps observations ``(n, M)`` onto the pinned convention: zeros where unobserved.

        ``y`` may be a tensor or an array (converted with :func:`torch.as_tensor`).
        Raises ``ValueError`` if its shape is not ``(n | 1, M)`` or if an observed entry is NaN
        or infinite.
        """
        if not isinstance(y, Tensor):
            y = as_float_tensor(y, "Y")
        if y.ndim != 2 or y.shape[-1] != self._m:
            raise ValueError(f"Y must have shape (n, {self._m}), got {tuple(y.shape)}.")
        if self._n != 1 and y.shape[0] not in (1, self._n):
            raise ValueError(f"Y has {y.shape[0]} rows but the operator has {self._n} samples.")
        observed = self.observed.to(y.device)
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

    def __copy__(self) -> Operator:
        # A plain shallow copy: ``copy.copy`` would go through ``__getstate__`` and move every
        # tensor to the CPU and back.
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __getitem__(self, index: Index) -> Operator:
        """The sub-batch ``op[index]``: an int, slice, int array, boolean mask or ``(idx, ...)``.

        An int gives a sub-batch of length 1. Shared tensors (batch dimension 1) are kept.
        """
        positions = _normalize_index(index, self._n)
        new = self.__copy__()
        for name in self._tensors():
            tensor = getattr(self, name)
            if tensor.shape[0] != 1:
                setattr(new, name, tensor[positions.to(tensor.device)])
        new._n = int(positions.numel())
        return new

    def expand(self, n: int) -> Operator:
        """A length-``n`` batch of this operator, whose parameters must all be shared.

        Shared tensors are kept once; only the reported length changes, so the result costs
        no memory and can be indexed by cross-validation splitters.
        """
        n = check_int(n, "n", 1)
        if self._n == n:
            return self
        if not self._all_shared():
            raise ValueError(
                f"only an operator of batch size 1 (shared parameters) can be expanded; this one "
                f"has {self._n} samples and cannot be expanded to {n}."
            )
        new = self.__copy__()
        new._n = n
        return new

    def to(
        self,
        device: torch.device | str | torch.dtype | None = None,
        dtype: torch.dtype | None = None,
    ) -> Operator:
        """A copy on ``device`` with floating tensors cast to ``dtype``.

        Like :meth:`torch.Tensor.to`, ``op.to(torch.float64)`` casts without moving.
        """
        if isinstance(device, torch.dtype):
            if dtype is not None:
                raise TypeError("to() got two dtypes.")
            device, dtype = None, device
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}.")
        new = self.__copy__()
        for name in (*self._tensors(), *self._buffers):
            tensor = getattr(self, name)
            cast = dtype if (dtype is not None and tensor.is_floating_point()) else None
            setattr(new, name, tensor.to(device=device, dtype=cast))
        return new

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_device"] = str(self.device)
        for name in (*self._tensors(), *self._buffers):
            state[name] = state[name].cpu()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        device = loadable_device(state.pop("_device", "cpu"))
        self.__dict__.update(state)
        for name in (*self._tensors(), *self._buffers):
            setattr(self, name, getattr(self, name).to(device))

    # ------------------------------------------------------------------ helpers
    def _check_input(self, value: Tensor, size: int, name: str) -> None:
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}.")
        if value.ndim != 2 or value.shape[-1] != size:
            raise ValueError(f"{name} must have shape (n, {size}), got {tuple(value.shape)}.")
        if self._n != 1 and value.shape[0] not in (1, self._n):
            raise ValueError(
                f"{name} has {value.shape[0]} rows but the operator has {self._n} samples."
            )

    def __repr__(self) -> str:
        n, m, d = self.shape
        std = self.noise_std
        noise = f"{std.item():g}" if std.numel() == 1 else f"tensor{tuple(std.shape)}"
        return f"{type(self).__name__}(n={n}, m={m}, d={d}, noise_std={noise})"
