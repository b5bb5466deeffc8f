r"""E-step and M-step time per EM iteration with 1 and 2 processes (torch.distributed, gloo).

The same unchanged ``DiffusionPriorEM(...).fit(Y, operator)`` runs under
``torchrun --nproc-per-node N`` for N = 1 and 2 on the same data: with 2 processes each rank
samples the E-step of half of the observations (then an all-gather), and the M-step trains on
half of the samples per rank with half the mini-batch and averaged gradients (see
:mod:`diffem.em.distributed`), the global batch and the number of optimizer steps being those
of one process.

Definition
----------
- **Data.** ``--observations`` observations of a ``D``-dimensional Gaussian
  (:math:`C = A A^\top / D + 0.1 I`), each entry observed with probability 0.6, noise std 0.1.
- **Estimator.** The defaults (``MLPDenoiser()``, the default E-step sampler), except
  ``n_iter`` and the denoiser's ``max_epochs`` (``--n-iter``, ``--epochs``) to bound the run.
- **Timing.** Wall time of each EM iteration's E-step and M-step, from rank 0's ``history_``
  (the E-step includes the all-gather, so it waits for the slower rank), one torch thread per
  process (``OMP_NUM_THREADS=1``); the first iteration (the exact Gaussian E-step, the network's
  initialisation) is left out and the median over the others reported. The 1- and 2-process
  runs alternate ``--repeats`` times, so that a change of the machine's load hits both.

Run ``python benchmarks/distributed_em.py --help`` for the options; ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from _common import RESULTS_DIR, machine_header, markdown_table, publish

ROOT = Path(__file__).resolve().parent.parent


def worker(args: argparse.Namespace) -> None:
    """One process of the torchrun job: fit, and rank 0 writes its history."""
    import torch

    from diffem import DiffusionPriorEM
    from diffem.denoisers import MLPDenoiser
    from diffem.operators import Mask

    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    A = rng.normal(size=(args.dim, args.dim))
    cov = A @ A.T / args.dim + 0.1 * np.eye(args.dim)
    X = rng.multivariate_normal(rng.normal(size=args.dim), cov, size=args.observations)
    mask = rng.random(X.shape) < 0.6
    Y = np.where(mask, X + 0.1 * rng.normal(size=X.shape), np.nan).astype(np.float32)
    est = DiffusionPriorEM(
        MLPDenoiser(max_epochs=args.epochs), n_iter=args.n_iter, random_state=args.seed
    )
    est.fit(Y, Mask(mask, noise_std=0.1))
    if os.environ.get("RANK", "0") == "0":
        history = [
            {"e": r["e_step_seconds"], "m": r["m_step_seconds"], "loss": r["train_loss"]}
            for r in est.history_
        ]
        Path(args.worker).write_text(json.dumps(history))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n_proc: int, args: argparse.Namespace, out: Path) -> list[dict]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(n_proc),
        "--master-port",
        str(_free_port()),
        str(Path(__file__).resolve()),
        "--worker",
        str(out),
        *(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in FORWARDED),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(command, check=True, env=env)
    return json.loads(out.read_text())


FORWARDED = ("observations", "dim", "n_iter", "epochs", "seed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--observations", type=int, default=None, help="default 4000")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--n-iter", type=int, default=None, help="EM iterations (default 3)")
    parser.add_argument("--epochs", type=int, default=None, help="M-step epochs (default 16)")
    parser.add_argument("--repeats", type=int, default=None, help="alternations (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run, writes nothing")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = {"observations": 200, "n_iter": 2, "epochs": 2, "repeats": 1}
    full = {"observations": 4000, "n_iter": 3, "epochs": 16, "repeats": 2}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.out is None and not args.quick and args.worker is None:
        args.out = RESULTS_DIR / "distributed_em.md"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        worker(args)
        return
    import torch

    torch.set_num_threads(1)  # as in the workers, for the header
    start = time.perf_counter()
    times: dict[int, dict[str, list[float]]] = {n: {"e": [], "m": []} for n in (1, 2)}
    losses: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for n_proc in (1, 2):
                history = launch(n_proc, args, Path(tmp) / f"{n_proc}_{repeat}.json")
                for record in history[1:]:  # iteration 1: exact Gaussian E-step, network init
                    times[n_proc]["e"].append(record["e"])
                    times[n_proc]["m"].append(record["m"])
                losses[n_proc].append(history[-1]["loss"])
                print(f"  {n_proc} process(es), repeat {repeat}: {history}", flush=True)
    rows = []
    for n_proc in (1, 2):
        e = statistics.median(times[n_proc]["e"])
        m = statistics.median(times[n_proc]["m"])
        e1 = statistics.median(times[1]["e"])
        m1 = statistics.median(times[1]["m"])
        rows.append(
            [
                str(n_proc),
                f"{e:.1f}",
                f"{m:.1f}",
                f"{e + m:.1f}",
                f"{e1 / e:.2f}",
                f"{m1 / m:.2f}",
                f"{(e1 + m1) / (e + m):.2f}",
                f"{statistics.mean(losses[n_proc]):.4f}",
            ]
        )
    header = [
        "processes",
        "E-step s",
        "M-step s",
        "iteration s",
        "E speed-up",
        "M speed-up",
        "speed-up",
        "final train loss",
    ]
    lines = [
        "# Distributed EM: E-step and M-step time per iteration, 1 and 2 processes",
        "",
        *machine_header(torch.device("cpu")),
        f"- settings: {args.observations} observations, D = {args.dim}, "
        f"`DiffusionPriorEM(MLPDenoiser(max_epochs={args.epochs}), n_iter={args.n_iter})`, "
        "otherwise the defaults; gloo, one "
        f"torch thread per process; medians over EM iterations 2-{args.n_iter} of "
        f"{args.repeats} alternated runs each; total wall time "
        f"{time.perf_counter() - start:.0f} s",
        "",
        "Wall seconds per EM iteration on rank 0 (the E-step includes the all-gather). The "
        "final train loss is rank 0's (its half of the data with 2 processes).",
        "",
        markdown_table(header, rows),
        "",
    ]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
