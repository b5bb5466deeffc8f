r"""The learned prior of :class:`~diffem.em.DiffusionPriorEM`, behind the priors' protocol.

A *prior* (:class:`diffem.priors.Prior`) answers four questions about observations
:math:`y_i = A_i x_i + e_i`: ``sample`` (:math:`x \sim q(x)`), ``sample_posterior``
(:math:`x \sim q(x \mid y_i)`), ``posterior_mean`` (:math:`E_q[x \mid y_i]`) and
``log_evidence`` (:math:`\log q(y_i)`). :class:`~diffem.priors.GaussianPrior` answers them
exactly; :class:`DiffusionPrior` answers them for a denoiser :math:`D(x_t, \sigma) \approx
E[x \mid x_t]` with a posterior sampler, by Monte Carlo:

* ``sample``: :class:`~diffem.samplers.Unconditional` with the posterior sampler's steps,
  solver and schedule, deterministic by default (``sample_eta=0``: the probability-flow ODE,
  whose discretisation error at a few dozen steps is far below the stochastic sampler's);
* ``sample_posterior``: the posterior sampler (MMPS by default);
* ``posterior_mean``: the average of ``n_mean_samples`` posterior samples (error
  :math:`\propto 1 / \sqrt{\text{n\_mean\_samples}}`);
* ``log_evidence``: importance sampling through the probability-flow ODE
  (:func:`diffem.em.evidence.importance_log_evidence`), with the exact posterior of the
  Gaussian ``reference`` prior as proposal.

The estimator delegates every public method to its ``prior_``, whichever kind it is.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffem._random import optional_generator
from diffem._validation import check_int
from diffem.em.evidence import Evidence, importance_log_evidence
from diffem.operators import Operator
from diffem.priors import GaussianPrior
from diffem.samplers import SMC, Unconditional

__all__ = ["DiffusionPrior"]


class DiffusionPrior:
    r"""A diffusion-model prior: a denoiser and a posterior sampler, with the methods of the
    analytic priors (``sample``, ``sample_posterior``, ``posterior_mean``, ``log_evidence``).

    Parameters
    ----------
    denoiser : callable
        ``denoiser(x_t (B, D), sigma (B,)) -> E[x | x_t] (B, D)``, differentiable in ``x_t``.
    sampler : diffem.samplers.PosteriorSampler
        Draws :math:`x \sim q(x \mid y)`; its ``steps``, ``eta``, ``solver``, ``sigma_min``
        and ``sigma_max`` also define the unconditional sampler of :meth:`sample`.
    reference : diffem.priors.GaussianPrior
        A Gaussian close to the prior (the one moment-matched to samples of it, see
        :func:`~diffem.em.evidence.reference_sample_size`, or the EM initialisation): its exact
        posterior, slightly inflated, is the proposal of :meth:`log_evidence`, and its flow the
        reference of the probability-flow ODE.
    device : str or torch.device, default="cpu"
        Where the denoiser runs; inputs move there in chunks, outputs come back to the CPU.
    batch_size : int, default=4096
        Rows per chunk on the device (posterior samples; ODE proposals).
    n_mean_samples : int, default=16
        Posterior samples averaged by :meth:`posterior_mean`.
    n_score_samples : int, default=16
        Importance samples per observation of :meth:`log_evidence`.
    score_steps : int, default=8
        Heun steps of the probability-flow ODE of :meth:`log_evidence`.
    min_noise_std : float, default=1e-3
        Noise std floor of :meth:`log_evidence` for noiseless measurements.
    sample_eta : float, default=0.0
        Stochasticity :math:`\eta` of the unconditional sampler of :meth:`sample`: ``0`` the
        probability-flow ODE, ``1`` the reverse SDE (the posterior sampler's own ``eta``
        does not apply: SMC needs a stochastic step, prior sampling does not).
    verbose : int, default=0
        Progress bars of the unconditional sampler.
    """

    def __init__(
        self,
        denoiser: Any,
        sampler: Any,
        reference: GaussianPrior,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 4096,
        n_mean_samples: int = 16,
        n_score_samples: int = 16,
        score_steps: int = 8,
        min_noise_std: float = 1e-3,
        sample_eta: float = 0.0,
        verbose: int = 0,
    ) -> None:
        self.denoiser = denoiser
        self.sampler = sampler
        self.reference = reference
        self.n_mean_samples = n_mean_samples
        self.n_score_samples = n_score_samples
        self.score_steps = score_steps
        self.min_noise_std = min_noise_std
        self.sample_eta = sample_eta
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.verbose = verbose

    @property
    def n_features(self) -> int:
        """``D``."""
        return self.reference.n_features

    def __call__(self, x_t: Tensor, sigma: Any) -> Tensor:
        r"""The denoiser :math:`E[x \mid x_t]`, so that a prior is a denoiser (as the analytic
        priors are)."""
        return self.denoiser(x_t, sigma)

    def __repr__(self) -> str:
        return (
            f"DiffusionPrior(denoiser={type(self.denoiser).__name__}, "
            f"sampler={type(self.sampler).__name__}, n_features={self.n_features})"
        )

    # ------------------------------------------------------------------ torch level
    def _chunks(self, n: int) -> list[slice]:
        step = int(self.batch_size)
        return [slice(start, min(n, start + step)) for start in range(0, n, step)]

    def _sample_torch(self, n_samples: int, generator: torch.Generator | None) -> Tensor:
        """Prior samples, float32 CPU ``(n_samples, D)``."""
        params = self.sampler.get_params(deep=False)
        sampler = Unconditional(
            steps=int(params.get("steps", 64)),
            eta=float(self.sample_eta),
            solver=str(params.get("solver", "ancestral")),
            sigma_min=float(params["sigma_min"]),
            sigma_max=float(params["sigma_max"]),
            batch_size=int(params.get("batch_size", self.batch_size)),
            verbose=int(self.verbose),
        )
        out = [
            sampler.sample(
                self.denoiser,
                rows.stop - rows.start,
                self.n_features,
                generator,
                dtype=torch.float32,
                device=self.device,
            ).to("cpu")
            for rows in self._chunks(n_samples)
        ]
        return torch.cat(out)

    def _sample_posterior_torch(
        self, Y: Tensor, operator: Operator, n_samples: int, generator: torch.Generator | None
    ) -> Tensor:
        """``n_samples`` posterior samples per row of ``Y``, float32 CPU ``(n, n_samples, D)``.

        A sampler with particles (:class:`~diffem.samplers.SMC`) draws the ``n_samples`` of an
        observation from its particle system, and its per-observation log-evidence estimates
        are kept in ``sampler_log_evidence_`` ``(n,)``; any other sampler is run on each row
        ``n_samples`` times.
        """
        n = len(Y)
        shared = len(operator) == 1
        particles = isinstance(self.sampler, SMC)
        if not particles:
            rows = torch.arange(n).repeat_interleave(n_samples)
            Y, operator = Y[rows], operator if shared else operator[rows]
        out, log_z = [], []
        for part in self._chunks(len(Y)):
            y = Y[part].to(device=self.device, dtype=torch.float32)
            op = (operator if shared else operator[part]).to(
                device=self.device, dtype=torch.float32
            )
            if particles:
                x = self.sampler.sample(self.denoiser, y, op, generator, n_samples=n_samples)
                log_z.append(torch.as_tensor(self.sampler.log_evidence_, dtype=torch.float64))
            else:
                x = self.sampler.sample(self.denoiser, y, op, generator=generator)
            out.append(x.detach().to("cpu", torch.float32))
        self.sampler_log_evidence_ = torch.cat(log_z).numpy() if log_z else None
        return torch.cat(out).reshape(n, n_samples, self.n_features)

    def _log_evidence_torch(
        self, Y: Tensor, operator: Operator, generator: torch.Generator | None
    ) -> Evidence:
        """Importance-sampling log-evidences and their standard errors, float64 CPU
        ``(n,)`` each."""
        params = self.sampler.get_params(deep=False)
        return importance_log_evidence(
            self.denoiser,
            Y,
            operator,
            self.reference,
            sigma_min=float(getattr(self.denoiser, "sigma_min", params["sigma_min"])),
            sigma_max=float(getattr(self.denoiser, "sigma_max", params["sigma_max"])),
            n_samples=int(self.n_score_samples),
            steps=int(self.score_steps),
            min_noise_std=float(self.min_noise_std),
            batch_size=int(self.batch_size),
            device=self.device,
            generator=generator,
        )

    # ------------------------------------------------------------------ the protocol
    def _generator(self, generator: Any) -> torch.Generator | None:
        return optional_generator(generator, self.device)

    def sample(self, n_samples: int = 1, generator: Any = None) -> np.ndarray:
        r"""Draws :math:`x \sim q(x)`; NumPy float32 ``(n_samples, D)``."""
        n_samples = check_int(n_samples, "n_samples", 1)
        return _numpy(self._sample_torch(n_samples, self._generator(generator)))

    def sample_posterior(
        self, Y: Any, operator: Operator, n_samples: int = 1, generator: Any = None
    ) -> np.ndarray:
        r"""Draws :math:`x \sim q(x \mid y_i)` with the posterior sampler; NumPy float32
        ``(n, n_samples, D)``."""
        n_samples = check_int(n_samples, "n_samples", 1)
        Y = _as_tensor(Y, operator)
        return _numpy(
            self._sample_posterior_torch(Y, operator, n_samples, self._generator(generator))
        )

    def posterior_mean(self, Y: Any, operator: Operator, generator: Any = None) -> np.ndarray:
        r""":math:`E_q[x \mid y_i]`, the average of ``n_mean_samples`` posterior samples;
        NumPy float32 ``(n, D)``."""
        Y = _as_tensor(Y, operator)
        samples = self._sample_posterior_torch(
            Y, operator, int(self.n_mean_samples), self._generator(generator)
        )
        return _numpy(samples.mean(1))

    def log_evidence(
        self, Y: Any, operator: Operator, generator: Any = None, return_std: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        r""":math:`\log q(y_i)` by importance sampling through the probability-flow ODE
        (:func:`~diffem.em.evidence.importance_log_evidence`); NumPy float32 ``(n,)``, and with
        ``return_std`` its Monte Carlo standard errors ``(n,)``."""
        Y = _as_tensor(Y, operator)
        evidence = self._log_evidence_torch(Y, operator, self._generator(generator))
        values = _numpy(evidence.log_evidence)
        return (values, _numpy(evidence.std)) if return_std else values


def _as_tensor(Y: Any, operator: Operator) -> Tensor:
    """``Y`` as a float32 tensor with its unobserved entries prepared by ``operator``."""
    Y = torch.as_tensor(np.asarray(Y) if not isinstance(Y, Tensor) else Y, dtype=torch.float32)
    return operator.prepare(Y.to(operator.dtype))


def _numpy(tensor: Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).numpy()
