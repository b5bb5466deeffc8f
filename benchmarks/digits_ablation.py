r"""Ablation of the EM recipe on the digits benchmark: each element switched off in turn.

Runs ``digits.py`` once with the recipe and once per ``--ablate`` element (see
``digits.ABLATIONS``), on the same data, split and seeds, without the clean-trained ceiling
and the scikit-learn imputers, and collects one table: the PSNR of the kept prior's posterior
mean on the missing pixels of the held-out images, its paired difference from the recipe's
with a standard error, the evidence estimate of the kept iteration, and the EM time.

The PSNR pools the squared errors over all missing pixels, so the difference between two runs
is :math:`10 \log_{10}(\sum_j e^{\text{recipe}}_j / \sum_j e^{\text{run}}_j)` over the held-out
images :math:`j` (:math:`e_j` the summed squared error of image :math:`j`); its standard error
is the jackknife's over the images (Efron & Stein, 1981), which keeps the pairing: both runs
impute the same pixels of the same images.

Options after ``--`` go to every ``digits.py`` run (e.g. a reduced configuration). Writes
``digits_ablation{tag}.md`` to ``--out``; each run's own report goes to ``--runs-out``::

    python benchmarks/digits_ablation.py -- --n-iter 3 --epochs 8 --transform-samples 8
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import digits
from _common import machine_header, publish, resolve_device, split_passthrough

from diffem._report import format_table

DEFAULT_RUNS = ["none", "refine", "samples", "ema", "reset", "lognormal", "unet"]


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv, passed = split_passthrough(argv)
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--ablations",
        nargs="+",
        choices=sorted(digits.ABLATIONS),
        default=DEFAULT_RUNS,
        help="the runs (none: the recipe, always run first)",
    )
    p.add_argument(
        "--extra",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "OPTIONS"),
        help="an extra run: the recipe with these digits.py options (one quoted string) added, "
        "e.g. --extra mixture '--init-components 8 --init-shrinkage 100'",
    )
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument(
        "--runs-out",
        default=None,
        help="each run's report and saved errors (default: a temp dir); runs whose saved "
        "errors are there already are not run again",
    )
    p.add_argument("--tag", default="")
    return p.parse_args(argv), passed


def image_errors(estimate: np.ndarray, truth: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """Summed squared error on the missing pixels of each image ``(n,)``, of the estimate
    clipped to [-1, 1] as in ``digits.psnr_missing``."""
    return (((digits.clipped(estimate) - truth) ** 2) * missing).sum(-1)


def psnr_difference(errors: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    r"""Pooled-PSNR difference of ``errors`` over ``reference`` (per-image summed squared
    errors ``(n,)`` of the same pixels), :math:`10 \log_{10}(\sum_j r_j / \sum_j e_j)` dB, and
    its jackknife standard error over the images."""
    n = len(errors)
    diff = 10 * np.log10(reference.sum() / errors.sum())
    loo = 10 * np.log10((reference.sum() - reference) / (errors.sum() - errors))  # (n,)
    se = np.sqrt((n - 1) / n * ((loo - loo.mean()) ** 2).sum())
    return float(diff), float(se)


def _run(
    name: str, tag: str, passed: list[str], runs_out: Path, options: list[str]
) -> dict[str, Any]:
    """One ``digits.py`` run (``--ablate name`` unless ``options`` are given), or its saved
    summary from an earlier call."""
    saved = runs_out / f"digits{tag}_ablate_{name}.json"
    errors_path = saved.with_suffix(".npz")
    if saved.exists() and errors_path.exists():
        with np.load(errors_path) as data:
            return {**json.loads(saved.read_text()), "errors": dict(data), "loaded": True}
    tic = time.perf_counter()
    run = digits.main(
        [
            *passed,
            *(options or ["--ablate", name]),
            "--no-ceiling",
            "--no-baselines",
            "--out",
            str(runs_out),
            "--tag",
            f"{tag}_ablate_{name}",
        ]
    )
    errors = {
        key: image_errors(value, run["truth"], run["missing"])
        for key, value in run["estimates"].items()
    }
    np.savez(errors_path, **errors)
    kept = next(
        (r for r in run["rows"] if r["iteration"] == run["best_iteration"]), run["rows"][-1]
    )
    summary = {
        "psnr": next(r for r in run["results"] if r["method"] == run["em_name"])[
            "PSNR missing (dB)"
        ],
        "best_iteration": run["best_iteration"],
        "last_iteration": run["rows"][-1]["iteration"],
        "log_evidence": kept["log evidence"],
        "log_evidence_se": kept["± se"],
        "em_cpu": run["em_cpu"],
        "wall_s": time.perf_counter() - tic,
    }
    saved.write_text(json.dumps(summary))
    return {**summary, "errors": errors}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args, passed = parse_args(argv)
    runs_out = Path(args.runs_out or tempfile.mkdtemp(prefix="digits_ablation_"))
    runs_out.mkdir(parents=True, exist_ok=True)
    names = ["none", *[a for a in args.ablations if a != "none"]]
    t_all = time.perf_counter()
    changes = {name: digits.ABLATIONS[name] if name != "none" else "" for name in names}
    runs = {name: _run(name, args.tag, passed, runs_out, []) for name in names}
    for name, options in args.extra:
        changes[name] = f"`{options}` added"
        runs[name] = _run(name, args.tag, passed, runs_out, options.split())
    reference = runs["none"]
    ref_errors = reference["errors"]["em"]
    rows: list[dict[str, Any]] = []
    for name, run in runs.items():
        diff, se = psnr_difference(run["errors"]["em"], ref_errors)
        rows.append(
            {
                "run": name,
                "switched off (or changed)": changes[name],
                "PSNR (dB)": run["psnr"],
                "start PSNR (dB)": run["psnr"]
                + psnr_difference(run["errors"]["start"], run["errors"]["em"])[0],
                "ΔPSNR vs recipe": diff,
                "ΔPSNR se": se,
                "resolved (> 2 se)": ""
                if name == "none"
                else ("yes" if abs(diff) > 2 * se else "no"),
                "kept iteration": run["best_iteration"],
                "log evidence": run["log_evidence"],
                "evidence ± se": run["log_evidence_se"],
                "Δevidence vs recipe": run["log_evidence"] - reference["log_evidence"],
                "EM CPU s": run["em_cpu"],
            }
        )
    gauss_diff, gauss_se = psnr_difference(reference["errors"]["start"], ref_errors)
    opts = digits.parse_args(passed)
    device = str(resolve_device(opts.device))
    lines = [
        "# Ablation of the EM recipe, digits (reduced configuration)",
        "",
        *machine_header(torch.device(device)),
        f"- wall time: {time.perf_counter() - t_all:.0f} s for the "
        f"{sum(not r.get('loaded') for r in runs.values())} runs of this call; "
        f"{sum(bool(r.get('loaded')) for r in runs.values())} runs loaded from the `--runs-out` "
        "of an earlier call with the same options",
        f"- each run: `digits.py {' '.join(passed)} --ablate <run> --no-ceiling "
        f"--no-baselines`: {opts.n_iter} EM iterations, {opts.epochs} epochs per M-step, "
        f"{opts.e_step_samples} posterior samples per observation (MMPS, {opts.steps} steps, "
        f"cg_iter {opts.cg_iter}), posterior mean of {opts.transform_samples} draws, evidence "
        f"on {opts.evidence_rows} training observations; the same split and seeds for every "
        "run",
        "- ΔPSNR: paired difference from the recipe on the missing pixels of the same held-out "
        "images, ± its jackknife standard error over the images; resolved when beyond two "
        "standard errors",
        "- log evidence: the SMC estimate of the kept iteration on the same training "
        "observations for every run, ± its standard error (Δevidence is unpaired: its "
        "standard error is at most the two runs' standard errors added in quadrature)",
        f"- the Gaussian (PPCA) start on the same images: "
        f"{reference['psnr'] + gauss_diff:.2f} dB (Gaussian - recipe: {gauss_diff:+.2f} ± "
        f"{gauss_se:.2f} dB, paired)",
        "",
        format_table(rows),
        "",
    ]
    publish(lines, Path(args.out) / f"digits_ablation{args.tag}.md")
    return rows


if __name__ == "__main__":
    main()
