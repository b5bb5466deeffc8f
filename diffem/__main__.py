"""Command line: ``python -m diffem demo [--out DIR] [--quick] ...`` (also ``diffem demo``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffem",
        description="Learn diffusion priors from corrupted observations by expectation-"
        "maximisation (Rozet et al., NeurIPS 2024).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="the paper's low-dimensional manifold experiment, end to end",
        description="Fit DiffusionPriorEM on random 2x5 projections of points on a 1-D curve "
        "in R^5, print a per-iteration table (the evidence estimate EM increases, its "
        "standard error and change, train loss, E/M-step seconds, sliced Wasserstein and "
        "Sinkhorn divergence of prior samples to the true latents) and write figures. The "
        "default size runs in about 5 minutes on 2 CPU cores.",
    )
    demo.add_argument("--out", default="demo_output", help="output folder (default: %(default)s)")
    demo.add_argument("--quick", action="store_true", help="tiny run (< 1 minute), for testing")
    demo.add_argument("--n-samples", type=int, default=None, help="number of observations")
    demo.add_argument("--n-iter", type=int, default=None, help="number of EM iterations")
    demo.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default: %(default)s; the demo's small networks "
        "run fastest single-threaded, and this avoids oversubscribing a shared "
        "machine; 0 keeps torch's default)",
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bars nor table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m diffem`` and of the ``diffem`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command != "demo":
        parser.print_help()
        return 0 if args.command is None else 2
    from diffem.demo import run_demo

    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    run_demo(
        args.out,
        quick=args.quick,
        n_samples=args.n_samples,
        n_iter=args.n_iter,
        device=args.device,
        random_state=args.seed,
        verbose=0 if args.quiet else 1,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
