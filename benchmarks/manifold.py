r"""Benchmark: the low-dimensional manifold experiment of Rozet et al. (2024, section 5.1).

Latents on a random smooth 1-D curve in :math:`\mathbb{R}^D` (``--n-features``, 5 in the paper),
each observed through its own random ``M x D`` projection (``--n-measurements``, 2; rows on the
unit sphere) with noise 0.01. In one run:

* ``DiffusionPriorEM`` with the estimator's recipe (its defaults, except the MLP's size, the
  M-step's epochs, ``n_iter`` and the options below), with the Sinkhorn divergence between
  prior samples and held-out true latents and the evidence estimate after every EM iteration
  (iteration 0 is the analytic initialisation);
* the extreme-deconvolution Gaussian mixture (``fit_gaussian_mixture``, 16 components);
* the ceiling: the same pipeline on the clean latents: the same analytic initialisation fitted
  to them (observed directly, noise 0.01), the same denoiser (refining it when the recipe
  does), trained for the same total number of optimizer steps as all the M-steps together,
  sampled with the estimator's sampling path;
* the exact log-evidence of the observations under the true curve (a fine grid of its
  parameter), the reference for the evidence estimates.

The final priors are compared on ``--eval-repeats`` independent pairs of ``--n-eval`` prior
samples and fresh true latents (mean and standard error); the floor is the same statistic
between two sets of true latents. ``--ablate`` switches one recipe element off.

Writes ``manifold{tag}.md`` (tables, command, date, machine), ``manifold{tag}_pairs.png``,
``manifold{tag}_sinkhorn.png`` and ``manifold{tag}_evidence.png`` to ``--out``::

    python benchmarks/manifold.py                                   # the recorded CPU run
    python benchmarks/manifold.py --n-features 8 --n-measurements 3 --manifold-seed 1 --tag _d8
    python benchmarks/manifold.py --ablate smc --tag _no_smc         # one element off
"""

from __future__ import annotations

import argparse
import math
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
from diffem.metrics import sinkhorn_divergence, wasserstein

ABLATIONS = {
    "none": "the recipe",
    "smc": "E-step: MMPS (default_sampler) instead of SMC",
    "init": "Gaussian initialisation instead of the 16-component mixture",
    "refine": "plain network instead of refining the initialisation's denoiser",
    "samples": "one posterior sample per observation instead of 4",
    "warmup": "the accurate E-step from the first iteration (no cheap warm-up)",
    "ema": "no EMA of the weights",
    "reset": "a fresh optimizer per M-step",
}


def _sinkhorn(samples: np.ndarray, truth: np.ndarray) -> float:
    return sinkhorn_divergence(_finite(samples), truth, reg=0.05)


def _se(values: list[float]) -> float:
    """Standard error of the mean of ``values`` (0 for one value)."""
    n = len(values)
    return float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else 0.0


def _w2_squared(samples: np.ndarray, truth: np.ndarray) -> float:
    """The exact squared 2-Wasserstein distance (the converged cross-check of the fixed-budget
    Sinkhorn score)."""
    return wasserstein(_finite(samples), truth) ** 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n-samples", type=int, default=4096, help="observations")
    p.add_argument("--n-features", type=int, default=5, help="D, the latent dimension")
    p.add_argument("--n-measurements", type=int, default=2, help="M, rows of each projection")
    p.add_argument("--manifold-seed", type=int, default=None, help="seed of the curve alone")
    p.add_argument("--noise-std", type=float, default=0.01)
    p.add_argument("--n-iter", type=int, default=8, help="EM iterations")
    p.add_argument("--init-components", type=int, default=16)
    p.add_argument("--hidden", type=int, default=128, help="MLP width")
    p.add_argument("--blocks", type=int, default=3, help="MLP residual blocks")
    p.add_argument("--epochs", type=int, default=4, help="epochs per M-step")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=None, help="default: the recipe's")
    p.add_argument(
        "--sigma-distribution",
        choices=["log_uniform", "log_normal"],
        default=None,
        help="training noise levels (default: the recipe's)",
    )
    p.add_argument("--e-step-samples", type=int, default=4)
    p.add_argument("--warmup-iter", type=int, default=6)
    p.add_argument("--ablate", choices=sorted(ABLATIONS), default="none")
    p.add_argument(
        "--ceiling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train the clean-latent ceiling (--no-ceiling: EM and the mixture only)",
    )
    p.add_argument("--figures", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--mixture-components", type=int, default=16)
    p.add_argument("--mixture-iter", type=int, default=100)
    p.add_argument("--n-eval", type=int, default=2048, help="samples per Sinkhorn divergence")
    p.add_argument(
        "--eval-repeats",
        type=int,
        default=32,
        help="pairs of sets for final priors (per-set values are heavy-tailed: see the docs)",
    )
    p.add_argument(
        "--iteration-repeats",
        type=int,
        default=4,
        help="sets averaged by the per-iteration Sinkhorn divergence (at most --eval-repeats)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--tag", default="", help="suffix of the output files")
    p.add_argument("--verbose", type=int, default=1)
    return p.parse_args(argv)


def make_estimator(args: argparse.Namespace, device: str) -> Any:
    """``DiffusionPriorEM`` with the recipe, the benchmark's sizes and one element off."""
    from diffem import DiffusionPriorEM
    from diffem.em import default_sampler, recipe_denoiser

    denoiser = recipe_denoiser().set_params(
        lr=args.lr,
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        module__hidden_features=args.hidden,
        module__n_blocks=args.blocks,
        random_state=args.seed,
    )
    if args.ema_decay is not None:
        denoiser.set_params(ema_decay=args.ema_decay)
    if args.sigma_distribution is not None:
        denoiser.set_params(sigma_distribution=args.sigma_distribution)
    params: dict[str, Any] = dict(
        denoiser=denoiser,
        n_iter=args.n_iter,
        init_components=args.init_components,
        e_step_samples=args.e_step_samples,
        warmup_iter=args.warmup_iter,
        tol=None,  # the benchmark runs every iteration
        device=device,
        random_state=args.seed,
        verbose=args.verbose,
    )
    ablate = args.ablate
    if ablate == "smc":
        params["sampler"] = default_sampler()
    elif ablate == "init":
        params["init_components"] = 1
    elif ablate == "refine":
        params["refine_init"] = False
    elif ablate == "samples":
        params["e_step_samples"] = 1
    elif ablate == "warmup":
        params["warmup_iter"] = 0
    elif ablate == "ema":
        denoiser.set_params(ema_decay=None)
    elif ablate == "reset":
        params["reset_optimizer"] = True
    return DiffusionPriorEM(**params)


def curve_seed(args: argparse.Namespace) -> int:
    """The seed of the curve: ``--manifold-seed``, else ``--seed``."""
    return args.seed if args.manifold_seed is None else args.manifold_seed


def curve_grid(args: argparse.Namespace, points: int = 65537) -> np.ndarray:
    """The data's curve at ``points`` evenly spaced parameters in [0, 1], in the latents'
    coordinates (the same draws and scaling as ``make_manifold``'s), ``(points, D)``."""
    from diffem.datasets.manifold import smooth_curve

    rng = np.random.RandomState(curve_seed(args))
    grid = smooth_curve(np.linspace(0.0, 1.0, 8193), args.n_features, rng)
    lo, hi = grid.min(axis=0), grid.max(axis=0)
    rng = np.random.RandomState(curve_seed(args))
    fine = smooth_curve(np.linspace(0.0, 1.0, points), args.n_features, rng)
    return np.clip((fine - lo) * (4.0 / np.maximum(hi - lo, 1e-12)) - 2.0, -2.0, 2.0)


def true_log_evidence(Y: np.ndarray, operator: Any, curve: np.ndarray, noise: float) -> np.ndarray:
    r""":math:`\log p(y_i) = \log \int N(y_i; A_i \gamma(t), \sigma^2 I)\,dt` on a fine grid of
    the curve parameter (the exact evidence under the true prior), ``(n,)``."""
    A = operator.matrix().double().numpy()
    m = A.shape[1]
    out = []
    for start in range(0, len(Y), 64):
        mean = np.einsum("nmd,gd->ngm", A[start : start + 64], curve)
        sq = ((np.asarray(Y[start : start + 64], np.float64)[:, None] - mean) ** 2).sum(-1)
        log_lik = -0.5 * sq / noise**2 - 0.5 * m * math.log(2 * math.pi * noise**2)
        top = log_lik.max(1, keepdims=True)
        out.append(top[:, 0] + np.log(np.exp(log_lik - top).mean(1)))
    return np.concatenate(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from diffem.datasets import make_manifold
    from diffem.operators import Identity
    from diffem.plotting import metric_curves, pair_grid, save_figure
    from diffem.priors import fit_gaussian_mixture

    t_all, cpu_all = time.perf_counter(), time.process_time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = str(resolve_device(args.device))
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    n, n_eval, repeats = args.n_samples, args.n_eval, args.eval_repeats
    data = make_manifold(
        n + (repeats + 1) * n_eval,
        n_features=args.n_features,
        n_measurements=args.n_measurements,
        noise_std=args.noise_std,
        random_state=args.seed,
        manifold_random_state=args.manifold_seed,
    )
    latents = np.asarray(data.X, dtype=np.float64)
    truths = [latents[n + r * n_eval : n + (r + 1) * n_eval] for r in range(repeats + 1)]
    idx = np.arange(n)
    X, Y, operator = latents[:n], np.asarray(data.Y)[:n], data.operator[idx]
    fine = curve_grid(args)

    def log(msg: str) -> None:
        if args.verbose:
            print(msg, flush=True)

    def final(sample: Any) -> dict[str, float]:
        """Mean and standard error over the repeats of the Sinkhorn divergence and of the
        exact squared 2-Wasserstein distance, on the same sets."""
        sets = [np.asarray(sample(r), dtype=np.float64) for r in range(repeats)]
        out = {}
        for name, metric in (("Sinkhorn", _sinkhorn), ("W2²", _w2_squared)):
            values = [metric(x, truths[r]) for r, x in enumerate(sets)]
            out.update({name: float(np.mean(values)), f"{name} ± se": _se(values)})
            out[f"{name} median"] = float(np.median(values))
            out[f"{name} values"] = values
        return out

    floor = final(lambda r: truths[r + 1])
    log(f"floor (two sets of true latents): {floor}")
    results: dict[str, dict[str, float]] = {}
    snapshots: dict[str, np.ndarray] = {}

    # ---- mixture baseline (extreme deconvolution)
    t0 = time.perf_counter()
    mixture = fit_gaussian_mixture(
        Y, operator, args.mixture_components, n_iter=args.mixture_iter, random_state=args.seed
    )
    mix_seconds = time.perf_counter() - t0
    mix_name = f"Gaussian mixture, {args.mixture_components} comp. (XD)"
    results[mix_name] = {
        **final(lambda r: np.asarray(mixture.sample(n_eval, generator=args.seed + 1 + r))),
        "seconds": mix_seconds,
    }
    snapshots[f"mixture ({args.mixture_components})"] = np.asarray(
        mixture.sample(n_eval, generator=args.seed + 1)
    )
    log(f"mixture: {results[mix_name]}")

    # ---- EM
    est = make_estimator(args, device)
    plotted = set(powers_of_two(args.n_iter))
    rows: list[dict[str, Any]] = []

    per_iteration = max(1, min(args.iteration_repeats, repeats))

    def on_iteration(k: int, estimator: Any, record: Any) -> None:
        sets = [
            np.asarray(estimator.sample(n_eval, random_state=args.seed + 100 + k + 7919 * r))
            for r in range(per_iteration)
        ]
        samples = sets[0]
        row = {
            "iteration": k,
            **record_summary(record),
            "Sinkhorn": float(np.mean([_sinkhorn(x, truths[r]) for r, x in enumerate(sets)])),
        }
        rows.append(row)
        log(
            f"EM iteration {k}: "
            + ", ".join(f"{c} {v:.4g}" for c, v in row.items() if c != "iteration")
        )
        if k == 0:
            snapshots["initialisation"] = samples
        elif k in plotted:
            snapshots[f"EM {k}"] = samples

    t0, c0 = time.perf_counter(), time.process_time()
    fit_tracked(est, Y, operator, on_iteration)
    em_seconds, em_cpu = time.perf_counter() - t0, time.process_time() - c0
    steps = int(sum(r["n_steps"] for r in est.history_))
    results["initialisation (iteration 0)"] = {
        "Sinkhorn": rows[0]["Sinkhorn"],
        "seconds": math.nan,
    }
    em_name = f"DiffusionPriorEM (iteration {est.best_iteration_} of {args.n_iter}, kept)"
    results[em_name] = {
        **final(lambda r: est.sample(n_eval, random_state=args.seed + 1000 + r)),
        "seconds": em_seconds,
    }
    log(f"EM: {results[em_name]}")

    # ---- ceiling: the same pipeline on the clean latents, the same optimizer steps
    if args.ceiling:
        t0 = time.perf_counter()
        clean_op = Identity(args.n_features, noise_std=args.noise_std)
        clean = make_estimator(args, device).set_params(n_iter=0, verbose=0).fit(X, clean_op)
        net = make_estimator(args, device).denoiser
        net.set_params(
            max_epochs=max(1, math.ceil(steps / math.ceil(n / args.batch_size))),
            sigma_data=float(est.sigma_data_),
            device=device,
        )
        if est.refine_init and args.ablate != "refine":
            net.set_params(base=clean.init_prior_)
        net.fit(torch.as_tensor(X, dtype=torch.float32))
        saved = est.denoiser_
        try:
            est.denoiser_ = net
            ceiling = {**final(lambda r: est.sample(n_eval, random_state=args.seed + 2000 + r))}
            snapshots["clean-trained"] = est.sample(n_eval, random_state=args.seed + 2000)
        finally:
            est.denoiser_ = saved
        results["ceiling: same pipeline on clean latents"] = {
            **ceiling,
            "seconds": time.perf_counter() - t0,
        }
        log(f"ceiling: {results['ceiling: same pipeline on clean latents']}")
    snapshots["true latents"] = truths[0]

    # ---- evidence references
    exact_true = float(true_log_evidence(Y, operator, fine, args.noise_std).mean())
    exact_mixture = float(np.mean(mixture.log_evidence(Y, operator)))

    # ---- figures
    tag = args.tag
    ceiling_name = "ceiling: same pipeline on clean latents"
    figs: dict[str, Path] = {}
    its = [r["iteration"] for r in rows]
    if args.figures:
        figs["pairs"] = save_figure(
            pair_grid(snapshots, title="Manifold: prior samples along EM, baselines, truth"),
            out / f"manifold{tag}_pairs.png",
        )
        baselines = {mix_name: results[mix_name]["Sinkhorn"]}
        if ceiling_name in results:
            baselines["ceiling"] = results[ceiling_name]["Sinkhorn"]
        baselines["two sets of true latents"] = floor["Sinkhorn"]
        figs["sinkhorn"] = save_figure(
            metric_curves(
                its,
                {"DiffusionPriorEM": [r["Sinkhorn"] for r in rows]},
                baselines=baselines,
                ylabel="Sinkhorn divergence to true latents",
                title="Manifold: Sinkhorn divergence vs EM iteration (0 = initialisation)",
            ),
            out / f"manifold{tag}_sinkhorn.png",
        )
        figs["evidence"] = save_figure(
            metric_curves(
                its,
                {"evidence estimate (SMC)": [r["log evidence"] for r in rows]},
                errors={"evidence estimate (SMC)": [2 * r["± se"] for r in rows]},
                baselines={
                    "true prior (exact)": exact_true,
                    f"{mix_name} (exact)": exact_mixture,
                },
                ylabel="mean log-evidence (nats / observation)",
                title="Evidence estimate along EM (error bars: 2 standard errors)",
                logy=False,
            ),
            out / f"manifold{tag}_evidence.png",
        )

    # ---- criteria, with paired differences (the same true latents for every prior)
    second = [r["Sinkhorn"] for r in rows[1 + len(rows) // 2 :]]
    best = min(r["Sinkhorn"] for r in rows[1:])
    # two standard deviations of the difference of two per-iteration values (each the mean of
    # per_iteration sets; one set's standard deviation from the floor's repeats)
    spread = (
        2 * math.sqrt(2.0 / per_iteration) * max(floor["Sinkhorn ± se"] * math.sqrt(repeats), 1e-12)
    )
    paired: dict[str, dict[str, float]] = {}
    crit: dict[str, bool] = {}
    for metric in ("Sinkhorn", "W2²"):
        em_v = np.asarray(results[em_name][f"{metric} values"])
        mix_v = np.asarray(results[mix_name][f"{metric} values"])
        paired[f"EM - mixture ({metric})"] = {
            "mean": float(np.mean(em_v - mix_v)),
            "se": _se(list(em_v - mix_v)),
        }
        if ceiling_name in results:
            ceil_v = np.asarray(results[ceiling_name][f"{metric} values"])
            paired[f"EM - 1.5 x ceiling ({metric})"] = {
                "mean": float(np.mean(em_v - 1.5 * ceil_v)),
                "se": _se(list(em_v - 1.5 * ceil_v)),
            }
            paired[f"ceiling - mixture ({metric})"] = {
                "mean": float(np.mean(ceil_v - mix_v)),
                "se": _se(list(ceil_v - mix_v)),
            }
            crit[f"EM <= 1.5 x ceiling ({metric})"] = bool(em_v.mean() <= 1.5 * ceil_v.mean())
        crit[f"EM < mixture ({metric})"] = bool(em_v.mean() < mix_v.mean())
    crit["last half of the iterations within 2 sd of the best"] = max(second) <= best + spread
    crit["evidence changes >= -2 se at every iteration"] = all(
        r["evidence change"] >= -2 * r["change se"] for r in rows[1:]
    )
    rows_paired = [{"difference": k, **v} for k, v in paired.items()]
    total, cpu = time.perf_counter() - t_all, time.process_time() - cpu_all
    write_report(
        out / f"manifold{tag}.md",
        args,
        results,
        rows,
        crit,
        floor,
        figs,
        (total, cpu, em_cpu),
        device,
        steps,
        {"true prior (exact)": exact_true, "mixture (exact)": exact_mixture},
        rows_paired,
    )
    log(f"total {total:.0f} s (CPU {cpu:.0f} s); criteria: {crit}")
    return {
        "results": results,
        "rows": rows,
        "criteria": crit,
        "floor": floor,
        "paired": paired,
        "em_name": em_name,
        "mix_name": mix_name,
        "best_iteration": int(est.best_iteration_),
        "evidence": {"true prior (exact)": exact_true, "mixture (exact)": exact_mixture},
        "steps": steps,
        "em_cpu": em_cpu,
    }


def write_report(
    path: Path,
    args: argparse.Namespace,
    results: dict[str, dict[str, float]],
    rows: list[dict[str, Any]],
    crit: dict[str, bool],
    floor: dict[str, float],
    figs: dict[str, Path],
    times: tuple[float, float, float],
    device: str,
    steps: int,
    evidence: dict[str, float],
    paired: list[dict[str, Any]],
) -> None:
    total, cpu, em_cpu = times
    net_params = make_estimator(args, device).denoiser.get_params(deep=False)
    summary = [{"prior": k, **v} for k, v in results.items()]
    lines = [
        f"# Manifold benchmark (Rozet et al. 2024, section 5.1): D = {args.n_features}, "
        f"M = {args.n_measurements}"
        + (f", ablation: {ABLATIONS[args.ablate]}" if args.ablate != "none" else ""),
        "",
        *machine_header(torch.device(device)),
        f"- wall time: {total:.0f} s; CPU time of the process: {cpu:.0f} s (EM {em_cpu:.0f} s; "
        "one torch thread, so the CPU time is the wall time on an idle core)",
        f"- data: {args.n_samples} observations y = A x + e, A {args.n_measurements}x"
        f"{args.n_features} random projections (rows on the unit sphere), noise std "
        f"{args.noise_std}; curve seed {curve_seed(args)}",
        f"- EM: the recipe (`DiffusionPriorEM` defaults) with an MLP of width {args.hidden} and "
        f"{args.blocks} blocks, {args.epochs} epochs per M-step over the {args.e_step_samples} "
        f"posterior samples per observation (batch {args.batch_size}, lr {args.lr}), "
        f"{args.init_components}-component initialisation, {args.warmup_iter} warm-up "
        f"iterations, {args.n_iter} iterations; {steps} optimizer steps in all; denoiser "
        f"ema_decay {net_params['ema_decay']}, sigma_distribution "
        f"{net_params['sigma_distribution']}",
        f"- ceiling: the same pipeline on the clean latents, {steps} optimizer steps"
        + ("" if args.ceiling else " (not run: --no-ceiling)"),
        "- prior samples (EM, ceiling): the probability-flow ODE with the E-step sampler's "
        "steps and solver (`DiffusionPrior.sample`)",
        f"- final priors: Sinkhorn divergence (reg 0.05, the fixed-budget solver) and exact "
        f"squared 2-Wasserstein distance (`diffem.metrics.wasserstein`, POT's network simplex) "
        f"of {args.n_eval} prior samples to {args.n_eval} fresh true latents, mean ± standard "
        f"error over {args.eval_repeats} pairs; floor (two sets of true latents): Sinkhorn "
        f"{floor['Sinkhorn']:.4f} ± {floor['Sinkhorn ± se']:.4f} (per set "
        f"{min(floor['Sinkhorn values']):.4f} to {max(floor['Sinkhorn values']):.4f}), W2² "
        f"{floor['W2²']:.4f} ± {floor['W2² ± se']:.4f}",
        "",
        "## Final priors",
        "",
        format_table(
            summary,
            ["prior", "Sinkhorn", "Sinkhorn ± se", "Sinkhorn median", "W2²", "W2² ± se", "seconds"],
        ),
        "",
        "## Criteria",
        "",
        *[f"- {k}: **{'yes' if v else 'no'}**" for k, v in crit.items()],
        "",
        "Paired differences over the repeats (each prior against the same true latents), "
        "mean ± standard error: a difference is resolved when it exceeds two standard errors.",
        "",
        format_table(paired, ["difference", "mean", "se"]),
        "",
        "## Per EM iteration",
        "",
        "Evidence: the mean over 128 fixed observations of the SMC estimate of "
        "log q(y_i) (32 steps, 64 particles), with its standard error, and its change from the "
        "previous iteration on the same observations. Exact mean log-evidence of all the "
        "observations: "
        + ", ".join(f"{k} {v:.3f}" for k, v in evidence.items())
        + ". The Sinkhorn divergence here is the mean over "
        + f"{max(1, min(args.iteration_repeats, args.eval_repeats))} set(s) of prior samples "
        "(noisier than the table above); 'within 2 sd of the best' allows two standard "
        "deviations of the difference of two such means (from the floor's spread).",
        "",
        format_table(rows),
        "",
        "## Figures",
        "",
        *[f"![{k}]({p.name})" for k, p in figs.items()],
        "",
    ]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
