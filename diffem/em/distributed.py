r"""Data-parallel EM across processes with :mod:`torch.distributed`.

Under a launcher (``torchrun --nproc-per-node N script.py``, ``srun`` with the same
environment, ``accelerate launch``), the ``N`` processes run the same, unchanged
``DiffusionPriorEM(...).fit(Y, operator)`` on the same ``Y``:

- **E-step**, embarrassingly parallel over observations: rank :math:`r` draws
  :math:`x_i \sim q_k(x \mid y_i)` for its contiguous shard of the rows (the shards differ in
  size by at most one), and an all-gather gives every rank all samples, in row order.
- **M-step**, data-parallel SGD: every rank trains the same network on its part of the samples
  (a random partition per EM iteration, equal sizes, padded by wrapping like
  :class:`torch.utils.data.DistributedSampler`) with a per-rank mini-batch of
  ``batch_size // N``, and the gradients are averaged across ranks by an all-reduce after every
  backward pass (:class:`GradientAllReduce`, what
  :class:`~torch.nn.parallel.DistributedDataParallel` does, without wrapping the module, so that
  the network, its EMA and its pickles are those of a single process). The optimizer steps,
  hence the weights, are the same on every rank, and the global mini-batch and the number of
  steps per epoch are those of a single-process fit.

At the end every rank holds the same fitted estimator (the weights are broadcast from rank 0
once more), which pickles and loads in a plain process. Backends: NCCL on CUDA (the device of
``LOCAL_RANK``), gloo on the CPU.
"""

from __future__ import annotations

import atexit
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from skorch.callbacks import Callback
from torch import Tensor, nn

__all__ = ["DataParallel", "GradientAllReduce", "launcher_environment", "resolve_data_parallel"]

#: environment variables set by torchrun (and by ``accelerate launch``, and Slurm recipes)
LAUNCHER_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")


def launcher_environment() -> dict[str, str] | None:
    """The launcher's variables when this process is one of several (``WORLD_SIZE > 1``),
    else ``None``."""
    env = {name: os.environ.get(name) for name in LAUNCHER_VARIABLES}
    if any(value is None for value in env.values()) or int(env["WORLD_SIZE"]) <= 1:
        return None
    return env  # type: ignore[return-value]


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank_seed(seed: int, rank: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1)[0])


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the process group, and the collectives EM needs."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def _comm_device(self) -> torch.device:
        """Where collectives run: the GPU for NCCL, the CPU for gloo."""
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    # ------------------------------------------------------------------ E-step
    def _bounds(self, n: int, rank: int) -> tuple[int, int]:
        base, extra = divmod(n, self.world_size)
        start = rank * base + min(rank, extra)
        return start, start + base + (rank < extra)

    def shard(self, n: int) -> slice:
        """This rank's contiguous rows of ``n`` (sizes differ by at most one across ranks)."""
        return slice(*self._bounds(n, self.rank))

    def all_gather_rows(self, x: Tensor, n: int) -> Tensor:
        """Every rank's shard ``(len(shard), ...)`` concatenated in row order, ``(n, ...)``
        (on the CPU, in ``x``'s dtype)."""
        size = math.ceil(n / self.world_size)
        padded = x.new_zeros((size, *x.shape[1:]), device=self._comm_device)
        padded[: len(x)] = x.to(self._comm_device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        pieces = [
            part[: stop - start]
            for part, (start, stop) in zip(
                parts, (self._bounds(n, r) for r in range(self.world_size)), strict=True
            )
        ]
        return torch.cat(pieces).to("cpu")

    def rank_generator(self, generator: torch.Generator) -> torch.Generator:
        """An independent stream for this rank, drawn from ``generator`` (the same on every
        rank), on the generator's device."""
        seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
        return torch.Generator(device=generator.device).manual_seed(_rank_seed(seed, self.rank))

    # ------------------------------------------------------------------ M-step
    def m_step_rows(self, n: int, seed: int) -> Tensor:
        """This rank's rows for the M-step: a random permutation of ``range(n)`` (the same on
        every rank), padded by wrapping to a multiple of the world size, then strided, so that
        every rank gets ``ceil(n / world_size)`` rows and the same number of mini-batches."""
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
        total = math.ceil(n / self.world_size) * self.world_size
        perm = perm.repeat(math.ceil(total / n))[:total]
        return perm[self.rank :: self.world_size]

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank."""
        box = [int(value)]
        dist.broadcast_object_list(box, src=0)
        return int(box[0])

    def broadcast_module(self, module: nn.Module) -> None:
        """Copies rank 0's parameters and buffers into ``module`` on every rank."""
        broadcast_module(module)


def broadcast_module(module: nn.Module) -> None:
    """Rank 0's parameters and buffers of ``module``, in place, on every rank."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


class GradientAllReduce(Callback):
    """skorch callback of data-parallel training: averages the gradients over the ranks after
    every backward pass (one all-reduce of the flattened gradients, before clipping and the
    optimizer step), starts every training call from rank 0's weights, and gives each rank its
    own stream of training noise. Inert when no process group with several ranks is active,
    so a net pickled with it loads and trains in a plain process."""

    def on_train_begin(self, net: Any, X: Any = None, y: Any = None, **kwargs: Any) -> None:
        if not _active():
            return
        broadcast_module(net.module_)
        ema = getattr(net, "ema_module_", None)
        if ema is not None:
            broadcast_module(ema)
        generator = getattr(net, "noise_rng_", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(_rank_seed(generator.initial_seed(), dist.get_rank()))

    def on_grad_computed(self, net: Any, named_parameters: Any, **kwargs: Any) -> None:
        if not _active():
            return
        grads = [p.grad for _, p in named_parameters if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


@contextmanager
def data_parallel_training(net: Any, group: DataParallel) -> Iterator[None]:
    """Makes one training call (``partial_fit``) of the skorch ``net`` data-parallel: adds
    :class:`GradientAllReduce` to its callbacks and divides its training mini-batch by the world
    size for the duration of the block, without re-initialising anything, then restores both
    (so that backups, checkpoints and pickles never hold them) and, on success, broadcasts rank
    0's weights."""
    entry = ("data_parallel", GradientAllReduce())
    callbacks = net.callbacks
    missing = object()
    batch = vars(net).get("iterator_train__batch_size", missing)
    global_batch = net.batch_size if batch is missing else batch
    net.callbacks = [*(callbacks or []), entry]  # picked up if the call initialises the net
    if getattr(net, "initialized_", False):
        net.callbacks_.append(entry)
    net.iterator_train__batch_size = (
        global_batch if global_batch == -1 else max(1, int(global_batch) // group.world_size)
    )
    try:
        yield
    finally:
        net.callbacks = callbacks
        net.callbacks_ = [item for item in net.callbacks_ if item[1] is not entry[1]]
        if batch is missing:
            del net.iterator_train__batch_size
        else:
            net.iterator_train__batch_size = batch
    group.broadcast_module(net.module_)
    ema = getattr(net, "ema_module_", None)
    if ema is not None:
        group.broadcast_module(ema)


def resolve_data_parallel(distributed: Any, device: torch.device) -> DataParallel | None:
    """The process group ``fit`` runs in, or ``None`` for a single-process fit.

    ``distributed="auto"``: an initialised process group with several ranks, else the
    launcher's environment (:func:`launcher_environment`), whose process group is then
    initialised (NCCL on CUDA, gloo on the CPU; destroyed at exit); ``True``: the same, but
    raises ``ValueError`` when there is none; ``False``: ``None``. On CUDA, a device without an
    index becomes ``cuda:LOCAL_RANK``.
    """
    if not (
        isinstance(distributed, bool) or (isinstance(distributed, str) and distributed == "auto")
    ):
        raise ValueError(f"distributed must be 'auto', True or False, got {distributed!r}.")
    if distributed is False or not dist.is_available():
        if distributed is True:
            raise ValueError("distributed=True, but torch.distributed is not available.")
        return None
    env = launcher_environment()
    if device.type == "cuda" and device.index is None:
        local_rank = int(env["LOCAL_RANK"]) if env is not None else 0
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        if env is None:
            if distributed is True:
                raise ValueError(
                    "distributed=True, but this process was not started by a launcher: run "
                    "the script with `torchrun --nproc-per-node N script.py` (WORLD_SIZE, "
                    "RANK, LOCAL_RANK and MASTER_ADDR unset), or initialise torch.distributed."
                )
            return None
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        atexit.register(_destroy)
    if dist.get_world_size() <= 1:
        return None
    return DataParallel(dist.get_rank(), dist.get_world_size(), device)


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
