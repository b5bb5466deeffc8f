"""The prior protocol, and what the analytic priors share: parameter tensors, device moves and
pickling."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from diffem._device import loadable_device
from diffem._random import optional_generator
from diffem._validation import check_int
from diffem.operators.base import Operator
from diffem.priors._common import ObservationSet, to_numpy

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

    Subclasses list their parameter tensors in ``_parameters`` (an entry may be ``None``; the
    first one gives ``dtype`` and ``device``), keep derived quantities in the ``_cache`` dict
    (dropped on copies and pickling) and implement ``n_features``, ``_sample_torch(n_samples,
    generator)``, ``_sample_posterior_torch(Y, operator, n_samples, generator)`` and
    ``_posterior_torch(Y, operator) -> (means, log_evidences, ...)`` in float64.

    ``generator`` is a ``torch.Generator``, an int seed, a ``numpy.random.RandomState`` or
    ``None`` (torch's global generator).
    """

    _parameters: tuple[str, ...] = ()
    _cache: dict[Any, Any]

    n_features: int

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the parameters (and of the returned arrays)."""
        return getattr(self, self._parameters[0]).dtype

    @property
    def device(self) -> torch.device:
        """Where the parameters are."""
        return getattr(self, self._parameters[0]).device

    def _posterior_torch(self, Y: Any, operator: Operator) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def _sample_torch(self, n_samples: int = 1, generator: Any = None) -> Tensor:
        raise NotImplementedError

    def _sample_posterior_torch(
        self, Y: Any, operator: Operator, n_samples: int = 1, generator: Any = None
    ) -> Tensor:
        raise NotImplementedError

    def _sampling_args(self, n_samples: Any, generator: Any) -> tuple[int, torch.Generator | None]:
        """Validated ``n_samples`` and the ``torch.Generator`` of ``generator``."""
        return check_int(n_samples, "n_samples", 1), optional_generator(generator, self.device)

    def sample(self, n_samples: int = 1, generator: Any = None):
        """Draws ``x ~ p(x)``; NumPy ``(n_samples, D)``."""
        return to_numpy(self._sample_torch(n_samples, generator), self.dtype)

    def sample_posterior(
        self, Y: Any, operator: Operator, n_samples: int = 1, generator: Any = None
    ):
        r"""Exact samples of :math:`p(x \mid y_i)`, NumPy ``(n, n_samples, D)``.

        Matheron's rule (Wilson et al., 2020): with :math:`x \sim \mathcal{N}(\mu, C)` and
        :math:`e \sim \mathcal{N}(0, \Sigma_y)`, :math:`x + C A^\top (A C A^\top +
        \Sigma_y)^{-1} (y - A x - e)` is a sample of the Gaussian posterior; a mixture first
        draws a component :math:`k` with probability :math:`\propto w_k \mathcal{N}(y_i; A_i
        \mu_k, A_i C_k A_i^\top + \Sigma_i)`.

        Parameters
        ----------
        Y : array ``(n, M)``; unobserved (pinned) entries are ignored
        operator : :class:`~diffem.operators.Operator` of batch ``n`` or 1
        n_samples : int
        generator : ``torch.Generator``, int seed, ``numpy.random.RandomState`` or ``None``
        """
        return to_numpy(self._sample_posterior_torch(Y, operator, n_samples, generator), self.dtype)

    def posterior_mean(self, Y: Any, operator: Operator):
        r""":math:`E[x \mid y_i]`, NumPy ``(n, D)``; for a Gaussian
        :math:`\mu + C A^\top (A C A^\top + \Sigma_y)^{-1} (y_i - A\mu)`."""
        return to_numpy(self._posterior_mean_torch(Y, operator), self.dtype)

    def log_evidence(self, Y: Any, operator: Operator):
        r""":math:`\log p(y_i)` over the observed entries, NumPy ``(n,)``; for a Gaussian
        :math:`\log \mathcal{N}(y_i; A\mu, A C A^\top + \Sigma_y)`."""
        return to_numpy(self._log_evidence_torch(Y, operator), self.dtype)

    def _observations(self, Y: Any, operator: Operator) -> ObservationSet:
        if isinstance(operator, Operator) and not operator.is_linear:
            Y, operator = self._linearize(Y, operator)
        return ObservationSet(Y, operator, self.n_features, self.device)

    def _linearize(self, Y: Any, operator: Operator) -> tuple[Any, Operator]:
        """Observations and linear operator standing for a nonlinear one (see
        :mod:`diffem.priors.linearize`); only the Gaussian prior has such an approximation."""
        raise TypeError(
            f"{type(self).__name__} computes exact posteriors for linear operators only; with a "
            "Nonlinear operator, run a posterior sampler (e.g. diffem.samplers.SMC) with the "
            "prior as denoiser."
        )

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
