"""Seeds and generators: one home for scikit-learn's ``random_state`` semantics in torch.

A ``random_state`` follows scikit-learn (:func:`sklearn.utils.check_random_state`): ``None``
draws from NumPy's global random state, an int is a fixed seed, a ``RandomState`` (or a NumPy
``Generator``) is drawn from; a ``torch.Generator`` is also accepted and used as is. The
low-level ``generator=`` arguments (priors' and samplers' sampling) follow torch instead:
``None`` is torch's global generator, so that ``torch.manual_seed`` governs them.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch
from sklearn.utils import check_random_state

__all__ = ["draw_seed", "numpy_random_state", "optional_generator", "torch_generator"]

_SEED_BOUND = 2**31 - 1


def draw_seed(random_state: Any) -> int:
    """A seed in ``[0, 2**31 - 1)`` drawn from ``check_random_state(random_state)``, or from a
    NumPy ``Generator`` or a ``torch.Generator``."""
    if isinstance(random_state, torch.Generator):
        return int(
            torch.randint(0, _SEED_BOUND, (), generator=random_state, device=random_state.device)
        )
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(0, _SEED_BOUND))
    return int(check_random_state(random_state).randint(0, _SEED_BOUND))


def numpy_random_state(random_state: Any) -> np.random.RandomState:
    """``check_random_state(random_state)``, also for a NumPy ``Generator`` or a
    ``torch.Generator`` (a ``RandomState`` seeded by :func:`draw_seed`)."""
    if isinstance(random_state, (np.random.Generator, torch.Generator)):
        return np.random.RandomState(draw_seed(random_state))
    return check_random_state(random_state)


def torch_generator(random_state: Any, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` from a ``random_state``: a generator is returned as
    is, an int seeds it, anything else (``None``, ``RandomState``, NumPy ``Generator``) seeds it
    with :func:`draw_seed`. Raises ``ValueError`` naming ``random_state`` otherwise."""
    if isinstance(random_state, torch.Generator):
        return random_state
    if isinstance(random_state, numbers.Integral) and not isinstance(random_state, bool):
        seed = int(random_state)
    else:
        try:
            seed = draw_seed(random_state)
        except ValueError as error:
            raise ValueError(
                "random_state must be None, an int, a numpy RandomState or Generator, or a "
                f"torch.Generator; got {type(random_state).__name__}."
            ) from error
    return torch.Generator(device=device).manual_seed(seed)


def optional_generator(generator: Any, device: torch.device | str) -> torch.Generator | None:
    """The ``generator=`` argument of torch-level sampling: ``None`` stays ``None`` (torch's
    global generator); anything else goes through :func:`torch_generator`."""
    return None if generator is None else torch_generator(generator, device)
