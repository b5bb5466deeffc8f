r"""How the reference Gaussian limits ``score`` in high dimension, and where to take it from.

``score`` solves the probability-flow ODE relative to, and draws its proposals from the
posteriors of, a reference Gaussian (``DiffusionPriorEM.proposal_``). In high dimension the
importance weights are only as good as that Gaussian: on the 16x16 Gaussian field of
``score_speed.py`` (D = 256; 2000 training observations, 60% of the pixels observed with noise
0.1), this script runs the evidence estimator at ``score``'s defaults (16 proposals, 8 Heun
steps, two probes) with the *exact* prior as denoiser, so that the answer is known, on
``--n-test`` held-out observations, with references built from different sources, and reports
each reference's KL divergence from the truth and the estimator's error. The sources are
what a fit that reached the truth would hand to ``score``:

- *posterior samples of the training observations* under the truth, one or several per
  observation (the E-step's samples, or those of several iterations or all SMC particles
  pooled), with Ledoit-Wolf's or the empirical covariance;
- *unconditional samples of the prior*, drawn by the diffusion sampler (``DiffusionPriorEM``'s
  recipe sampler, run unconditionally with the exact prior as denoiser), empirical covariance,
  ``N`` of them (``N = reference_sample_size(D)`` is ``score``'s choice);
- the twisted SMC's normalising constant (the estimator's evidence sampler, 64 particles, 32
  steps) instead of importance sampling, for comparison;
- the truth itself.

The columns *IS only* and *error* separate the importance sampling from the ODE: *IS only*
uses the exact :math:`\log q(x_k)` in the weights, *error* the ODE's estimate.

Run ``python benchmarks/score_reference.py``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.covariance import empirical_covariance, ledoit_wolf

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from _common import RESULTS_DIR, machine_header, markdown_table
from score_speed import fmt, mean_and_se, observations, truth

from diffem.em.estimator import recipe_evidence_sampler, recipe_sampler
from diffem.em.evidence import (
    GaussianFlow,
    _combine,
    _floor_noise,
    _log_likelihood,
    _proposals,
    importance_log_evidence,
    reference_sample_size,
)
from diffem.em.prior import DiffusionPrior
from diffem.priors import GaussianPrior


def gaussian_kl(mean0, cov0, mean1, cov1) -> float:
    """KL(N(mean0, cov0) || N(mean1, cov1))."""
    diff = mean1 - mean0
    return 0.5 * float(
        np.trace(np.linalg.solve(cov1, cov0))
        + diff @ np.linalg.solve(cov1, diff)
        - len(mean0)
        + np.linalg.slogdet(cov1)[1]
        - np.linalg.slogdet(cov0)[1]
    )


def importance_only(prior, reference, Y, op, exact, seed: int, n_samples: int = 16):
    """The importance-sampling estimate with the exact log-density of ``prior`` in the weights
    (no ODE): its mean error and standard error."""
    op64 = _floor_noise(op, 1e-3).to(dtype=torch.float64)
    d = prior.n_features
    inflation = 1 + math.sqrt(2 * math.log(2) / d)
    generator = torch.Generator().manual_seed(seed)
    Y64 = Y.to(torch.float64)
    x, log_r = _proposals(reference, Y64, op64, n_samples, inflation, generator)
    log_q = GaussianFlow.from_prior(prior).log_prob(x.reshape(-1, d), 0.0).reshape(x.shape[:2])
    run = _combine(log_q + _log_likelihood(Y64, op64, x) - log_r, True)
    return mean_and_se(run.log_evidence.numpy() - exact, run.std.numpy())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "score_reference.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    prior = truth("16x16", rng)
    d = prior.n_features
    Y, op = observations(prior, args.n_train + args.n_test, rng)
    train = (Y[: args.n_train], op[: args.n_train])
    Yt, opt = Y[args.n_train :], op[args.n_train :]
    Yp = opt.prepare(torch.as_tensor(Yt))
    mean, cov = prior.mean.numpy(), prior.cov_matrix.numpy()
    exact = prior.log_evidence(Yt, opt).astype(np.float64)
    denoiser = prior.to(dtype=torch.float32)
    posterior = prior.sample_posterior(*train, 16, generator=args.seed + 3).astype(np.float64)
    sampler = recipe_sampler().set_params(sigma_min=1e-3, sigma_max=100.0)
    diffusion = DiffusionPrior(denoiser, sampler, prior)
    n_default = reference_sample_size(d)
    unconditional = diffusion.sample(n_default, generator=args.seed + 5).astype(np.float64)
    sources = [
        ("posterior, 1 per observation", "Ledoit-Wolf", posterior[:, 0]),
        ("posterior, 4 per observation (the E-step's)", "Ledoit-Wolf", posterior[:, :4]),
        ("posterior, 4 per observation", "empirical", posterior[:, :4]),
        ("posterior, 16 per observation", "empirical", posterior),
        ("unconditional, N = 4096", "empirical", unconditional[:4096]),
        (f"unconditional, N = {n_default} (score's)", "empirical", unconditional),
    ]
    rows = []

    def add_row(source, estimator, n, ref_mean, ref_cov):
        reference = GaussianPrior(ref_mean, ref_cov)
        run = importance_log_evidence(
            denoiser,
            Yp,
            opt,
            reference,
            sigma_min=1e-3,
            sigma_max=100.0,
            n_samples=16,
            steps=8,
            generator=torch.Generator().manual_seed(args.seed + 2),
        )
        err, se = mean_and_se(run.log_evidence.numpy() - exact, run.std.numpy())
        rows.append(
            [
                source,
                estimator,
                str(n),
                f"{gaussian_kl(mean, cov, ref_mean, ref_cov):.1f}",
                fmt(*importance_only(prior, reference, Yp, opt, exact, args.seed + 2)),
                fmt(err, se),
                f"{float(run.ess.mean()) / 16:.2f}",
            ]
        )
        print(rows[-1], flush=True)

    for source, estimator, X in sources:
        X = X.reshape(-1, d)
        ref_cov = ledoit_wolf(X)[0] if estimator == "Ledoit-Wolf" else empirical_covariance(X)
        add_row(source, estimator, len(X), X.mean(0), ref_cov)
    add_row("the truth", "", "", mean, cov)
    # the twisted SMC's normalising constant, at the evidence sampler's settings
    evidence_sampler = recipe_evidence_sampler().set_params(sigma_min=1e-3, sigma_max=100.0)
    smc = DiffusionPrior(denoiser, evidence_sampler, prior)
    smc.sample_posterior(Yt, opt, 1, generator=args.seed + 6)
    smc_err = smc.sampler_log_evidence_ - exact
    smc_row = fmt(float(smc_err.mean()), float(smc_err.std() / math.sqrt(len(smc_err))))
    rows.append(["SMC normalising constant (64 particles)", "", "", "", "", smc_row, ""])
    print(rows[-1], flush=True)
    lines = [
        "# Score's reference Gaussian in D = 256: where it comes from",
        "",
        *machine_header(torch.device("cpu")),
        f"- settings: the 16x16 Gaussian field of `score_speed.py`, seed {args.seed}; "
        f"{args.n_train} training observations; {args.n_test} test observations; exact prior "
        f"as denoiser, 16 proposals, 8 Heun steps, two probes; total wall time "
        f"{time.perf_counter() - start:.0f} s",
        "",
        "*KL*: KL(truth || reference) in nats; *IS only*: the importance-sampling estimate with "
        "the exact prior density in the weights, minus the exact evidence; *error*: the "
        "estimator (ODE density) minus the exact evidence; both in nats per observation (goal "
        "0.3), ± the standard error of the mean (for the SMC row: the spread over "
        "observations).",
        "",
        markdown_table(
            ["reference source", "covariance", "N", "KL", "IS only", "error", "ESS / K"], rows
        ),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
