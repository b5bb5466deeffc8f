"""The prior protocol, and what the analytic priors share: parameter tensors, device moves and
pickling."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from diffem._device import loadable_device
from diffem.operators.base import Operator
from diffem.priors._common import ObservationSet

__all__ = ["AnalyticPrior", "Prior"]


@runtime_checkable
class Prior(Protocol):
    r"""What every prior answers about observations :math:`y_i = A_i x_i + e_i`: the analytic
    priors exactly, :class:`diffem.em.DiffusionPrior` by Monte Carlo. Arrays are NumPy float32;
    ``generator`` is a ``torch.Generator``, an int seed, a NumPy ``RandomState`` or ``None``.
    """

    def sample(self, n_samples: int = 1, generator: Any = None) -> Any:
        r""":math:`x \sim q(x)`, ``(n_samples, D)``."""

    def sample_posterior(
        self, Y: Any, operator: Operator, n_samples: int = 1, generator: Any = None
    ) -> Any:
        r""":math:`x \sim q(x \mid y_i)`, ``(n, n_samples, D)``."""

    def posterior_mean(self, Y: Any, operator: Operator) -> Any:
        r""":math:`E_q[x \mid y_i]`, ``(n, D)``."""

    def log_evidence(self, Y: Any, operator: Operator) -> Any:
        r""":math:`\log q(y_i)`, ``(n,)``."""


class AnalyticPrior:
    """Base class of :class:`~diffem.priors.GaussianPrior` and
    :class:`~diffem.priors.GaussianMixturePrior`.

    Subclasses list their parameter tensors in ``_parameters`` (an entry may be ``None``),
    keep derived quantities in the ``_cache`` dict (dropped on copies and pickling) and
    implement ``_posterior_torch(Y, operator) -> (means, log_evidences, ...)``, ``n_features``,
    ``dtype`` and ``device``.
    """

    _parameters: tuple[str, ...] = ()
    _cache: dict[Any, Any]

    n_features: int
    dtype: torch.dtype
    device: torch.device

    def _posterior_torch(self, Y: Any, operator: Operator) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def _observations(self, Y: Any, operator: Operator) -> ObservationSet:
        return ObservationSet(Y, operator, self.n_features, self.device)

    def _posterior_mean_torch(self, Y: Any, operator: Operator) -> Tensor:
        return self._posterior_torch(Y, operator)[0].to(self.dtype)

    def _log_evidence_torch(self, Y: Any, operator: Operator) -> Tensor:
        """Float64 log-evidences ``(n,)``."""
        return self._posterior_torch(Y, operator)[1]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """A copy with parameters on ``device`` and cast to ``dtype``."""
        new = self.__class__.__new__(self.__class__)
        new.__dict__.update(self._state())
        for name in self._parameters:
            value = getattr(self, name)
            setattr(new, name, None if value is None else value.to(device=device, dtype=dtype))
        new._cache = {}
        return new

    def _state(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_cache"}

    def __getstate__(self) -> dict[str, Any]:
        state = self._state()
        state["_device"] = str(self.device)
        for name in self._parameters:
            if state.get(name) is not None:
                state[name] = state[name].cpu()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        device = loadable_device(state.pop("_device", "cpu"))
        self.__dict__.update(state)
        for name in self._parameters:
            if getattr(self, name, None) is not None:
                setattr(self, name, getattr(self, name).to(device))
        self._cache = {}
