r"""Training-loop parts of the denoisers, on skorch's callbacks and torch's utilities.

- :class:`TensorBatches` — mini-batches of a dataset held in one tensor, by slicing a shuffled
  index (skorch's ``iterator_train`` / ``iterator_valid``).
- :class:`CosineSchedule` — skorch's :class:`~skorch.callbacks.LRScheduler` stepping torch's
  :class:`~torch.optim.lr_scheduler.CosineAnnealingLR` once per batch over the batches of
  one ``fit``/``partial_fit`` call,
  :math:`\eta_k = \tfrac{1}{2} \eta \, (1 + \cos(\pi k / K))` for step :math:`k < K`.
- :class:`GradientNormClipping` — skorch's callback, keeping the pre-clipping norm.
- :class:`WarmupEMA` — the update of a :class:`torch.optim.swa_utils.AveragedModel`: an
  exponential moving average :math:`\bar\theta \leftarrow \beta_k \bar\theta + (1 - \beta_k)
  \theta` with the warm-up :math:`\beta_k = \min(\beta, (1 + k) / (10 + k))` after
  :math:`k` updates (torch's :func:`~torch.optim.swa_utils.get_ema_multi_avg_fn` with that
  decay).
- :func:`fast_optimizer_defaults` — torch's fused (or multi-tensor) optimizer kernels.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from typing import Any

import torch
from skorch.callbacks import GradientNormClipping as _SkorchGradientNormClipping
from skorch.callbacks import LRScheduler
from torch import Tensor
from torch.optim.lr_scheduler import CosineAnnealingLR
from torch.optim.swa_utils import get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Subset

__all__ = [
    "CosineSchedule",
    "GradientNormClipping",
    "TensorBatches",
    "WarmupEMA",
    "fast_optimizer_defaults",
]

# torch optimizers with a fused CPU and CUDA kernel (measurements in docs/benchmarks.md)
_FUSED = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)


def fast_optimizer_defaults(optimizer: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``fused=True`` for torch's Adam, AdamW, SGD and Adagrad, ``foreach=True`` for other
    optimizers that accept it, unless ``kwargs`` already chooses (``fused`` or ``foreach``);
    ``{}`` for other optimizer classes."""
    if "fused" in kwargs or "foreach" in kwargs or not inspect.isclass(optimizer):
        return {}
    if issubclass(optimizer, _FUSED):
        return {"fused": True}
    if "foreach" in inspect.signature(optimizer).parameters:
        return {"foreach": True}
    return {}


def _dataset_tensor(dataset: Any) -> Tensor | None:
    """The rows of a skorch ``Dataset`` over one tensor without targets (or of a ``Subset``
    of one), else ``None``."""
    if isinstance(dataset, Subset):
        base = _dataset_tensor(dataset.dataset)
        return None if base is None else base[torch.as_tensor(dataset.indices)]
    x = getattr(dataset, "X", None)
    if isinstance(x, Tensor) and getattr(dataset, "y", None) is None and len(dataset) == len(x):
        return x
    return None


class TensorBatches:
    """Mini-batches ``(x (b, D), None)`` of a dataset held in one tensor.

    A drop-in for :class:`torch.utils.data.DataLoader` as skorch's ``iterator_train`` and
    ``iterator_valid``: each batch is one slice of a (shuffled) index, instead of ``b``
    calls of ``Dataset.__getitem__`` and a collate. Datasets that are not one tensor, and
    DataLoader options other than those below, are handed to a ``DataLoader``.

    Parameters
    ----------
    dataset : skorch.dataset.Dataset, torch Subset of one, or any torch Dataset
        The data.
    batch_size : int
        Rows per batch.
    shuffle : bool
        A fresh permutation per pass (drawn from ``generator``).
    drop_last : bool
        Drop the last, incomplete batch.
    generator : torch.Generator or None
        CPU generator of the permutations.
    **loader_kwargs
        Other ``DataLoader`` arguments (``num_workers``, ``collate_fn``, ...): the batches
        then come from a ``DataLoader``.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int = 1,
        shuffle: bool = False,
        drop_last: bool = False,
        generator: torch.Generator | None = None,
        **loader_kwargs: Any,
    ) -> None:
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.generator = generator
        self.tensor = None if loader_kwargs else _dataset_tensor(dataset)
        self.loader = None
        if self.tensor is None:
            self.loader = DataLoader(
                dataset,
                batch_size=batch_size,
                shuffle=shuffle,
                drop_last=drop_last,
                generator=generator,
                **loader_kwargs,
            )

    def __len__(self) -> int:
        if self.loader is not None:
            return len(self.loader)
        n, b = len(self.tensor), self.batch_size
        return n // b if self.drop_last else math.ceil(n / b)

    def __iter__(self) -> Iterator[Any]:
        if self.loader is not None:
            yield from self.loader
            return
        x, b = self.tensor, self.batch_size
        n = len(self) * b if self.drop_last else len(x)
        if self.shuffle:
            index = torch.randperm(len(x), generator=self.generator)
            for start in range(0, n, b):
                yield x[index[start : start + b]], None
        else:
            for start in range(0, n, b):
                yield x[start : start + b], None


class CosineSchedule(LRScheduler):
    r"""Cosine learning-rate decay over the batches of each ``fit``/``partial_fit`` call.

    skorch's :class:`~skorch.callbacks.LRScheduler` with torch's
    :class:`~torch.optim.lr_scheduler.CosineAnnealingLR` stepped per batch, from the
    optimizer's learning rate :math:`\eta` at the first batch of the call to
    :math:`\tfrac{1}{2} \eta (1 + \cos(\pi (K - 1) / K))` at the last of its :math:`K`
    (a warm restart per call). skorch's callback builds its scheduler when training begins
    and resumes it from the epoch count; here :math:`K` (``net.total_steps_``: ``max_epochs``
    times the batches of the training split) is known at the first epoch of the call, so the
    scheduler is built there. The net puts the learning rate back to :math:`\eta` when the
    call ends. Inactive when the net's ``lr_schedule`` is ``"constant"``.
    """

    def __init__(self) -> None:
        super().__init__(policy=CosineAnnealingLR, step_every="batch", event_name=None)

    def on_train_begin(self, net: Any, **kwargs: Any) -> None:
        self.lr_scheduler_ = None

    def on_epoch_begin(self, net: Any, dataset_train: Any = None, **kwargs: Any) -> None:
        active = getattr(net, "lr_schedule", "cosine") == "cosine"
        if self.lr_scheduler_ is not None or dataset_train is None or not active:
            return
        total = max(1, int(net.total_steps_))
        for group in net.optimizer_.param_groups:
            group["initial_lr"] = group["lr"]
        self.lr_scheduler_ = self.policy_(net.optimizer_, T_max=total, last_epoch=-1)

    def on_batch_end(self, net: Any, training: bool, **kwargs: Any) -> None:
        if self.lr_scheduler_ is not None:
            super().on_batch_end(net, training, **kwargs)

    def on_train_end(self, net: Any, **kwargs: Any) -> None:
        self.lr_scheduler_ = None

    def __getstate__(self) -> dict[str, Any]:
        # The scheduler lives for one call. Pickled, it would carry a second copy of the
        # optimizer and its weights outside skorch's device mapping, which cannot be loaded
        # without CUDA when the net was trained on a GPU.
        return {**self.__dict__, "lr_scheduler_": None}


class GradientNormClipping(_SkorchGradientNormClipping):
    """skorch's :class:`~skorch.callbacks.GradientNormClipping` (torch's
    :func:`~torch.nn.utils.clip_grad_norm_` on the learnable parameters), keeping the
    pre-clipping norm that torch returns and skorch discards: it is recorded per batch as
    ``grad_norm``, which the net checks is finite."""

    def on_grad_computed(self, net: Any, named_parameters: Any, **kwargs: Any) -> None:
        if self.gradient_clip_value is None:
            return
        # skorch's callback discards the norm; computing it again would cost 60% as much
        # as the clipping itself (docs/benchmarks.md)
        norm = torch.nn.utils.clip_grad_norm_(
            [p for _, p in named_parameters],
            max_norm=self.gradient_clip_value,
            norm_type=self.gradient_clip_norm_type,
        )
        net.history.record_batch("grad_norm", float(norm))


class WarmupEMA:
    r"""``multi_avg_fn`` of a :class:`torch.optim.swa_utils.AveragedModel`: torch's
    :func:`~torch.optim.swa_utils.get_ema_multi_avg_fn` with the decay
    :math:`\min(\beta, (1 + k) / (10 + k))` after :math:`k` updates (the first update copies
    the weights). A class rather than a closure, so that the averaged model pickles."""

    def __init__(self, decay: float) -> None:
        self.decay = float(decay)

    def __call__(self, averaged: list[Tensor], current: list[Tensor], n_averaged: Any) -> None:
        k = int(n_averaged)
        get_ema_multi_avg_fn(min(self.decay, (1.0 + k) / (10.0 + k)))(averaged, current, k)
