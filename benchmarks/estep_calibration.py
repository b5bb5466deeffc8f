r"""Benchmark: the spread of MMPS posterior samples on the digits, with an exact denoiser.

EM's fixed point is the prior whose aggregate posterior is itself (Rozet et al., 2024): an
E-step whose samples are more spread than the posterior makes every M-step fit a blurred
target, and EM settles on a blurred prior. This script measures that spread where the answer
is known: the Gaussian (PPCA) prior that EM starts from on ``digits.py``'s problem (8x8
digits, 75% missing, noise 0.05), fitted by closed-form EM to the corrupted training images,
whose posterior is exact. Its exact denoiser drives MMPS (Rozet et al., 2024), so that only the
sampler's discretisation is measured, for several numbers of steps and stochasticities
:math:`\eta` (1: DDPM-like, 0: DDIM-like probability-flow steps; DPM-Solver++(2M), one CG
iteration, as the digits E-step). Reported, over ``--rows`` training observations and their
missing pixels:

- the mean posterior variance of ``--draws`` samples per observation (unbiased), relative to
  the exact posterior's (1 is calibrated; the standard error of the ratio is printed);
- the PSNR (data range 2) of the posterior mean on the missing pixels against the true
  images, with the Monte Carlo error of the ``--draws``-sample mean removed
  (:math:`\text{MSE} - \bar{v} / K`).

::

    python benchmarks/estep_calibration.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from _common import RESULTS_DIR, machine_header, publish

from diffem._report import format_table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=256, help="training observations")
    p.add_argument("--draws", type=int, default=8, help="posterior samples per observation")
    p.add_argument("--steps", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--etas", type=float, nargs="+", default=[1.0, 0.5, 0.0])
    p.add_argument("--cg-iter", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS_DIR / "estep_calibration.md"))
    return p.parse_args(argv)


def spread_and_psnr(
    samples: np.ndarray, truth: np.ndarray, missing: np.ndarray
) -> tuple[float, float, float]:
    """Mean unbiased sample variance over the ``missing`` entries, its standard error (over
    the observations), and the PSNR of the mean with the Monte Carlo error removed."""
    k = samples.shape[1]
    var = samples.var(axis=1, ddof=1)
    per_row = np.where(missing, var, 0.0).sum(1) / missing.sum(1)
    mean_var = float(var[missing].mean())
    mse = float(((samples.mean(axis=1) - truth) ** 2)[missing].mean()) - mean_var / k
    se = float(per_row.std(ddof=1) / np.sqrt(len(per_row)))
    return mean_var, se, float(10 * np.log10(4.0 / mse))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffem import DiffusionPriorEM
    from diffem.datasets import load_digits_corrupted
    from diffem.em.prior import DiffusionPrior
    from diffem.samplers import MMPS

    tic = time.perf_counter()
    clean, Y, operator = load_digits_corrupted(missing=0.75, noise_std=0.05, random_state=args.seed)
    clean, Y = np.asarray(clean, np.float64), np.asarray(Y, np.float64)
    # digits.py's split: the Gaussian is fitted to the corrupted training images
    perm = np.random.RandomState(args.seed).permutation(len(clean))
    train = np.sort(perm[round(0.2 * len(clean)) :])
    est = DiffusionPriorEM(n_iter=0, device="cpu", random_state=args.seed)
    est.fit(Y[train], operator[train])
    gaussian = est.gaussian_prior_
    rows = train[: args.rows]
    missing = ~np.broadcast_to(np.asarray(operator.observed.cpu(), dtype=bool), Y.shape)[rows]
    Y_rows, op_rows, truth = Y[rows], operator[rows], clean[rows]
    exact = est.sample_posterior(Y_rows, op_rows, n_samples=args.draws, random_state=1)
    v_exact, se_exact, psnr_exact = spread_and_psnr(exact.astype(np.float64), truth, missing)
    table = [
        {
            "sampler": "exact posterior",
            "steps": "",
            "eta": "",
            "variance / exact": 1.0,
            "± se": se_exact / v_exact,
            "PSNR (dB)": psnr_exact,
            "s": 0.0,
        }
    ]
    for steps in args.steps:
        for eta in args.etas:
            sampler = MMPS(
                steps=steps,
                cg_iter=args.cg_iter,
                solver="dpmpp_2m",
                eta=eta,
                sigma_data=est.sigma_data_,
            )
            prior = DiffusionPrior(gaussian, sampler, gaussian)
            start = time.perf_counter()
            generator = torch.Generator().manual_seed(args.seed + 2)
            samples = prior.sample_posterior(Y_rows, op_rows, args.draws, generator)
            seconds = time.perf_counter() - start
            v, se, psnr = spread_and_psnr(samples.astype(np.float64), truth, missing)
            table.append(
                {
                    "sampler": f"MMPS (cg {args.cg_iter})",
                    "steps": steps,
                    "eta": eta,
                    "variance / exact": v / v_exact,
                    "± se": se / v_exact,
                    "PSNR (dB)": psnr,
                    "s": seconds,
                }
            )
            print(table[-1], flush=True)
    lines = [
        "# E-step calibration: MMPS posterior spread on the digits with an exact denoiser",
        "",
        *machine_header(torch.device("cpu")),
        f"- wall time: {time.perf_counter() - tic:.0f} s",
        "- problem: `digits.py`'s (scikit-learn digits on [-1, 1], 75% of pixels missing, "
        "noise std 0.05); prior: the Gaussian (PPCA) fitted by closed-form EM to the "
        f"corrupted training images (EM's start), exact; {args.rows} training observations, "
        f"{args.draws} posterior samples each",
        "- samplers: MMPS with the Gaussian's exact denoiser, DPM-Solver++(2M), "
        f"cg_iter {args.cg_iter}; `variance / exact`: mean posterior variance on the missing "
        "pixels relative to the exact posterior's (± its standard error over the "
        "observations); PSNR: posterior mean on the missing pixels, the Monte Carlo error of "
        "the mean removed",
        "",
        format_table(table, floatfmt=".3f"),
        "",
    ]
    publish(lines, Path(args.out) if args.out else None)


if __name__ == "__main__":
    main()
