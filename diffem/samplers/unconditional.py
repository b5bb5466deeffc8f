r"""Prior sampling with the ancestral DDPM / DDIM sampler."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

from diffem.samplers.base import Sampler, _check_int, _resolve_dtype_device

__all__ = ["Unconditional"]


class Unconditional(Sampler):
    r"""Samples the prior :math:`q(x)` of a denoiser.

    With ``solver="ancestral"`` (the default), starting from :math:`x_T \sim \mathcal{N}(0,
    \sigma_{\max}^2 I)`, each step :math:`\sigma_t \to \sigma_s` is

    .. math::
        x_s = \hat{x} + \sqrt{\sigma_s^2 - \tau^2} \, \frac{x_t - \hat{x}}{\sigma_t} + \tau z,
        \quad \tau = \eta \sigma_s \sqrt{1 - \sigma_s^2 / \sigma_t^2},
        \quad \hat{x} = E[x \mid x_t],

    i.e. DDPM (Ho et al., 2020, "Denoising Diffusion Probabilistic Models") for ``eta=1`` and
    DDIM (Song, Meng & Ermon, 2021, "Denoising Diffusion Implicit Models") for ``eta=0``, on the
    variance-exploding process. ``corrector_steps > 0`` adds Langevin corrector steps
    (predictor-corrector sampling, Song et al., 2021). ``solver="heun"`` is EDM's second-order
    Heun sampler (Karras et al., 2022, algorithms 1 and 2) and ``solver="dpmpp_2m"`` the
    second-order multistep DPM-Solver++(2M) (Lu et al., 2022), both more accurate per
    denoiser evaluation (:class:`diffem.samplers.base.Sampler`).

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

    def __init__(
        self,
        steps: int = 64,
        eta: float = 1.0,
        *,
        solver: str = "ancestral",
        sigma_min: float = 1e-3,
        sigma_max: float = 1e2,
        batch_size: int = 4096,
        corrector_steps: int = 0,
        corrector_snr: float = 0.1,
        verbose: int = 0,
    ) -> None:
        self.steps = steps
        self.eta = eta
        self.solver = solver
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.batch_size = batch_size
        self.corrector_steps = corrector_steps
        self.corrector_snr = corrector_snr
        self.verbose = verbose

    def sample(
        self,
        denoiser: Callable[[Tensor, Tensor], Tensor],
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
        n = _check_int(n_samples, "n_samples", 1)
        d = _check_int(n_features, "n_features", 1)
        dtype, dev = _resolve_dtype_device(denoiser, dtype, device)
        start = time.perf_counter()

        def mean_fn(x_t: Tensor, sigma: Tensor, weight: Tensor | None, k: int) -> Tensor:
            with torch.no_grad():
                return denoiser(x_t, sigma)

        x = self._run(mean_fn, n, d, dtype, dev, generator)
        self.diagnostics_ = {
            "evaluations": float(self._evaluations),
            "wall_time": float(time.perf_counter() - start),
        }
        return x.detach()
