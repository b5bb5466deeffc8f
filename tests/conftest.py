"""Shared test configuration, and the small estimators the estimator tests share.

Test modules import :func:`tiny_denoiser` and :func:`tiny_estimator` from here (``from
conftest import ...``): scikit-learn's ``parametrize_with_checks`` needs estimators when a
module is collected, before any fixture exists.
"""

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from diffem import DiffusionPriorEM
from diffem.denoisers import MLPDenoiser
from diffem.samplers import MMPS


@pytest.fixture(autouse=True, scope="session")
def _single_thread() -> Iterator[None]:
    """The tests use small tensors, for which intra-op threads cost more than they save."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_denoiser(**kwargs: Any) -> MLPDenoiser:
    """An MLP denoiser that trains in a fraction of a second: 2 epochs, one block of 16."""
    params: dict[str, Any] = dict(
        max_epochs=2,
        batch_size=64,
        module__hidden_features=16,
        module__n_blocks=1,
        module__emb_features=8,
    )
    params.update(kwargs)
    return MLPDenoiser(**params)


def tiny_estimator(n_iter: int = 1, **kwargs: Any) -> DiffusionPriorEM:
    """A :class:`DiffusionPriorEM` with :func:`tiny_denoiser`, a 4-step MMPS and the cheapest
    transform and score, on the CPU."""
    params: dict[str, Any] = dict(
        denoiser=tiny_denoiser(),
        sampler=MMPS(steps=4),
        n_iter=n_iter,
        gaussian_iter=4,
        n_transform_samples=2,
        n_score_samples=2,
        score_steps=2,
        device="cpu",
    )
    params.update(kwargs)
    return DiffusionPriorEM(**params)
