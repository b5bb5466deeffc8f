r"""Random-walk Metropolis-Hastings (Metropolis et al., 1953; Hastings, 1970): the black-box
reference sampler of an unnormalised posterior :math:`\gamma(x) = p(x) \prod_j p(y_j \mid x)`.

From :math:`x_{n-1}`, propose :math:`x' \sim q(x' \mid x_{n-1}) = \mathcal{N}(x_{n-1},
s^2 I)` and accept it (:math:`x_n = x'`) with probability

.. math:: \alpha(x_{n-1}, x') = \min\Big\{1, \frac{\gamma(x')}{\gamma(x_{n-1})}\Big\},

otherwise :math:`x_n = x_{n-1}`; the proposal is symmetric, so its ratio cancels. With several
step sizes, each step draws :math:`s` uniformly among them: a mixture of symmetric kernels is
symmetric, and the large steps let a chain cross between separated modes while the small ones
keep a good acceptance rate inside a mode. Chains are run in parallel, one row each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from diffem._validation import check_int, check_number

__all__ = ["MetropolisResult", "random_walk_metropolis"]


class MetropolisResult(NamedTuple):
    """The kept states and acceptance rates of :func:`random_walk_metropolis`."""

    samples: Tensor
    """``(C, S, D)``: ``S`` states per chain, after ``burn_in`` and thinning."""
    acceptance: Tensor
    """``(C,)``: fraction of accepted proposals per chain (burn-in included)."""


def random_walk_metropolis(
    log_density: Callable[[Tensor], Tensor],
    x0: Tensor,
    n_samples: int,
    step_size: float | Sequence[float],
    *,
    burn_in: int = 0,
    thin: int = 1,
    generator: torch.Generator | None = None,
) -> MetropolisResult:
    r"""Runs ``C`` random-walk Metropolis-Hastings chains in parallel.

    Parameters
    ----------
    log_density : callable
        :math:`\log \gamma`, ``(C, D) -> (C,)``, up to a constant; row ``c`` is chain ``c``'s
        target (the rows may target different posteriors). ``-inf`` is allowed, not NaN.
    x0 : Tensor of shape ``(C, D)``
        Initial states, where ``log_density`` is finite.
    n_samples : int
        States kept per chain.
    step_size : float or sequence of floats
        Proposal standard deviation :math:`s`, or several drawn uniformly at each step.
    burn_in : int
        Steps discarded first.
    thin : int
        Steps between two kept states.
    generator : torch.Generator, optional

    Returns
    -------
    MetropolisResult
        ``samples`` ``(C, n_samples, D)`` and ``acceptance`` ``(C,)``.
    """
    check_int(n_samples, "n_samples", 1)
    check_int(burn_in, "burn_in", 0)
    check_int(thin, "thin", 1)
    sizes = [step_size] if isinstance(step_size, (int, float)) else list(step_size)
    if not sizes:
        raise ValueError("step_size must be a positive number or a non-empty sequence of them.")
    for size in sizes:
        check_number(size, "step_size", 0.0, low_open=True)
    if not isinstance(x0, Tensor) or x0.ndim != 2 or not x0.is_floating_point():
        raise ValueError("x0 must be a floating tensor of shape (C, D).")
    scales = torch.tensor(sizes, dtype=x0.dtype, device=x0.device)
    x = x0.clone()
    log_p = log_density(x)
    if not torch.isfinite(log_p).all():
        raise ValueError("log_density must be finite at every initial state x0.")
    accepted = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    kept = []
    total = burn_in + n_samples * thin
    for step in range(1, total + 1):
        pick = torch.randint(len(sizes), (x.shape[0], 1), generator=generator, device=x.device)
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        proposal = x + scales[pick] * noise
        log_q = log_density(proposal)
        u = torch.rand(x.shape[0], generator=generator, dtype=x.dtype, device=x.device)
        accept = torch.log(u) < log_q - log_p  # False for log_q = -inf or NaN
        x = torch.where(accept[:, None], proposal, x)
        log_p = torch.where(accept, log_q, log_p)
        accepted += accept.to(x.dtype)
        if step > burn_in and (step - burn_in) % thin == 0:
            kept.append(x)
    return MetropolisResult(torch.stack(kept, dim=1), accepted / total)
