r"""The bias and variance trade-offs of the log-evidence estimator behind ``score``, on exact
priors whose densities and evidences are known.

The estimator (:mod:`diffem.em.evidence`) has three approximations: the probability-flow ODE
(``steps``, and where they fall), Hutchinson's trace estimator (``n_probes``), and importance
sampling (``n_samples`` proposals from an inflated Gaussian posterior, with a bias
correction). Each is measured here with an exact denoiser, so that nothing else enters.

Definition
----------
- **Priors.** *Mixture*: three Gaussian components with equal weights in ``D = 8`` (means at
  distance 2 sqrt(D)/2 from the origin, covariances :math:`0.3 A A^\top / D + 0.05 I`), and
  the same construction in ``D = 64`` (*mixture 64*); their reference Gaussian is the one
  moment-matched to 20000 of their samples (as ``proposal_`` is to samples of the fitted prior), so
  the prior departs from it by its multimodality (its evidence is 0.8 nats above the
  reference's in ``D = 8``). *Shifted Gaussian*: a Gaussian prior in ``D = 8`` with a
  reference whose mean is off by 0.3 and covariance by a factor 1.5 (a learned prior whose
  moments the reference misses).
- **ODE.** :math:`\log \hat q(x)` at 400 prior samples against the exact log-density: mean
  error and mean absolute error, exact traces, for the steps and for the two time grids
  (steps uniform in :math:`\log \sigma`, ``uniform_share=1``; the default, following the
  reference's shrinkage); then the Hutchinson noise (two probes, its standard deviation per
  point, and the ratio of the mean estimated variance to the empirical one).
- **Importance sampling.** 200 observations of the mixture (each entry observed with
  probability 0.6, noise 0.1): the mean estimate minus the exact mean log-evidence (with its
  standard error over observations), the root-mean-square error per observation against the
  root-mean-square reported standard error (their ratio should be near 1), and ESS / K, for
  the proposals, the inflation and the bias correction (8 steps, two probes).

Run ``python benchmarks/score_design.py`` (about a minute; ``--out`` to change the file).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from _common import RESULTS_DIR, machine_header, markdown_table, publish

from diffem.em.evidence import (
    GaussianFlow,
    importance_log_evidence,
    moment_matched_gaussian,
    ode_log_density,
)
from diffem.operators import Mask
from diffem.priors import GaussianMixturePrior, GaussianPrior

SCHEDULE = {"sigma_min": 1e-3, "sigma_max": 100.0}


def mixture(d: int, rng: np.random.Generator) -> GaussianMixturePrior:
    means = rng.normal(size=(3, d))
    means *= math.sqrt(d) / np.linalg.norm(means, axis=1, keepdims=True)
    covs = []
    for _ in range(3):
        A = rng.normal(size=(d, d))
        covs.append(0.3 * A @ A.T / d + 0.05 * np.eye(d))
    return GaussianMixturePrior(np.ones(3) / 3, means, np.stack(covs))


def cases(seed: int) -> dict[str, tuple[object, GaussianPrior]]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, d in (("mixture", 8), ("mixture 64", 64)):
        prior = mixture(d, rng)
        samples = torch.as_tensor(prior.sample(20000, generator=seed + 1))
        out[name] = (prior, moment_matched_gaussian(samples))
    A = rng.normal(size=(8, 8))
    cov = A @ A.T / 8 + 0.1 * np.eye(8)
    mean = rng.normal(size=8)
    out["shifted Gaussian"] = (GaussianPrior(mean, cov), GaussianPrior(mean + 0.3, 1.5 * cov))
    return out


def exact_density(prior: object, x: torch.Tensor) -> torch.Tensor:
    if isinstance(prior, GaussianPrior):
        dist = torch.distributions.MultivariateNormal(
            prior.mean.double(), prior.cov_matrix.double()
        )
        return dist.log_prob(x.double())
    mix = torch.distributions.Categorical(prior.weights.double())
    comp = torch.distributions.MultivariateNormal(prior.means.double(), prior.cov_matrices.double())
    return torch.distributions.MixtureSameFamily(mix, comp).log_prob(x.double())


def ode_rows(name: str, prior: object, reference: GaussianPrior, seed: int) -> list[list[str]]:
    x = torch.as_tensor(prior.sample(400, generator=seed + 2), dtype=torch.float32)
    exact = exact_density(prior, x)
    flow = GaussianFlow.from_prior(reference)
    d = x.shape[1]
    rows = []
    for share, grid in ((1.0, "log sigma"), (1 / 3, "shrinkage")):
        for steps in (4, 8, 16, 32):
            if d > 8 and steps == 32:
                continue
            value = ode_log_density(
                prior, x, flow, steps=steps, n_probes=d, uniform_share=share, **SCHEDULE
            ).value
            error = value - exact
            rows.append(
                [
                    name,
                    grid,
                    str(steps),
                    f"{float(error.mean()):+.3f}",
                    f"{float(error.abs().mean()):.3f}",
                ]
            )
    return rows


def hutchinson_row(name: str, prior: object, reference: GaussianPrior, seed: int) -> list[str]:
    x = torch.as_tensor(prior.sample(400, generator=seed + 3), dtype=torch.float32)
    flow = GaussianFlow.from_prior(reference)
    exact = ode_log_density(prior, x, flow, steps=8, n_probes=x.shape[1], **SCHEDULE).value
    noisy = ode_log_density(
        prior,
        x,
        flow,
        steps=8,
        n_probes=2,
        generator=torch.Generator().manual_seed(seed),
        **SCHEDULE,
    )
    noise = noisy.value - exact
    se = float(noise.std()) / math.sqrt(len(x))
    return [
        name,
        f"{float(noise.mean()):+.4f} ± {se:.4f}",
        f"{float(noise.std()):.3f}",
        f"{float(noisy.variance.mean()) / float(noise.var()):.2f}",
    ]


def is_rows(prior: object, reference: GaussianPrior, seed: int) -> list[list[str]]:
    rng = np.random.default_rng(seed + 4)
    x = prior.sample(200, generator=seed + 5)
    mask = rng.random(x.shape) < 0.6
    Y = torch.as_tensor(np.where(mask, x + 0.1 * rng.normal(size=x.shape), 0.0)).float()
    op = Mask(mask, noise_std=0.1)
    exact = torch.as_tensor(prior.log_evidence(Y, op)).double()
    configs = [
        ("K = 4", {"n_samples": 4}),
        ("K = 8", {"n_samples": 8}),
        ("K = 16 (default)", {"n_samples": 16}),
        ("K = 64", {"n_samples": 64}),
        ("K = 16, no inflation", {"n_samples": 16, "inflation": 1.0}),
        ("K = 16, no bias correction", {"n_samples": 16, "debias": False}),
        ("K = 64, no bias correction", {"n_samples": 64, "debias": False}),
    ]
    rows = []
    denoiser = prior.to(dtype=torch.float32)
    for label, config in configs:
        result = importance_log_evidence(
            denoiser,
            Y,
            op,
            reference,
            steps=8,
            generator=torch.Generator().manual_seed(seed),
            **config,
            **SCHEDULE,
        )
        error = result.log_evidence - exact
        rms, rms_se = error.pow(2).mean().sqrt(), result.std.pow(2).mean().sqrt()
        k = config["n_samples"]
        rows.append(
            [
                label,
                f"{float(error.mean()):+.3f} ± {float(error.std()) / math.sqrt(len(Y)):.3f}",
                f"{float(rms):.3f}",
                f"{float(rms_se):.3f}",
                f"{float(rms / rms_se):.2f}",
                f"{float(result.ess.mean()) / k:.2f}",
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "score_design.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    priors = cases(args.seed)
    ode = [row for name, (p, r) in priors.items() for row in ode_rows(name, p, r, args.seed)]
    hutch = [hutchinson_row(name, p, r, args.seed) for name, (p, r) in priors.items()]
    mix, ref = priors["mixture"]
    importance = is_rows(mix, ref, args.seed)
    lines = [
        "# Score design: bias and variance of the log-evidence estimator on exact priors",
        "",
        *machine_header(torch.device("cpu")),
        f"- total wall time {time.perf_counter() - start:.0f} s; see the script's docstring "
        "for the definitions",
        "",
        "## The probability-flow ODE (exact traces): log q error at 400 prior samples, nats",
        "",
        markdown_table(["prior", "grid", "steps", "mean error", "mean abs. error"], ode),
        "",
        "## Hutchinson's trace estimator, two probes with the Gaussian control variate (8 steps)",
        "",
        markdown_table(
            ["prior", "mean noise", "noise sd", "estimated / empirical variance"], hutch
        ),
        "",
        "## Importance sampling on the mixture (D = 8): 200 observations, 8 steps, two probes",
        "",
        markdown_table(
            [
                "proposals",
                "mean error",
                "rms error",
                "rms reported se",
                "rms error / se",
                "ESS / K",
            ],
            importance,
        ),
        "",
    ]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
