"""An unchanged ``DiffusionPriorEM(...).fit(Y, operator)`` script for
``tests/test_distributed.py``: run as ``torchrun --nproc-per-node N tests/distributed_fit.py
OUT`` it fits data-parallel on N processes; run with ``python`` it fits in one. Every process
saves its fitted estimator to ``OUT/rank<RANK>.joblib``."""

from __future__ import annotations

import os
import sys

import joblib
import numpy as np
import torch

from diffem import DiffusionPriorEM
from diffem.denoisers import MLPDenoiser
from diffem.operators import Mask
from diffem.samplers import MMPS

D = 4
N_TRAIN = 800
N_TEST = 200
NOISE = 0.1


def problem(seed: int = 0) -> dict[str, np.ndarray]:
    """Latents from a known Gaussian, each entry observed with probability 0.7, noise 0.1."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(D, D))
    cov = A @ A.T / D + 0.2 * np.eye(D)
    mean = rng.normal(size=D)
    n = N_TRAIN + N_TEST
    X = rng.multivariate_normal(mean, cov, size=n)
    mask = rng.random((n, D)) < 0.7
    Y = np.where(mask, X + NOISE * rng.normal(size=X.shape), np.nan).astype(np.float32)
    return {"mean": mean, "cov": cov, "Y": Y, "mask": mask}


def estimator(random_state: int = 0) -> DiffusionPriorEM:
    denoiser = MLPDenoiser(
        max_epochs=20, batch_size=64, lr=2e-3, module__hidden_features=64, module__n_blocks=2
    )
    return DiffusionPriorEM(
        denoiser,
        MMPS(steps=32),
        n_iter=2,
        random_state=random_state,
        n_score_samples=8,
        score_steps=8,
    )


def main(out: str, random_state: int = 0) -> None:
    torch.set_num_threads(1)
    data = problem()
    Y, mask = data["Y"][:N_TRAIN], data["mask"][:N_TRAIN]
    est = estimator(random_state).fit(Y, Mask(mask, noise_std=NOISE))
    joblib.dump(est, os.path.join(out, f"rank{os.environ.get('RANK', '0')}.joblib"))


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:3]))
