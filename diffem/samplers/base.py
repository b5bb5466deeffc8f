r"""Sampler base classes: scikit-learn parameters, chunking over rows, and the composition
*guidance wraps the denoiser, a solver integrates the guided denoiser*.

A posterior sampler is a :class:`~diffem.samplers.guidance.Guidance` (its :meth:`guidance`)
and a solver of :mod:`diffem.samplers.solvers` run on
:math:`E[x \mid x_t, y] \approx \hat{x} + \delta`. Parameters are declared once, as dataclass
fields: the common ones here, each sampler's own in its module, so that ``get_params``,
``set_params`` and :func:`sklearn.base.clone` see them all (``GridSearchCV`` can search
``sampler__cg_iter``). They are stored verbatim and validated when sampling.

Randomness is drawn from ``generator`` for all ``n`` rows at once, step by step, while the
denoiser runs on chunks of ``batch_size`` rows: samples do not depend on ``batch_size``, and no
autograd graph outlives its chunk.

The accuracy of the solvers with an exact denoiser is tabulated in the documentation
(*Benchmarks*, "Solver accuracy with an exact denoiser").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import KW_ONLY, dataclass
from typing import Any, NamedTuple

import torch
from sklearn.base import BaseEstimator
from torch import Tensor

from diffem._validation import check_int, check_number
from diffem.operators.base import Operator
from diffem.samplers.guidance import Denoiser, Guidance, Stats, fallback
from diffem.samplers.solvers import SOLVERS, integrate
from diffem.schedule import VESchedule

__all__ = ["SOLVERS", "PosteriorSampler", "Sampler", "repeat_rows"]


def sampler_class(cls: type) -> type:
    """Declares a sampler's parameters: a dataclass that keeps scikit-learn's ``repr`` and
    identity equality."""
    return dataclass(repr=False, eq=False)(cls)


@sampler_class
class Sampler(BaseEstimator):
    r"""Base class of diffem's samplers.

    Parameters
    ----------
    steps : int
        Number of noise levels :math:`\sigma_{\max} > \dots > \sigma_{\min}` (then 0).
    eta : float in [0, 1]
        Stochasticity :math:`\eta` (:mod:`diffem.samplers.solvers`): 1 is DDPM and 0 DDIM with
        the ancestral solver; 0 is deterministic with the others.
    solver : {"ancestral", "heun", "dpmpp_2m"}
        The reverse step (:mod:`diffem.samplers.solvers`; accuracy table in this module).
    sigma_min, sigma_max : float
        Range of the log-linear schedule (:class:`diffem.schedule.VESchedule`).
    batch_size : int
        Rows given to the denoiser at once; bounds memory (one autograd graph per chunk).
    corrector_steps : int
        Langevin corrector steps per noise level (0: predictor only).
    corrector_snr : float
        Signal-to-noise ratio :math:`r` of the Langevin step size.
    verbose : int
        Shows a progress bar over the steps when positive.
    """

    steps: int = 64
    _: KW_ONLY
    eta: float = 1.0
    solver: str = "ancestral"
    sigma_min: float = 1e-3
    sigma_max: float = 1e2
    batch_size: int = 4096
    corrector_steps: int = 0
    corrector_snr: float = 0.1
    verbose: int = 0

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        check_int(self.steps, "steps", 1)
        check_number(self.eta, "eta", 0.0, 1.0)
        if not isinstance(self.solver, str) or self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}.")
        VESchedule(self.sigma_min, self.sigma_max)
        check_int(self.batch_size, "batch_size", 1)
        check_int(self.corrector_steps, "corrector_steps", 0)
        check_number(self.corrector_snr, "corrector_snr", 0.0, low_open=True)
        check_int(int(self.verbose), "verbose", 0)

    def levels(self) -> list[float]:
        """The noise levels :math:`\\sigma_{\\max} > \\dots > \\sigma_{\\min} > 0`, then 0."""
        schedule = VESchedule(float(self.sigma_min), float(self.sigma_max))
        return schedule.discretize(int(self.steps)).tolist()

    # ------------------------------------------------------------------ the loop
    def _progress(self, iterable: Iterable[int], total: int) -> Iterable[int]:
        if self.verbose and self.verbose > 0:
            from tqdm.auto import tqdm

            return tqdm(iterable, total=total, desc=type(self).__name__, leave=False)
        return iterable

    def _chunks(self, n: int) -> list[slice]:
        size = int(self.batch_size)
        return [slice(start, min(start + size, n)) for start in range(0, n, size)]

    def _run(
        self,
        mean_fn: Callable[[Tensor, Tensor, Tensor | None, int], Tensor],
        n: int,
        n_features: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | None,
    ) -> Tensor:
        """Samples ``(n, n_features)`` with ``self.solver`` on the chunked ``mean_fn(x_t, sigma,
        weight, chunk_index)`` (``sigma``, ``weight`` as ``(B,)`` tensors); counts its
        evaluations (over all rows) in ``self.evaluations_``."""
        chunks = self._chunks(n)
        self.evaluations_ = 0

        def evaluate(x: Tensor, sigma: float, weight: float | None) -> Tensor:
            self.evaluations_ += 1
            outputs = []
            for k, chunk in enumerate(chunks):
                s = torch.full((chunk.stop - chunk.start,), sigma, dtype=x.dtype, device=x.device)
                w = None if weight is None else torch.full_like(s, weight)
                outputs.append(mean_fn(x[chunk], s, w, k).detach())
            return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

        def randn(like: Tensor) -> Tensor:
            return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=device)

        levels = self.levels()
        shape = (n, n_features)
        x = levels[0] * torch.randn(shape, generator=generator, dtype=dtype, device=device)
        return integrate(
            evaluate,
            x,
            levels,
            solver=self.solver,
            eta=float(self.eta),
            randn=randn,
            corrector_steps=int(self.corrector_steps),
            corrector_snr=float(self.corrector_snr),
            progress=self._progress,
        )


def resolve_dtype_device(
    denoiser: Any, dtype: torch.dtype | None, device: torch.device | str | None
) -> tuple[torch.dtype, torch.device]:
    """``dtype`` and ``device``, defaulting to those of the denoiser's first parameter (CPU and
    torch's default dtype when it has none)."""
    first = None
    params = getattr(denoiser, "parameters", None)
    if callable(params):
        try:
            first = next(iter(params()), None)
        except TypeError:
            first = None
    if dtype is None:
        dtype = first.dtype if first is not None else torch.get_default_dtype()
    if device is None:
        device = first.device if first is not None else torch.device("cpu")
    return dtype, torch.device(device)


def check_posterior_inputs(denoiser: Any, Y: Any, operator: Any) -> tuple[Tensor, Operator]:
    """Validates ``(denoiser, Y (n, M), operator)``; returns ``Y`` prepared (pinned entries
    set) and the operator on ``Y``'s dtype and device."""
    if not callable(denoiser):
        raise TypeError(
            "denoiser must be a callable denoiser(x_t, sigma) -> E[x | x_t], got "
            f"{type(denoiser).__name__}."
        )
    if not isinstance(operator, Operator):
        raise TypeError(
            f"operator must be a diffem.operators.Operator, got {type(operator).__name__}."
        )
    if not isinstance(Y, Tensor):
        raise TypeError(f"Y must be a torch.Tensor of shape (n, M), got {type(Y).__name__}.")
    if not Y.is_floating_point():
        raise TypeError(f"Y must be a floating-point tensor, got dtype {Y.dtype}.")
    m = operator.n_measurements
    if Y.ndim != 2 or Y.shape[1] != m or Y.shape[0] == 0:
        raise ValueError(
            f"Y must have shape (n, M) = (n, {m}) with n >= 1 to match the operator, got "
            f"{tuple(Y.shape)}."
        )
    if len(operator) not in (1, Y.shape[0]):
        raise ValueError(
            f"operator must have batch size 1 or n = {Y.shape[0]} (the rows of Y), got "
            f"{len(operator)}."
        )
    operator = operator.to(device=Y.device, dtype=Y.dtype)
    return operator.prepare(Y), operator


def summarise(stats: Stats, wall_time: float) -> dict[str, float]:
    """Means of the recorded ``(B,)`` diagnostics, plus ``wall_time``."""
    out: dict[str, float] = {}
    for key, values in stats.items():
        if values:
            out[key] = float(torch.cat([v.flatten().double() for v in values]).mean())
    out["wall_time"] = float(wall_time)
    return out


@sampler_class
class PosteriorSampler(Sampler):
    r"""A solver run on the guided denoiser :math:`\hat{x} + \delta` of :meth:`guidance`.

    Attributes
    ----------
    diagnostics_ : dict of float
        The guidance's diagnostics averaged over steps and rows, ``fallback`` (fraction of
        non-finite guidance terms replaced by 0), ``evaluations`` (guided-denoiser evaluations
        per sample) and ``wall_time`` (seconds) of the last call.
    """

    def guidance(self) -> Guidance:
        """The guidance piece built from the parameters."""
        raise NotImplementedError

    def sample(
        self,
        denoiser: Denoiser,
        Y: Tensor,
        operator: Operator,
        generator: torch.Generator | None = None,
        *,
        n_samples: int | None = None,
    ) -> Tensor:
        r"""Posterior samples :math:`x_i \sim q(x \mid y_i)`, one per observation by default.

        Parameters
        ----------
        denoiser : callable
            ``denoiser(x_t, sigma) -> E[x | x_t]`` on ``(B, D)`` tensors, ``sigma`` of shape
            ``(B,)``; differentiable in ``x_t``.
        Y : Tensor, shape ``(n, M)``
            Observations (unobserved entries of a mask may be NaN).
        operator : Operator
            Batch of ``n`` (or 1, shared) observation operators.
        generator : torch.Generator, optional
            Source of all randomness.
        n_samples : int, optional
            Samples per observation (independent chains, except for :class:`SMC`, which draws
            them from one particle system per observation).

        Returns
        -------
        Tensor of shape ``(n, D)``, or ``(n, n_samples, D)`` when ``n_samples`` is given, dtype
        and device of ``Y``, without autograd graph.
        """
        self._validate()
        if n_samples is not None:
            check_int(n_samples, "n_samples", 1)
        Y, operator = check_posterior_inputs(denoiser, Y, operator)
        start = time.perf_counter()
        stats: Stats = {"fallback": []}
        S = 1 if n_samples is None else int(n_samples)
        x = self._draw(Problem(denoiser, Y, operator), generator, S, stats)
        self.diagnostics_ = summarise(stats, time.perf_counter() - start)
        self.diagnostics_["evaluations"] = float(self.evaluations_)
        self.diagnostics_.update(self._diagnostics())
        return (x[:, 0] if n_samples is None else x).detach()

    def _diagnostics(self) -> dict[str, float]:
        """Diagnostics of the last call beyond the guidance's."""
        return {}

    def _draw(
        self, problem: Problem, generator: torch.Generator | None, n_samples: int, stats: Stats
    ) -> Tensor:
        """``n_samples`` independent chains per observation: ``(n, n_samples, D)``."""
        denoiser, n = problem.denoiser, problem.Y.shape[0]
        Y, operator = repeat_rows(problem.Y, problem.operator, n_samples)
        guidance = self.guidance()
        chunks = self._chunks(Y.shape[0])
        ops = [operator if len(operator) == 1 else operator[c] for c in chunks]
        warm: dict[int, Tensor] = {}  # each chunk's last solution, with warm_start

        def mean_fn(x_t: Tensor, sigma: Tensor, weight: Tensor | None, k: int) -> Tensor:
            start = warm.get(k) if getattr(self, "warm_start", False) else None
            guided = guidance(denoiser, x_t, sigma, weight, Y[chunks[k]], ops[k], stats, start)
            if guided.solution is not None:
                warm[k] = guided.solution
            return guided.x_hat + fallback(guided.delta, stats)

        x = self._run(mean_fn, Y.shape[0], operator.n_features, Y.dtype, Y.device, generator)
        return x.view(n, n_samples, -1)


class Problem(NamedTuple):
    """A posterior to sample: the prior's ``denoiser`` and observations ``Y`` ``(n, M)`` of
    ``operator`` (validated, :func:`check_posterior_inputs`)."""

    denoiser: Denoiser
    Y: Tensor
    operator: Operator


def repeat_rows(Y: Tensor, operator: Operator, repeats: int) -> tuple[Tensor, Operator]:
    """Each row of ``Y`` ``(n, M)`` and of a per-sample ``operator`` repeated ``repeats`` times
    in place (row ``i`` becomes rows ``i * repeats`` to ``(i + 1) * repeats - 1``)."""
    if repeats == 1:
        return Y, operator
    rows = torch.arange(Y.shape[0], device=Y.device).repeat_interleave(repeats)
    return Y[rows], operator if len(operator) == 1 else operator[rows.cpu()]
