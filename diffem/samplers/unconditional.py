r"""Prior sampling with the solvers of :mod:`diffem.samplers.solvers`."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from diffem._validation import check_int
from diffem.samplers.base import Sampler, resolve_dtype_device, sampler_class
from diffem.samplers.guidance import Denoiser

__all__ = ["Unconditional"]


@sampler_class
class Unconditional(Sampler):
    r"""Samples the prior :math:`q(x)` of a denoiser.

    With ``solver="ancestral"`` (the default), from :math:`x_T \sim \mathcal{N}(0,
    \sigma_{\max}^2 I)`, each step :math:`\sigma_t \to \sigma_s` is
    :math:`x_s = c \, x_t + (1 - c) \hat{x} + \tau z`, :math:`\hat{x} = E[x \mid x_t]`: DDPM
    (Ho et al., 2020) for ``eta=1`` and DDIM (Song, Meng & Ermon, 2021) for ``eta=0``, on the
    variance-exploding process; ``solver="heun"`` is EDM's second-order sampler (Karras et al.,
    2022) and ``solver="dpmpp_2m"`` DPM-Solver++(2M) (Lu et al., 2022), both more accurate per
    evaluation (:mod:`diffem.samplers.solvers`, :mod:`diffem.samplers.base`).

    Parameters
    ----------
    steps, eta, solver, sigma_min, sigma_max, batch_size, corrector_steps, corrector_snr, verbose
        See :class:`diffem.samplers.base.Sampler`.

    Attributes
    ----------
    diagnostics_ : dict of float
        ``evaluations`` (denoiser evaluations per sample) and ``wall_time`` (seconds) of the
        last call.
    """

    def sample(
        self,
        denoiser: Denoiser,
        n_samples: int,
        n_features: int,
        generator: torch.Generator | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        r"""Draws ``n_samples`` samples of dimension ``n_features``, shape ``(n_samples, D)``.

        ``dtype`` and ``device`` default to those of the denoiser's parameters (if it is a
        ``torch.nn.Module``), else to torch's default dtype on the CPU.
        """
        self._validate()
        if not callable(denoiser):
            raise TypeError(
                "denoiser must be a callable denoiser(x_t, sigma) -> E[x | x_t], got "
                f"{type(denoiser).__name__}."
            )
        n = check_int(n_samples, "n_samples", 1)
        d = check_int(n_features, "n_features", 1)
        dtype, dev = resolve_dtype_device(denoiser, dtype, device)
        start = time.perf_counter()

        def mean_fn(x_t: Tensor, sigma: Tensor, weight: Tensor | None, k: int) -> Tensor:
            with torch.no_grad():
                return denoiser(x_t, sigma)

        x = self._run(mean_fn, n, d, dtype, dev, generator)
        self.diagnostics_ = {
            "evaluations": float(self.evaluations_),
            "wall_time": float(time.perf_counter() - start),
        }
        return x.detach()
