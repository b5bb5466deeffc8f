r"""Reverse-process solvers of the variance-exploding diffusion, and the Langevin corrector.

All samplers integrate :math:`x_t = x + \sigma_t z` backwards over decreasing levels
:math:`\sigma_0 > \dots > \sigma_{N-1} > \sigma_N = 0`, from
:math:`x_{\sigma_0} \sim \mathcal{N}(0, \sigma_0^2 I)`, given a (guided) denoiser
:math:`D(x, \sigma) \approx E[x \mid x_\sigma = x]` (or :math:`E[x \mid x_\sigma = x, y]`).
A step :math:`\sigma_t \to \sigma_s < \sigma_t` is made by one of three solvers.

``"ancestral"`` (first order, one evaluation per step): Song, Meng & Ermon (2021, "Denoising
Diffusion Implicit Models") with :math:`\hat{x} = D(x_t, \sigma_t)`,

.. math::
    x_s = c \, x_t + (1 - c) \hat{x} + \tau z, \qquad
    \tau = \eta \, \sigma_s \sqrt{1 - \sigma_s^2 / \sigma_t^2}, \qquad
    c = \sqrt{\sigma_s^2 - \tau^2} / \sigma_t,

with :math:`\eta = 1` the DDPM posterior :math:`q(x_s \mid x_t, \hat{x})` (Ho et al., 2020) and
:math:`\eta = 0` the deterministic DDIM update.

``"dpmpp_2m"`` (second order, one evaluation per step): the multistep exponential integrator in
:math:`\lambda = -\log \sigma` of Lu et al. (2022, "DPM-Solver++", algorithm 2 and its SDE
variant): the ancestral step with :math:`\hat{x}` replaced by its linear extrapolation through
the previous step's estimate,
:math:`\tilde{x} = \hat{x} + \frac{h}{2 h_{\text{prev}}} (\hat{x} - \hat{x}_{\text{prev}})`,
:math:`h = \log(\sigma_t / \sigma_s)`. The first and last steps are first order.

``"heun"`` (second order, two evaluations per step): EDM's algorithms 1 and 2 (Karras et al.,
2022) on :math:`dx / d\sigma = (x - D(x, \sigma)) / \sigma`, after raising the noise to
:math:`\hat\sigma = \sqrt{\sigma_t^2 + \tau^2}` ("churn"):

.. math::
    k_1 = \frac{\hat{x} - D(\hat{x}, \hat\sigma)}{\hat\sigma}, \quad
    x' = \hat{x} + (\sigma_s - \hat\sigma) k_1, \quad
    k_2 = \frac{x' - D(x', \sigma_s)}{\sigma_s}, \quad
    x_s = \hat{x} + (\sigma_s - \hat\sigma) \frac{k_1 + k_2}{2},

the last step being the Euler step :math:`x_0 = D(\hat{x}, \hat\sigma)`.

The ancestral and DPM-Solver++(2M) steps are Gaussian transitions
:math:`x_s \sim \mathcal{N}(c \, x_t + (1 - c) \tilde{x}, \tau^2 I)` given the past, which is
what sequential Monte Carlo (:class:`diffem.samplers.SMC`) needs.

Corrector (Song et al., 2021, "Score-Based Generative Modeling through SDEs", algorithm 5):
``corrector_steps`` Langevin steps at each level before the predictor, with the score
:math:`s = (D(x_t, \sigma_t) - x_t) / \sigma_t^2`,
:math:`x_t \leftarrow x_t + \epsilon s + \sqrt{2 \epsilon} z`,
:math:`\epsilon = \min(2 (r \lVert z \rVert / \lVert s \rVert)^2, \sigma_t^2)` per row.

Every function works on ``(n, D)`` tensors; ``evaluate(x, sigma, weight) -> (n, D)`` is the
(guided) denoiser, where ``weight`` is the coefficient of its output in the update times the
number of evaluations of the step (``1 - c`` for the one-evaluation steps,
:math:`1 - \sigma_s / \hat\sigma` and :math:`\hat\sigma / \sigma_s - 1` for Heun's two, 1 for the
last step, ``None`` in a corrector step; DPS turns its gradient step into a guided denoiser with
it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

__all__ = [
    "SOLVERS",
    "ancestral_coefficients",
    "ancestral_step",
    "dpmpp_2m_estimate",
    "integrate",
    "langevin_step",
]

#: The ``solver`` options of all samplers.
SOLVERS = ("ancestral", "heun", "dpmpp_2m")

Evaluate = Callable[[Tensor, float, float | None], Tensor]
Randn = Callable[[Tensor], Tensor]


def ancestral_coefficients(sigma_t: float, sigma_s: float, eta: float) -> tuple[float, float]:
    r"""``(c, tau)`` of the step :math:`\sigma_t \to \sigma_s` (both 0 if :math:`\sigma_s = 0`)."""
    if sigma_s <= 0.0:
        return 0.0, 0.0
    ratio2 = (sigma_s / sigma_t) ** 2
    tau = eta * sigma_s * math.sqrt(max(1.0 - ratio2, 0.0))
    return math.sqrt(max(sigma_s**2 - tau**2, 0.0)) / sigma_t, tau


def ancestral_step(
    x_t: Tensor, x_hat: Tensor, sigma_t: float, sigma_s: float, eta: float, noise: Tensor | None
) -> Tensor:
    r""":math:`x_s = c \, x_t + (1 - c) \hat{x} + \tau z`; ``noise`` :math:`z` may be ``None``
    when :math:`\tau = 0`. Shapes ``(n, D)``."""
    if sigma_s <= 0.0:
        return x_hat
    coef, tau = ancestral_coefficients(sigma_t, sigma_s, eta)
    x_s = x_hat + coef * (x_t - x_hat)
    if tau > 0.0 and noise is not None:
        x_s = x_s + tau * noise
    return x_s


def dpmpp_2m_estimate(x_hat: Tensor, previous: tuple[Tensor, float] | None, h: float) -> Tensor:
    r""":math:`\tilde{x} = \hat{x} + \frac{h}{2 h_{\text{prev}}} (\hat{x} - \hat{x}_{\text{prev}})`
    with ``previous = (x_hat_prev, h_prev)``; :math:`\hat{x}` when there is none."""
    if previous is None:
        return x_hat
    x_prev, h_prev = previous
    return x_hat + (h / (2.0 * h_prev)) * (x_hat - x_prev)


def langevin_step(evaluate: Evaluate, x: Tensor, sigma: float, snr: float, randn: Randn) -> Tensor:
    """One Langevin corrector step at level ``sigma`` (module docstring)."""
    score = (evaluate(x, sigma, None) - x) / sigma**2
    z = randn(x)
    score_norm = torch.linalg.vector_norm(score, dim=-1)
    z_norm = torch.linalg.vector_norm(z, dim=-1)
    good = (score_norm > 0) & torch.isfinite(score_norm)
    eps = 2.0 * (snr * z_norm / torch.where(good, score_norm, 1.0)) ** 2
    eps = torch.where(good, eps.clamp(max=sigma**2), 0.0).unsqueeze(-1)
    score = torch.where(good.unsqueeze(-1), score, 0.0)
    return x + eps * score + torch.sqrt(2.0 * eps) * z


def heun_step(
    evaluate: Evaluate, x: Tensor, sigma_t: float, sigma_s: float, tau: float, randn: Randn
) -> Tensor:
    """EDM's stochastic Heun step (Karras et al., 2022, algorithm 2), module docstring."""
    sigma_hat = sigma_t
    if tau > 0:
        x = x + tau * randn(x)
        sigma_hat = math.sqrt(sigma_t**2 + tau**2)
    if sigma_s <= 0.0:
        return evaluate(x, sigma_hat, 1.0)
    ratio = sigma_s / sigma_hat
    d1 = evaluate(x, sigma_hat, 1.0 - ratio)
    # Euler predictor x' = x + (sigma_s - sigma_hat) k1, written without k1's 1 / sigma.
    x_euler = d1 + ratio * (x - d1)
    d2 = evaluate(x_euler, sigma_s, 1.0 / ratio - 1.0)
    step = sigma_s - sigma_hat
    return x + 0.5 * step * ((x - d1) / sigma_hat + (x_euler - d2) / sigma_s)


def integrate(
    evaluate: Evaluate,
    x: Tensor,
    levels: list[float],
    *,
    solver: str,
    eta: float,
    randn: Randn,
    corrector_steps: int = 0,
    corrector_snr: float = 0.1,
    progress: Callable[[Iterable[int], int], Iterable[int]] = lambda it, total: it,
) -> Tensor:
    r"""Integrates from ``x`` at ``levels[0]`` down to ``levels[-1] = 0`` with ``solver``.

    ``x`` ``(n, D)``; ``randn(like)`` draws standard normal noise of ``like``'s shape.
    """
    previous: tuple[Tensor, float] | None = None  # DPM-Solver++(2M): (x_hat, h)
    steps = len(levels) - 1
    for i in progress(range(steps), steps):
        sigma_t, sigma_s = levels[i], levels[i + 1]
        for _ in range(corrector_steps):
            x = langevin_step(evaluate, x, sigma_t, corrector_snr, randn)
        coef, tau = ancestral_coefficients(sigma_t, sigma_s, eta)
        if solver == "heun":
            x = heun_step(evaluate, x, sigma_t, sigma_s, tau, randn)
            continue
        x_hat = evaluate(x, sigma_t, 1.0 - coef)
        if solver == "dpmpp_2m" and sigma_s > 0:
            h = math.log(sigma_t / sigma_s)
            x_hat, previous = dpmpp_2m_estimate(x_hat, previous, h), (x_hat, h)
        noise = randn(x) if tau > 0 else None
        x = ancestral_step(x, x_hat, sigma_t, sigma_s, eta, noise)
    return x
