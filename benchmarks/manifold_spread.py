r"""What the manifold benchmark's per-set divergences measure: spread, off-curve samples, solver.

On the data of ``manifold.py`` (same options), with its clean-trained ceiling (the
initialisation fitted to the clean latents, refined by the benchmark's MLP for ``--steps``
optimizer steps):

* **spread**: the Sinkhorn divergence of ``--pairs`` independent pairs of sets of 2048 prior
  samples and 2048 fresh true latents, for two sets of true latents (the floor), the
  extreme-deconvolution mixture fitted to the projections, the clean-fitted mixture (exact
  samples) and the ceiling (probability-flow ODE): mean, standard error, median, range;
* **off-curve samples**: per prior, the samples farther than 0.1 from the curve per set, the
  farthest one, and the mean divergence once they are removed;
* **solver**: the squared 2-Wasserstein distance between the arc-length positions of
  16384 samples (nearest point of the curve) and the true latents' (uniform parameter), which
  resolves how mass is spread along the curve; the clean mixture through the same ODE as the
  network (an exact denoiser) isolates the solver from the network;
* **what the network learns**: the held-out denoising error of the ceiling and of the mixture
  it refines, per noise level.

Writes ``manifold_spread{tag}.md`` to ``--out``::

    python benchmarks/manifold_spread.py
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
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import manifold
from _common import machine_header, publish

from diffem._report import format_table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--pairs", type=int, default=24, help="pairs of sets of the spread table")
    p.add_argument("--steps", type=int, default=2048, help="optimizer steps of the ceiling")
    p.add_argument("--n-curve", type=int, default=16384, help="samples of the solver table")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--tag", default="")
    opts, passed = p.parse_known_args(argv)
    opts.bench = manifold.parse_args([*passed, "--verbose", "0"])
    return opts


def _stats(values: list[float]) -> dict[str, float]:
    v = np.asarray(values)
    return {
        "mean": float(v.mean()),
        "± se": manifold._se(list(v)),
        "median": float(np.median(v)),
        "min": float(v.min()),
        "max": float(v.max()),
    }


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    args = opts.bench
    from diffem.datasets import make_manifold
    from diffem.operators import Identity
    from diffem.priors import fit_gaussian_mixture
    from diffem.samplers import Unconditional

    torch.set_num_threads(max(args.threads, 1))
    t_all = time.perf_counter()
    n, d, seed = args.n_samples, args.n_features, args.seed
    data = make_manifold(
        n,
        n_features=d,
        n_measurements=args.n_measurements,
        noise_std=args.noise_std,
        random_state=seed,
        manifold_random_state=args.manifold_seed,
    )
    X, Y, operator = np.asarray(data.X, np.float64), np.asarray(data.Y), data.operator

    def truth(n_eval: int, key: int) -> np.ndarray:
        fresh = make_manifold(
            n_eval,
            n_features=d,
            n_measurements=args.n_measurements,
            random_state=10_000 + key,
            manifold_random_state=manifold.curve_seed(args),
        )
        return np.asarray(fresh.X, np.float64)

    curve = manifold.curve_grid(args)
    tree = cKDTree(curve)
    arclen = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(curve, axis=0), axis=1))])

    # ---- the priors: mixture on the projections, clean mixture, clean-trained ceiling
    xd = fit_gaussian_mixture(
        Y, operator, args.mixture_components, n_iter=args.mixture_iter, random_state=seed
    )
    clean = (
        manifold.make_estimator(args, "cpu")
        .set_params(n_iter=0, verbose=0)
        .fit(X, Identity(d, noise_std=args.noise_std))
    )
    base = clean.init_prior_
    net = manifold.make_estimator(args, "cpu").denoiser
    net.set_params(
        max_epochs=max(1, math.ceil(opts.steps / math.ceil(n / args.batch_size))),
        sigma_data=float(clean.sigma_data_),
        device="cpu",
        base=base,
    )
    net.fit(torch.as_tensor(X, dtype=torch.float32))
    clean.denoiser_ = net  # the ceiling, sampled with the estimator's path

    priors: dict[str, Any] = {
        "two sets of true latents (floor)": lambda r: truth(args.n_eval, 1000 + r),
        "XD mixture on the projections": lambda r: xd.sample(args.n_eval, generator=100 + r),
        "clean mixture (exact samples)": lambda r: base.sample(args.n_eval, generator=100 + r),
        "ceiling (clean-trained network, ODE)": lambda r: clean.sample(
            args.n_eval, random_state=100 + r
        ),
    }
    truths = [truth(args.n_eval, r) for r in range(opts.pairs)]
    spread, off, values = [], [], {}
    for name, draw in priors.items():
        sink, kept, far, farthest = [], [], [], []
        for r in range(opts.pairs):
            x = np.asarray(draw(r), np.float64)
            dist = tree.query(x)[0]
            near = dist <= 0.1
            sink.append(manifold._sinkhorn(x, truths[r]))
            kept.append(manifold._sinkhorn(x[near], truths[r][: int(near.sum())]))
            far.append(int((~near).sum()))
            farthest.append(float(dist.max()))
        values[name] = np.asarray(sink)
        spread.append(
            {"prior": name, **_stats(sink), "sets > 0.05": int(np.sum(values[name] > 0.05))}
        )
        off.append(
            {
                "prior": name,
                "samples > 0.1 from the curve (mean per set)": float(np.mean(far)),
                "farthest": float(np.max(farthest)),
                "Sinkhorn": float(np.mean(sink)),
                "Sinkhorn without them": float(np.mean(kept)),
            }
        )
    floor_name, xd_name, _, ceiling_name = list(priors)
    paired = []
    for a, b in ((ceiling_name, xd_name), (xd_name, floor_name), (ceiling_name, floor_name)):
        diff = list(values[a] - values[b])
        paired.append(
            {"difference": f"{a} - {b}", "mean": float(np.mean(diff)), "se": manifold._se(diff)}
        )

    # ---- how mass is spread along the curve, and the solver
    m = opts.n_curve
    exact = arclen[np.round((np.arange(m) + 0.5) / m * (len(curve) - 1)).astype(int)]

    def along(x: Any) -> float:
        s = np.sort(arclen[tree.query(np.asarray(x, np.float64))[1]])
        return float(np.mean((s - exact) ** 2))

    def ode(denoiser: Any, steps: int, solver: str) -> np.ndarray:
        sampler = Unconditional(
            steps=steps, eta=0.0, solver=solver, sigma_min=1e-3, sigma_max=100.0
        )
        g = torch.Generator().manual_seed(7)
        return sampler.sample(denoiser, m, d, g, dtype=torch.float32).double().numpy()

    solver_rows = [
        {"samples": "true latents", "W2² along the curve": along(truth(m, 99))},
        {
            "samples": "clean mixture, exact",
            "W2² along the curve": along(base.sample(m, generator=5)),
        },
    ]
    for label, den in (("clean mixture", base), ("ceiling network", net)):
        for steps, solver in ((32, "dpmpp_2m"), (256, "dpmpp_2m"), (64, "heun")):
            solver_rows.append(
                {
                    "samples": f"{label}, ODE {solver} {steps} steps",
                    "W2² along the curve": along(ode(den, steps, solver)),
                }
            )

    # ---- what the network adds to its base: held-out denoising error per noise level
    held = torch.as_tensor(np.concatenate(truths[:8]), dtype=torch.float32)
    z = torch.randn(held.shape, generator=torch.Generator().manual_seed(0))
    learned = []
    for sigma in (0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0):
        x_t, s = held + sigma * z, torch.full((len(held),), sigma)
        with torch.no_grad():
            d0 = base(x_t.double(), s.double()).float()
            d1 = net(x_t, s)
        e0, e1 = ((d0 - held) ** 2).sum(1), ((d1 - held) ** 2).sum(1)
        learned.append(
            {
                "sigma": sigma,
                "error of the base": float(e0.mean()),
                "network - base": float((e1 - e0).mean()),
                "± se": manifold._se(list((e1 - e0).numpy())),
                "rms |D_net - D_base|": float(((d1 - d0) ** 2).sum(1).mean().sqrt()),
            }
        )

    lines = [
        f"# Manifold benchmark: what its per-set divergences measure (D = {d}, M = "
        f"{args.n_measurements})",
        "",
        *machine_header(torch.device("cpu")),
        f"- wall time: {time.perf_counter() - t_all:.0f} s",
        f"- ceiling: the initialisation fitted to the {n} clean latents, refined by the "
        f"benchmark's MLP ({args.hidden} x {args.blocks}) for {opts.steps} optimizer steps",
        "",
        f"## Spread: Sinkhorn divergence of {opts.pairs} independent pairs of {args.n_eval} "
        "samples and fresh true latents",
        "",
        format_table(spread, ["prior", "mean", "± se", "median", "min", "max", "sets > 0.05"]),
        "",
        format_table(paired, ["difference", "mean", "se"]),
        "",
        "## Samples far from the curve",
        "",
        format_table(off),
        "",
        f"## Mass along the curve: W2² of the arc-length positions of {m} samples",
        "",
        format_table(solver_rows, ["samples", "W2² along the curve"]),
        "",
        "## What the network adds to the mixture it refines (held-out denoising error)",
        "",
        format_table(learned),
        "",
    ]
    publish(lines, Path(opts.out) / f"manifold_spread{opts.tag}.md")


if __name__ == "__main__":
    main()
