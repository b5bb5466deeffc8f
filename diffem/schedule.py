r"""Variance-exploding noise process and EDM preconditioning.

The forward process perturbs a clean sample :math:`x` with Gaussian noise,

.. math:: x_t = x + \sigma_t z, \qquad z \sim \mathcal{N}(0, I),

with a log-linear schedule :math:`\log \sigma_t = (1 - t) \log \sigma_{\min} + t \log
\sigma_{\max}`, :math:`t \in [0, 1]` (Song et al., 2021; Karras et al., 2022). A *denoiser* is
any callable ``denoiser(x_t, sigma) -> E[x | x_t]`` on ``(B, D)`` tensors.

Learned denoisers use the EDM preconditioning of Karras et al. (2022, "Elucidating the Design
Space of Diffusion-Based Generative Models", table 1):

.. math::
    D(x_t, \sigma) = c_{\text{skip}}(\sigma) x_t + c_{\text{out}}(\sigma)
    F_\theta\big(c_{\text{in}}(\sigma) x_t, c_{\text{noise}}(\sigma)\big)

with :math:`c_{\text{skip}} = \sigma_d^2 / (\sigma^2 + \sigma_d^2)`,
:math:`c_{\text{out}} = \sigma \sigma_d / \sqrt{\sigma^2 + \sigma_d^2}`,
:math:`c_{\text{in}} = 1 / \sqrt{\sigma^2 + \sigma_d^2}`,
:math:`c_{\text{noise}} = \log(\sigma) / 4`,
and loss weight :math:`\lambda(\sigma) = 1 / c_{\text{out}}^2`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diffem._validation import check_int

__all__ = ["EDMPreconditioning", "VESchedule", "gaussian_variance"]


def gaussian_variance(sigma: Tensor, sigma_data: float) -> Tensor:
    r""":math:`r_\sigma^2 = \sigma^2 \sigma_d^2 / (\sigma^2 + \sigma_d^2)`, the variance of
    :math:`x \mid x_\sigma` under the prior :math:`x \sim \mathcal{N}(0, \sigma_d^2 I)` (and the
    EDM :math:`c_{\text{out}}^2`); same shape as ``sigma``."""
    s2 = sigma**2
    return s2 * sigma_data**2 / (s2 + sigma_data**2)


@dataclass(frozen=True)
class VESchedule:
    r"""Log-linear variance-exploding schedule between ``sigma_min`` and ``sigma_max``.

    Parameters
    ----------
    sigma_min, sigma_max : float
        Smallest and largest noise levels. The defaults suit data of unit scale.
    """

    sigma_min: float = 1e-3
    sigma_max: float = 1e2

    def __post_init__(self) -> None:
        if not (0 < self.sigma_min < self.sigma_max) or not math.isfinite(self.sigma_max):
            raise ValueError(
                "sigma_min and sigma_max must satisfy 0 < sigma_min < sigma_max < inf, got "
                f"sigma_min={self.sigma_min!r}, sigma_max={self.sigma_max!r}."
            )

    def sigma(self, t: Tensor) -> Tensor:
        r""":math:`\sigma_t = \exp((1 - t) \log \sigma_{\min} + t \log \sigma_{\max})`."""
        log_min, log_max = math.log(self.sigma_min), math.log(self.sigma_max)
        return torch.exp(log_min + t * (log_max - log_min))

    def discretize(
        self,
        steps: int,
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> Tensor:
        r"""Decreasing noise levels for a ``steps``-step sampler, shape ``(steps + 1,)``.

        ``steps`` log-uniform levels from :math:`\sigma_{\max}` down to :math:`\sigma_{\min}`,
        then a final ``0``: the last step returns the denoiser's estimate :math:`E[x | x_t]`.
        """
        steps = check_int(steps, "steps", 1)
        t = torch.linspace(1.0, 0.0, steps, dtype=dtype, device=device)
        return torch.cat([self.sigma(t), torch.zeros(1, dtype=dtype, device=device)])

    def sample_sigma(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        r"""Training noise levels :math:`\sigma_t`, ``t ~ U(0, 1)``, shape ``(n,)``."""
        t = torch.rand(n, generator=generator, device=device)
        return self.sigma(t)


@dataclass(frozen=True)
class EDMPreconditioning:
    r"""EDM coefficients (Karras et al., 2022) for data of standard deviation ``sigma_data``."""

    sigma_data: float = 1.0

    def c_skip(self, sigma: Tensor) -> Tensor:
        return self.sigma_data**2 / (sigma**2 + self.sigma_data**2)

    def c_out(self, sigma: Tensor) -> Tensor:
        return sigma * self.sigma_data / torch.sqrt(sigma**2 + self.sigma_data**2)

    def c_in(self, sigma: Tensor) -> Tensor:
        return 1.0 / torch.sqrt(sigma**2 + self.sigma_data**2)

    def c_noise(self, sigma: Tensor) -> Tensor:
        return torch.log(sigma) / 4

    def loss_weight(self, sigma: Tensor) -> Tensor:
        r""":math:`\lambda(\sigma) = 1 / c_{\text{out}}(\sigma)^2`, which makes the target of
        :math:`F_\theta` unit-variance at every noise level."""
        return 1.0 / self.c_out(sigma) ** 2
