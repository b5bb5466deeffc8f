r"""Benchmark: source localisation from range measurements, the lecture notes' example end to end.

Sources :math:`x_i \in \mathbb{R}^2` from a clustered prior, each heard by its own array of three
sensors, :math:`y_{ij} = \lVert x_i - s_{ij} \rVert + e_{ij}` (:func:`diffem.datasets.
make_range_sensors`, a :class:`~diffem.operators.Nonlinear` operator). In one run:

* the prior is learned from the ranges alone with ``DiffusionPriorEM`` (MLP denoiser; E-step
  MMPS, the estimator's default sampler with 32 steps, or SMC with ``--e-step smc``, both
  linearising the operator at each step's denoiser estimate; the Gaussian initialisation by
  linearised EM), with the sliced Wasserstein distance of its samples to held-out true sources
  after every EM iteration;
* for held-out observations, the posterior of the learned prior by MMPS and by SMC is compared
  with a long random-walk Metropolis-Hastings run with the *true* prior (the notes' method):
  sliced Wasserstein distance to the Metropolis-Hastings samples, against the floor between two
  independent Metropolis-Hastings sample sets of the same size. The same samplers with the true
  prior's exact denoiser separate the sampler's error from the prior's.

Writes ``range_sensors.md`` (tables, command, date, machine), ``range_sensors_posteriors.png``
(posterior samples of each method for a few observations) and ``range_sensors_prior.png`` (the
learned prior next to the truth) to ``--out`` (names suffixed by ``--tag``). The recorded
runs (see ``results/range_sensors.md``)::

    python benchmarks/range_sensors.py
    python benchmarks/range_sensors.py --e-step smc --n-iter 48 --tag smc_estep
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
from manifold import sample_prior_with


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n-samples", type=int, default=4096, help="training observations")
    p.add_argument("--noise-std", type=float, default=0.3, help="range noise std")
    p.add_argument("--n-iter", type=int, default=32, help="EM iterations")
    p.add_argument("--gaussian-iter", type=int, default=16, help="Gaussian-init EM iterations")
    p.add_argument("--hidden", type=int, default=128, help="MLP width")
    p.add_argument("--blocks", type=int, default=3, help="MLP residual blocks")
    p.add_argument("--epochs", type=int, default=8, help="training epochs per M-step")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=32, help="E-step MMPS steps (DPM-Solver++(2M))")
    p.add_argument("--cg-iter", type=int, default=3, help="MMPS and SMC CG iterations")
    p.add_argument(
        "--e-step",
        default="mmps",
        choices=["mmps", "smc"],
        help="E-step sampler: MMPS (warm-started, --cg-iter), or SMC (--e-step-particles, one "
        "CG iteration)",
    )
    p.add_argument("--e-step-particles", type=int, default=4, help="particles of an SMC E-step")
    p.add_argument("--n-eval", type=int, default=2048, help="prior samples per evaluation")
    p.add_argument("--n-posterior", type=int, default=8, help="held-out observations")
    p.add_argument("--posterior-samples", type=int, default=512, help="samples per posterior")
    p.add_argument("--particles", type=int, default=16, help="SMC particles")
    p.add_argument("--smc-steps", type=int, default=64, help="SMC steps")
    p.add_argument("--chains", type=int, default=64, help="MH chains per sample set")
    p.add_argument("--burn-in", type=int, default=5000, help="MH burn-in steps")
    p.add_argument("--thin", type=int, default=200, help="MH steps between kept states")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--tag", default="", help="suffix of the output files")
    p.add_argument("--verbose", type=int, default=1)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from sklearn.base import clone

    from diffem import DiffusionPriorEM
    from diffem._report import fit_tracked, format_table, record_summary
    from diffem.datasets import make_range_sensors
    from diffem.datasets.range_sensors import metropolis_reference
    from diffem.denoisers import MLPDenoiser
    from diffem.metrics import sliced_wasserstein
    from diffem.samplers import MMPS, SMC

    t_all = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"_{args.tag}" if args.tag else ""
    device = resolve_device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    def log(msg: str) -> None:
        if args.verbose:
            print(msg, flush=True)

    def sliced(a: Any, b: Any) -> float:
        return sliced_wasserstein(np.asarray(a), np.asarray(b), random_state=0)

    n, n_post, S = args.n_samples, args.n_posterior, args.posterior_samples
    data = make_range_sensors(n + args.n_eval + n_post, args.noise_std, random_state=args.seed)
    X, Y, operator = data
    train = slice(0, n)
    truth = X[n : n + args.n_eval]  # held-out sources, for the prior metric
    held = slice(n + args.n_eval, n + args.n_eval + n_post)  # held-out observations
    floor_prior = sliced(X[: args.n_eval], truth)
    log(f"sliced W2 between two sets of true sources (floor): {floor_prior:.4g}")

    # ---- EM from the ranges alone
    if args.e_step == "smc":
        e_step: Any = SMC(
            steps=args.steps, particles=args.e_step_particles, cg_iter=1, solver="dpmpp_2m"
        )
    else:
        e_step = MMPS(steps=args.steps, cg_iter=args.cg_iter, solver="dpmpp_2m", warm_start=True)
    est = DiffusionPriorEM(
        denoiser=MLPDenoiser(
            lr=args.lr,
            max_epochs=args.epochs,
            batch_size=args.batch_size,
            module__hidden_features=args.hidden,
            module__n_blocks=args.blocks,
            random_state=args.seed,
        ),
        sampler=e_step,
        n_iter=args.n_iter,
        gaussian_iter=args.gaussian_iter,
        device=str(device),
        random_state=args.seed,
        verbose=args.verbose,
    )
    rows: list[dict[str, Any]] = []
    snapshots: dict[str, np.ndarray] = {}

    def on_iteration(k: int, estimator: Any, record: Any) -> None:
        samples = estimator.sample(args.n_eval, random_state=args.seed + 100 + k)
        rows.append({"iteration": k, **record_summary(record), "sliced W2": sliced(samples, truth)})
        log(f"EM iteration {k}: sliced W2 {rows[-1]['sliced W2']:.4g}")
        if k == 0:
            snapshots["Gaussian init."] = samples

    t0 = time.perf_counter()
    fit_tracked(est, Y[train], operator[train], on_iteration)
    em_seconds = time.perf_counter() - t0
    snapshots[f"EM, {args.n_iter} iterations"] = est.sample(args.n_eval, random_state=args.seed + 1)

    # ---- ceiling: the same denoiser trained on the clean sources, as many epochs in all
    t0 = time.perf_counter()
    clean = clone(est.denoiser).set_params(
        max_epochs=args.epochs * args.n_iter, sigma_data=est.sigma_data_, device=str(device)
    )
    clean.fit(torch.as_tensor(X[train], dtype=torch.float32))
    snapshots["ceiling (clean-trained)"] = sample_prior_with(
        est, clean, args.n_eval, seed=args.seed + 7
    )
    ceiling = sliced(snapshots["ceiling (clean-trained)"], truth)
    ceiling_seconds = time.perf_counter() - t0
    log(f"ceiling (clean-trained denoiser): sliced W2 {ceiling:.4g}")
    snapshots["true sources"] = truth

    # ---- posteriors of held-out observations
    y_held = torch.as_tensor(Y[held])
    op_held = operator[held]
    t0 = time.perf_counter()
    reference = metropolis_reference(
        data.prior.to(dtype=torch.float64),
        y_held.double(),
        op_held.to(torch.float64),
        chains=2 * args.chains,
        n_samples=S // args.chains,
        burn_in=args.burn_in,
        thin=args.thin,
        generator=torch.Generator().manual_seed(args.seed + 2),
    )
    mh_seconds = time.perf_counter() - t0
    chains = reference.samples.reshape(n_post, 2, args.chains, -1, 2)
    mh_a, mh_b = chains[:, 0].reshape(n_post, -1, 2), chains[:, 1].reshape(n_post, -1, 2)
    log(f"Metropolis-Hastings: {mh_seconds:.0f} s, acceptance {reference.acceptance.mean():.2f}")

    schedule = est.sampler_.get_params()
    mmps = MMPS(
        steps=args.steps,
        cg_iter=args.cg_iter,
        solver="dpmpp_2m",
        warm_start=True,
        **{k: schedule[k] for k in ("sigma_min", "sigma_max", "sigma_data")},
    )
    smc = SMC(
        steps=args.smc_steps,
        particles=args.particles,
        cg_iter=mmps.cg_iter,
        solver=mmps.solver,
        sigma_min=mmps.sigma_min,
        sigma_max=mmps.sigma_max,
        sigma_data=mmps.sigma_data,
    )
    rows_rep = torch.arange(n_post).repeat_interleave(S)
    y_rep, op_rep = y_held[rows_rep], op_held[rows_rep.numpy()]
    posteriors: dict[str, np.ndarray] = {"Metropolis-Hastings, true prior": mh_a.numpy()}
    timings: dict[str, float] = {}
    denoisers = {"learned prior": est.denoiser_, "true prior": data.prior}
    for prior_name, denoiser in denoisers.items():
        for sampler_name, sampler in (("MMPS", mmps), (f"SMC ({args.particles})", smc)):
            name = f"{sampler_name}, {prior_name}"
            t0 = time.perf_counter()
            x = clone(sampler).sample(
                denoiser,
                y_rep.to(device),
                op_rep.to(device),
                generator=torch.Generator(device).manual_seed(args.seed + 3),
            )
            timings[name] = time.perf_counter() - t0
            posteriors[name] = x.reshape(n_post, S, 2).cpu().numpy()
            log(f"{name}: {timings[name]:.0f} s")

    per_obs = []
    for i in range(n_post):
        row = {"observation": i, "MH vs MH (floor)": sliced(mh_b[i], mh_a[i])}
        for name, x in posteriors.items():
            if not name.startswith("Metropolis"):
                row[name] = sliced(x[i], mh_a[i])
        per_obs.append(row)
    columns = [c for c in per_obs[0] if c != "observation"]
    summary = [
        {
            "posterior": c,
            "mean sliced W2 to MH": float(np.mean([r[c] for r in per_obs])),
            "median": float(np.median([r[c] for r in per_obs])),
            "seconds": timings.get(c, mh_seconds if c.startswith("MH") else math.nan),
        }
        for c in columns
    ]

    # ---- figures
    figs = {
        "posteriors": _posterior_figure(
            posteriors, X[held], data.sensors[held], out / f"range_sensors{tag}_posteriors.png"
        ),
        "prior": _prior_figure(snapshots, out / f"range_sensors{tag}_prior.png"),
    }
    total = time.perf_counter() - t_all
    if args.e_step == "smc":
        e_step_text = (
            f"SMC ({args.e_step_particles} particles, {args.steps} dpmpp_2m steps, cg_iter 1)"
        )
    else:
        e_step_text = (
            f"MMPS ({args.steps} dpmpp_2m steps, cg_iter {args.cg_iter}, warm start: the "
            "estimator's default sampler with half its steps)"
        )
    lines = [
        "# Range sensors: source localisation from three noisy ranges (the lecture's example)",
        "",
        *machine_header(device),
        f"- wall time: {total:.0f} s (EM {em_seconds:.0f} s, Metropolis-Hastings "
        f"{mh_seconds:.0f} s)",
        f"- data: {n} sources from `source_prior()` (4 clusters), each heard by 3 sensors "
        f"(an array at distance 4 from the origin, spread 0.6), range noise std "
        f"{args.noise_std}; prior metric on {args.n_eval} prior samples vs as many held-out "
        "sources",
        f"- EM: MLPDenoiser (width {args.hidden}, {args.blocks} blocks), {args.epochs} epochs per "
        f"M-step, batch {args.batch_size}, lr {args.lr}; E-step {e_step_text}; Gaussian "
        f"initialisation by linearised EM, {args.gaussian_iter} iterations",
        f"- posteriors: {n_post} held-out observations, {S} samples each; MMPS as the "
        f"E-step's default; SMC {args.particles} particles, {args.smc_steps} steps, solver "
        f"{mmps.solver}, cg_iter {mmps.cg_iter}; Metropolis-Hastings with the true prior, "
        f"random-walk steps (0.05, 0.3, 1.5), {args.chains} chains per sample set started from "
        f"likelihood-resampled prior draws, burn-in {args.burn_in}, thinning {args.thin} "
        f"(acceptance {reference.acceptance.mean():.2f})",
        f"- sliced W2 between two sets of true sources (prior floor): {floor_prior:.4g}; the "
        f"same denoiser trained on the clean sources for {args.epochs * args.n_iter} epochs "
        f"(the ceiling, {ceiling_seconds:.0f} s): {ceiling:.4g}",
        "",
        "## Learned prior",
        "",
        format_table(rows, ["iteration", "train loss", "E-step s", "M-step s", "sliced W2"]),
        "",
        "## Posteriors of held-out observations",
        "",
        "Sliced W2 to the samples of Metropolis-Hastings with the true prior (set A); the floor "
        "is an independent Metropolis-Hastings set (B) of the same size.",
        "",
        format_table(summary, ["posterior", "mean sliced W2 to MH", "median", "seconds"]),
        "",
        "Per observation:",
        "",
        format_table(per_obs, ["observation", *columns]),
        "",
        "## Figures",
        "",
        *[f"![{k}]({p.name})" for k, p in figs.items()],
        "",
    ]
    (out / f"range_sensors{tag}.md").write_text("\n".join(lines))
    log(f"total {total:.0f} s")
    return {"prior": rows, "posteriors": summary, "per_observation": per_obs}


def _posterior_figure(
    posteriors: dict[str, np.ndarray], sources: np.ndarray, sensors: np.ndarray, path: Path
) -> Path:
    """One row per observation (at most 4), one column per method: posterior samples, the true
    source and the sensors."""
    import matplotlib.pyplot as plt

    from diffem.plotting import save_figure

    k = min(4, len(sources))
    names = list(posteriors)
    fig, axes = plt.subplots(k, len(names), figsize=(2.6 * len(names), 2.6 * k), squeeze=False)
    for r in range(k):
        for c, name in enumerate(names):
            ax = axes[r, c]
            x = posteriors[name][r]
            ax.scatter(x[:, 0], x[:, 1], s=3, alpha=0.4, lw=0, c="tab:blue")
            ax.scatter(*sources[r], marker="*", s=90, c="tab:red", edgecolors="k", lw=0.5)
            ax.scatter(sensors[r, :, 0], sensors[r, :, 1], marker="^", s=30, c="k")
            ax.set_xlim(-5.5, 5.5)
            ax.set_ylim(-5.5, 5.5)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=8)
            if c == 0:
                ax.set_ylabel(f"observation {r}", fontsize=8)
    fig.suptitle("Posteriors of held-out sources (star: truth, triangles: sensors)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _prior_figure(snapshots: dict[str, np.ndarray], path: Path) -> Path:
    from diffem.plotting import pair_grid, save_figure

    fig = pair_grid(snapshots, lim=(-3.5, 3.5), title="Range sensors: learned prior and truth")
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
