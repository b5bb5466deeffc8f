r"""Benchmark: the low-dimensional manifold experiment of Rozet et al. (2024, section 5.1).

Latents on a random smooth 1-D curve in :math:`\mathbb{R}^5`, observed through one random
``2 x 5`` projection each (rows on the unit sphere) with noise ``0.01``. In one run:

* ``DiffusionPriorEM`` (MLP denoiser, MMPS with ``--steps``, ``--solver``, ``--cg-iter`` and
  ``--warm-start``, by default the estimator's default sampler), with the Sinkhorn
  divergence between prior samples and held-out true latents after every EM iteration
  (iteration 0 is the Gaussian initialisation fitted by closed-form EM);
* the Gaussian-mixture extreme-deconvolution baseline (``fit_gaussian_mixture``);
* the ceiling: the same denoiser trained on the clean latents with the same total number of
  training epochs as all the M-steps together, sampled with the same sampler.

Writes ``manifold.md`` (table, command, date, machine), ``manifold_pairs.png`` (pair plots at EM
iterations 1, 2, 4, 8, ... next to the baselines and the true latents, the paper's figure) and
``manifold_sinkhorn.png`` (Sinkhorn divergence against EM iteration) to ``--out``.

CPU scale (the defaults: 16384 observations, 32 EM iterations; about an hour on 2 shared
cores, see ``results/manifold.md`` for the reduced run that was recorded)::

    python benchmarks/manifold.py

Paper scale on a GPU (65536 observations, 64 EM iterations, wider MLP)::

    python benchmarks/manifold.py --n-samples 65536 --n-iter 64 --hidden 256 --epochs 64 \
        --steps 64 --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from _common import machine_header, resolve_device

from diffem._report import fit_tracked, format_table, powers_of_two, record_summary
from diffem.demo import _finite
from diffem.metrics import sinkhorn_divergence, sliced_wasserstein


def _sinkhorn(samples: np.ndarray, truth: np.ndarray) -> float:
    return sinkhorn_divergence(_finite(samples), truth, reg=0.05)


def _sliced(samples: np.ndarray, truth: np.ndarray, seed: int) -> float:
    return sliced_wasserstein(_finite(samples), truth, random_state=seed)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n-samples", type=int, default=16384, help="observations")
    p.add_argument("--n-iter", type=int, default=32, help="EM iterations")
    p.add_argument("--gaussian-iter", type=int, default=16, help="Gaussian-init EM iterations")
    p.add_argument("--hidden", type=int, default=128, help="MLP width")
    p.add_argument("--blocks", type=int, default=3, help="MLP residual blocks")
    p.add_argument("--epochs", type=int, default=16, help="training epochs per M-step")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=64, help="MMPS / prior sampling steps")
    p.add_argument(
        "--cg-iter",
        type=int,
        default=3,
        help="MMPS conjugate-gradient iterations",
    )
    p.add_argument(
        "--solver",
        default="dpmpp_2m",
        choices=["ancestral", "heun", "dpmpp_2m"],
        help="MMPS solver, E-step and prior samples (diffem.samplers.solvers)",
    )
    p.add_argument(
        "--covariance", default="jacobian", choices=["jacobian", "gaussian", "isotropic"]
    )
    p.add_argument(
        "--warm-start",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="MMPS warm-started CG (the defaults are the estimator's default sampler)",
    )
    p.add_argument("--mixture-components", type=int, default=16)
    p.add_argument("--mixture-iter", type=int, default=200)
    p.add_argument("--n-eval", type=int, default=4096, help="samples per metric evaluation")
    p.add_argument("--noise-std", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0: torch's default); small networks run fastest "
        "single-threaded on a shared CPU",
    )
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--tag", default="", help="suffix of the output files")
    p.add_argument("--verbose", type=int, default=1)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from diffem import DiffusionPriorEM
    from diffem.datasets import make_manifold
    from diffem.denoisers import MLPDenoiser
    from diffem.plotting import metric_curves, pair_grid, save_figure
    from diffem.priors import fit_gaussian_mixture
    from diffem.samplers import MMPS

    t_all = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"_{args.tag}" if args.tag else ""
    device = str(resolve_device(args.device))
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    latents, Y, operator = make_manifold(
        args.n_samples + args.n_eval, noise_std=args.noise_std, random_state=args.seed
    )
    latents, Y = np.asarray(latents), np.asarray(Y)
    truth = latents[args.n_samples :].astype(np.float64)
    idx = np.arange(args.n_samples)
    latents, Y, operator = latents[idx], Y[idx], operator[idx]

    def log(msg: str) -> None:
        if args.verbose:
            print(msg, flush=True)

    # sampling spread of the metric: two independent sets of true latents
    floor = _sinkhorn(latents[: args.n_eval], truth)  # training latents: independent draws
    log(f"Sinkhorn divergence between two sets of true latents (floor): {floor:.4g}")

    results: dict[str, dict[str, float]] = {}
    snapshots: dict[str, np.ndarray] = {}

    # ---- mixture baseline (extreme deconvolution)
    t0 = time.perf_counter()
    mixture = fit_gaussian_mixture(
        Y, operator, args.mixture_components, n_iter=args.mixture_iter, random_state=args.seed
    )
    mix_samples = np.asarray(mixture.sample(args.n_eval, generator=args.seed + 1))
    results[f"Gaussian mixture, {args.mixture_components} comp. (XD)"] = {
        "Sinkhorn": _sinkhorn(mix_samples, truth),
        "sliced W2": _sliced(mix_samples, truth, 0),
        "seconds": time.perf_counter() - t0,
    }
    log(f"mixture: {results[next(reversed(results))]}")

    # ---- EM
    def make_denoiser(max_epochs: int) -> MLPDenoiser:
        return MLPDenoiser(
            lr=args.lr,
            max_epochs=max_epochs,
            batch_size=args.batch_size,
            module__hidden_features=args.hidden,
            module__n_blocks=args.blocks,
            random_state=args.seed,
        )

    sampler = MMPS(
        steps=args.steps,
        cg_iter=args.cg_iter,
        covariance=args.covariance,
        solver=args.solver,
        warm_start=args.warm_start,
    )
    est = DiffusionPriorEM(
        denoiser=make_denoiser(args.epochs),
        sampler=sampler,
        n_iter=args.n_iter,
        gaussian_iter=args.gaussian_iter,
        device=device,
        random_state=args.seed,
        verbose=args.verbose,
    )
    plotted = set(powers_of_two(args.n_iter))
    rows: list[dict[str, Any]] = []

    def on_iteration(k: int, estimator: Any, record: Any) -> None:
        samples = np.asarray(estimator.sample(args.n_eval, random_state=args.seed + 100 + k))
        row = {
            "iteration": k,
            **record_summary(record),
            "Sinkhorn": _sinkhorn(samples, truth),
            "sliced W2": _sliced(samples, truth, 0),
        }
        rows.append(row)
        log(
            f"EM iteration {k}: "
            + ", ".join(f"{c} {v:.4g}" for c, v in row.items() if c != "iteration")
        )
        if k == 0:
            snapshots["Gaussian init"] = samples
        elif k in plotted:
            snapshots[f"EM {k}"] = samples

    t0 = time.perf_counter()
    fit_tracked(est, Y, operator, on_iteration)
    em_seconds = time.perf_counter() - t0
    results["Gaussian initialisation"] = {
        "Sinkhorn": rows[0]["Sinkhorn"],
        "sliced W2": rows[0]["sliced W2"],
        "seconds": float("nan"),
    }
    results[f"DiffusionPriorEM ({args.n_iter} EM iterations)"] = {
        "Sinkhorn": rows[-1]["Sinkhorn"],
        "sliced W2": rows[-1]["sliced W2"],
        "seconds": em_seconds,
    }

    # ---- ceiling: same denoiser on the clean latents, same total number of epochs
    t0 = time.perf_counter()
    clean = make_denoiser(args.epochs * args.n_iter).set_params(device=device)
    clean.fit(torch.as_tensor(latents, dtype=torch.float32))
    ceil_samples = sample_prior_with(est, clean, args.n_eval, seed=args.seed + 7)
    results["ceiling: same denoiser on clean latents"] = {
        "Sinkhorn": _sinkhorn(ceil_samples, truth),
        "sliced W2": _sliced(ceil_samples, truth, 0),
        "seconds": time.perf_counter() - t0,
    }
    log(f"ceiling: {results[next(reversed(results))]}")
    snapshots[f"mixture ({args.mixture_components})"] = mix_samples
    snapshots["clean-trained"] = ceil_samples
    snapshots["true latents"] = truth

    # ---- figures
    figs = {}
    figs["pairs"] = save_figure(
        pair_grid(
            snapshots, title="Manifold: prior samples along EM iterations, baselines, true latents"
        ),
        out / f"manifold{tag}_pairs.png",
    )
    its = [r["iteration"] for r in rows]
    figs["sinkhorn"] = save_figure(
        metric_curves(
            its,
            {"DiffusionPriorEM": [r["Sinkhorn"] for r in rows]},
            baselines={
                k: v["Sinkhorn"]
                for k, v in results.items()
                if "DiffusionPriorEM" not in k and "initialisation" not in k
            }
            | {"two sets of true latents": floor},
            ylabel="Sinkhorn divergence to true latents",
            title="Manifold: Sinkhorn divergence vs EM iteration (0 = Gaussian)",
        ),
        out / f"manifold{tag}_sinkhorn.png",
    )

    # ---- criterion
    em_s = results[f"DiffusionPriorEM ({args.n_iter} EM iterations)"]["Sinkhorn"]
    ceil_s = results["ceiling: same denoiser on clean latents"]["Sinkhorn"]
    gauss_s = rows[0]["Sinkhorn"]
    mix_s = results[f"Gaussian mixture, {args.mixture_components} comp. (XD)"]["Sinkhorn"]
    crit = {
        "EM <= 1.5 x ceiling": em_s <= 1.5 * ceil_s,
        "EM < Gaussian": em_s < gauss_s,
        "EM < mixture": em_s < mix_s,
    }
    total = time.perf_counter() - t_all
    write_report(out / f"manifold{tag}.md", args, results, rows, crit, floor, figs, total, device)
    log(f"total {total:.0f} s; criteria: {crit}")
    return {"results": results, "rows": rows, "criteria": crit, "floor": floor}


def sample_prior_with(est: Any, denoiser: Any, n: int, seed: int) -> np.ndarray:
    """Prior samples from ``denoiser`` with the estimator's own prior-sampling path."""
    saved = est.denoiser_
    try:
        est.denoiser_ = denoiser
        return np.asarray(est.sample(n, random_state=seed))
    finally:
        est.denoiser_ = saved


def write_report(
    path: Path,
    args: argparse.Namespace,
    results: dict[str, dict[str, float]],
    rows: list[dict[str, Any]],
    crit: dict[str, bool],
    floor: float,
    figs: dict[str, Path],
    total: float,
    device: str,
) -> None:
    summary = [{"prior": k, **v} for k, v in results.items()]
    lines = [
        "# Manifold benchmark (Rozet et al. 2024, section 5.1)",
        "",
        *machine_header(torch.device(device)),
        f"- wall time: {total:.0f} s",
        f"- data: {args.n_samples} observations y = A x + e, A 2x5 random projections (rows on "
        f"the unit sphere), noise std {args.noise_std}; metrics on {args.n_eval} prior samples "
        "vs as many held-out true latents",
        f"- EM: MLPDenoiser (width {args.hidden}, {args.blocks} blocks), {args.epochs} epochs "
        f"per M-step, batch {args.batch_size}, lr {args.lr}; MMPS {args.steps} steps, "
        f"solver {args.solver}, cg_iter {args.cg_iter}, warm_start {args.warm_start}, "
        f"covariance {args.covariance}; "
        "Gaussian init "
        f"{args.gaussian_iter} EM iterations",
        f"- ceiling: the same denoiser trained on the clean latents for {args.epochs * args.n_iter}"
        " epochs (the total of the M-steps)",
        f"- metric floor (Sinkhorn divergence between two independent sets of true latents): "
        f"{floor:.4g}",
        "",
        "## Final priors",
        "",
        format_table(summary, ["prior", "Sinkhorn", "sliced W2", "seconds"]),
        "",
        "## Criterion",
        "",
        *[f"- {k}: **{'yes' if v else 'no'}**" for k, v in crit.items()],
        "",
        "## Per EM iteration",
        "",
        format_table(
            rows, ["iteration", "train loss", "E-step s", "M-step s", "Sinkhorn", "sliced W2"]
        ),
        "",
        "## Figures",
        "",
        *[f"![{k}]({p.name})" for k, p in figs.items()],
        "",
    ]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
