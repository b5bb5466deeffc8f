r"""Ablation of the EM recipe on the manifold benchmark: each element switched off in turn.

Runs ``manifold.py`` once with the recipe and once per ``--ablate`` element (``smc``,
``init``, ``refine``, ``samples``, ``warmup``, ``ema``, ``reset``; see ``manifold.ABLATIONS``),
on the same data, seeds and evaluation sets, without the clean-trained ceiling, and collects
one table: the kept prior's Sinkhorn divergence and exact squared 2-Wasserstein distance to
held-out true latents (mean ± standard error over ``--eval-repeats`` pairs of sets), their
paired difference from the recipe's, the evidence estimate of the kept iteration, and the EM
time. Options after ``--`` go to every ``manifold.py`` run (e.g. a reduced configuration).

Writes ``manifold_ablation{tag}.md`` to ``--out``; each run's own report goes to
``--runs-out``::

    python benchmarks/manifold_ablation.py -- --n-samples 2048 --n-iter 4 --warmup-iter 2
    python benchmarks/manifold_ablation.py --tag _d8 -- --n-features 8 --n-measurements 3 \
        --manifold-seed 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import manifold
from _common import machine_header, publish, resolve_device, split_passthrough

from diffem._report import format_table


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv, passed = split_passthrough(argv)
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--ablations",
        nargs="+",
        choices=sorted(manifold.ABLATIONS),
        default=list(manifold.ABLATIONS),
        help="the runs (none: the recipe)",
    )
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--runs-out", default=None, help="each run's report (default: a temp dir)")
    p.add_argument("--tag", default="")
    return p.parse_args(argv), passed


def _paired(values: list[float], reference: list[float]) -> tuple[float, float]:
    diff = np.asarray(values) - np.asarray(reference)
    return float(diff.mean()), manifold._se(list(diff))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args, passed = parse_args(argv)
    runs_out = args.runs_out or tempfile.mkdtemp(prefix="manifold_ablation_")
    ablations = ["none", *[a for a in args.ablations if a != "none"]]
    t_all = time.perf_counter()
    runs: dict[str, dict[str, Any]] = {}
    for name in ablations:
        runs[name] = manifold.main(
            [
                *passed,
                "--ablate",
                name,
                "--no-ceiling",
                "--no-figures",
                "--out",
                runs_out,
                "--tag",
                f"{args.tag}_ablate_{name}",
            ]
        )
    reference = runs["none"]
    rows: list[dict[str, Any]] = []
    for name, run in runs.items():
        em = run["results"][run["em_name"]]
        kept = next(
            (r for r in run["rows"] if r["iteration"] == run["best_iteration"]), run["rows"][-1]
        )
        row: dict[str, Any] = {"switched off": manifold.ABLATIONS[name] if name != "none" else ""}
        row["run"] = name
        for metric in ("Sinkhorn", "W2²"):
            row[metric] = em[metric]
            row[f"{metric} ± se"] = em[f"{metric} ± se"]
            ref = reference["results"][reference["em_name"]][f"{metric} values"]
            mean, se = _paired(em[f"{metric} values"], ref)
            row[f"Δ{metric} vs recipe"] = mean
            row[f"Δ{metric} se"] = se
        row["kept iteration"] = run["best_iteration"]
        row["log evidence"] = kept["log evidence"]
        row["evidence ± se"] = kept["± se"]
        row["EM CPU s"] = run["em_cpu"]
        rows.append(row)
    mixture = reference["results"][reference["mix_name"]]
    opts = manifold.parse_args(passed)
    device = str(resolve_device(opts.device))
    columns = [
        "run",
        "switched off",
        "Sinkhorn",
        "Sinkhorn ± se",
        "ΔSinkhorn vs recipe",
        "ΔSinkhorn se",
        "W2²",
        "W2² ± se",
        "ΔW2² vs recipe",
        "ΔW2² se",
        "kept iteration",
        "log evidence",
        "evidence ± se",
        "EM CPU s",
    ]
    lines = [
        f"# Ablation of the EM recipe, manifold D = {opts.n_features}, M = {opts.n_measurements}",
        "",
        *machine_header(torch.device(device)),
        f"- wall time: {time.perf_counter() - t_all:.0f} s for {len(runs)} runs",
        f"- each run: `manifold.py {' '.join(passed)} --ablate <run> --no-ceiling`: "
        f"{opts.n_samples} observations, {opts.n_iter} EM iterations ({opts.warmup_iter} "
        f"warm-up), {opts.epochs} epochs per M-step, {opts.e_step_samples} posterior samples "
        f"per observation; final priors scored on {opts.eval_repeats} pairs of "
        f"{opts.n_eval} prior samples and held-out true latents, the same sets for every run "
        "(Δ: paired difference from the recipe, mean ± standard error; resolved when beyond "
        "two standard errors)",
        f"- references on the same sets: {opts.mixture_components}-component extreme-deconvolution "
        f"mixture Sinkhorn "
        f"{mixture['Sinkhorn']:.4f} ± {mixture['Sinkhorn ± se']:.4f}, W2² "
        f"{mixture['W2²']:.4f} ± {mixture['W2² ± se']:.4f}; two sets of true latents Sinkhorn "
        f"{reference['floor']['Sinkhorn']:.4f}, W2² {reference['floor']['W2²']:.4f}; exact mean "
        "log-evidence " + ", ".join(f"{k} {v:.3f}" for k, v in reference["evidence"].items()),
        "- log evidence: the SMC estimate of the kept iteration (128 fixed observations, "
        "32 steps, 64 particles), ± its standard error",
        "",
        format_table(rows, columns),
        "",
    ]
    publish(lines, Path(args.out) / f"manifold_ablation{args.tag}.md")
    return rows


if __name__ == "__main__":
    main()
