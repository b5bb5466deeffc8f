r"""Benchmark: imputing corrupted 8x8 digits with a diffusion prior learned by EM.

scikit-learn's digits (1797 images of 8x8 grey levels, scaled to [-1, 1]) with 75% of the pixels
missing at random (per image) and Gaussian noise of std 0.05 on the observed ones
(``diffem.datasets.load_digits_corrupted``). The images are split into a training part
(corrupted images only are used for fitting) and a held-out part. For each held-out image the
missing pixels are estimated from its observed ones, and the PSNR of these estimates against
the true pixels is reported (data range 2, MSE over all missing pixels of all held-out
images), for

* ``DiffusionPriorEM`` (posterior mean: ``transform``) with the EM recipe and the recommended
  image denoiser (``recipe_denoiser(image_shape)``: a U-Net), fitted on the corrupted training
  images, with MMPS as posterior sampler (see ``--ablate smc``) at CPU sizes: its
  deterministic steps (``eta=0``, ``--e-step-eta``) in the E-step, the less spread ones
  (``benchmarks/estep_calibration.py``), and a first M-step of ``--first-epochs`` epochs;
* scikit-learn's ``IterativeImputer`` and ``KNNImputer``, fitted on the same images with NaN;
* the Gaussian (PPCA) prior the EM starts from (``n_iter=0``);
* the ceiling: the same pipeline on the clean training images (the same denoiser refining the
  Gaussian fitted to them, the same optimizer steps as all of EM's M-steps), its posterior
  mean by the same sampler.

The evidence estimate of every EM iteration (``history_``) is tabulated and plotted with its
error bars. ``--ablate`` switches one recipe element off. Writes ``digits{tag}.md`` (tables,
command, date, machine), ``digits{tag}_evidence.png`` and ``digits{tag}_posterior.png``
(observed / posterior samples / posterior mean / truth) to ``--out``::

    python benchmarks/digits.py                          # the recipe, CPU sizes
    python benchmarks/digits.py --ablate refine --tag _no_refine --no-ceiling
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

from diffem._report import fit_tracked, format_table, record_summary

IMAGE_SHAPE = (1, 8, 8)
START_NAME = "Gaussian prior (EM init, n_iter=0)"

ABLATIONS = {
    "none": "the recipe",
    "smc": "E-step and transform: twisted SMC (the estimator's default) instead of MMPS",
    "refine": "plain network instead of refining the Gaussian's denoiser",
    "samples": "one posterior sample per observation instead of --e-step-samples",
    "ema": "no EMA of the weights",
    "lognormal": "log-uniform training noise levels instead of log-normal",
    "reset": "a fresh optimizer per M-step",
    "unet": "the MLP recipe denoiser instead of the U-Net",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--missing", type=float, default=0.75)
    p.add_argument("--noise-std", type=float, default=0.05)
    p.add_argument("--test-size", type=float, default=0.2)
    p.add_argument("--n-iter", type=int, default=6, help="EM iterations")
    p.add_argument("--epochs", type=int, default=16, help="epochs per M-step")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--e-step-samples", type=int, default=2)
    p.add_argument("--steps", type=int, default=32, help="MMPS steps (E-step, transform)")
    p.add_argument("--cg-iter", type=int, default=1)
    p.add_argument(
        "--e-step-eta",
        type=float,
        default=0.0,
        help="stochasticity of the E-step's MMPS steps (1: DDPM, 0: DDIM); transform: 1",
    )
    p.add_argument("--first-epochs", type=int, default=64, help="epochs of the first M-step")
    p.add_argument("--transform-samples", type=int, default=16, help="draws averaged")
    p.add_argument("--particles", type=int, default=8, help="SMC particles (--ablate smc)")
    p.add_argument("--evidence-rows", type=int, default=64)
    p.add_argument("--evidence-steps", type=int, default=32)
    p.add_argument("--evidence-particles", type=int, default=16)
    p.add_argument("--evidence-cg-iter", type=int, default=1)
    p.add_argument(
        "--init-components",
        type=int,
        default=1,
        help="components of the analytic start (1: the Gaussian; more: a mixture fitted by "
        "extreme deconvolution for 4 x --gaussian-iter iterations)",
    )
    p.add_argument(
        "--init-shrinkage", type=float, default=0.0, help="the mixture start's shrinkage"
    )
    p.add_argument("--gaussian-iter", type=int, default=16, help="closed-form EM iterations")
    p.add_argument(
        "--gaussian-rank",
        type=int,
        default=None,
        help="rank (plus diagonal) of the start's covariances (default: full)",
    )
    p.add_argument("--ablate", choices=sorted(ABLATIONS), default="none")
    p.add_argument(
        "--ceiling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train the same pipeline on the clean images",
    )
    p.add_argument(
        "--baselines",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="scikit-learn's imputers",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--tag", default="", help="suffix of the output files")
    p.add_argument("--verbose", type=int, default=1)
    return p.parse_args(argv)


def clipped(estimate: np.ndarray) -> np.ndarray:
    """An estimate as the benchmark scores it: float64, clipped to the images' range [-1, 1]."""
    return np.clip(np.asarray(estimate, dtype=np.float64), -1.0, 1.0)


def psnr_missing(estimate: np.ndarray, truth: np.ndarray, missing: np.ndarray) -> float:
    """PSNR (data range 2, images in [-1, 1]) of ``estimate`` clipped to [-1, 1] on the
    ``missing`` entries, MSE pooled over all of them (:func:`diffem.metrics.psnr`)."""
    from diffem.metrics import psnr

    est = clipped(estimate)
    return float(
        psnr(
            np.asarray(truth, dtype=np.float64),
            est,
            data_range=2.0,
            mask=missing,
            reduction="pooled",
        )
    )


def load_split(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, Any, Any, Any]:
    """Clean images, corrupted images (float64), their ``Mask`` operator, and the training and
    held-out indices (sorted) of the benchmark's split."""
    from diffem.datasets import load_digits_corrupted

    clean, Y, operator = load_digits_corrupted(
        missing=args.missing, noise_std=args.noise_std, random_state=args.seed
    )
    clean, Y = np.asarray(clean, dtype=np.float64), np.asarray(Y, dtype=np.float64)
    perm = np.random.RandomState(args.seed).permutation(len(clean))
    n_test = round(args.test_size * len(clean))
    return clean, Y, operator, np.sort(perm[n_test:]), np.sort(perm[:n_test])


def make_estimator(args: argparse.Namespace, device: str) -> Any:
    """``DiffusionPriorEM`` with the recipe at the benchmark's sizes and one element off."""
    from diffem import DiffusionPriorEM
    from diffem.em import recipe_denoiser
    from diffem.samplers import MMPS, SMC

    shape = None if args.ablate == "unet" else IMAGE_SHAPE
    denoiser = recipe_denoiser(shape).set_params(
        lr=args.lr, max_epochs=args.epochs, batch_size=args.batch_size, random_state=args.seed
    )
    solver = "dpmpp_2m"
    params: dict[str, Any] = dict(
        denoiser=denoiser,
        # MMPS: on these 64-pixel images the SMC particle systems of the estimator's default
        # collapse to one lineage, so that the mean of their draws is one sample's error
        sampler=MMPS(steps=args.steps, cg_iter=args.cg_iter, solver=solver),
        # the E-step's sampler for every iteration: the estimator's warm-up sampler
        warmup_sampler=MMPS(
            steps=args.steps, cg_iter=args.cg_iter, solver=solver, eta=args.e_step_eta
        ),
        warmup_iter=args.n_iter,
        first_epochs=args.first_epochs,
        n_transform_samples=args.transform_samples,
        evidence_sampler=SMC(
            steps=args.evidence_steps,
            particles=args.evidence_particles,
            cg_iter=args.evidence_cg_iter,
            solver=solver,
        ),
        evidence_rows=args.evidence_rows,
        e_step_samples=args.e_step_samples,
        init_components=args.init_components,
        init_shrinkage=args.init_shrinkage,
        gaussian_iter=args.gaussian_iter,
        gaussian_rank=args.gaussian_rank,
        n_iter=args.n_iter,
        tol=None,  # the benchmark runs every iteration
        device=device,
        random_state=args.seed,
        verbose=args.verbose,
    )
    ablate = args.ablate
    if ablate == "smc":
        params["sampler"] = SMC(
            steps=args.steps, particles=args.particles, cg_iter=args.cg_iter, solver=solver
        )
        params["warmup_sampler"] = params["sampler"]
    elif ablate == "refine":
        params["refine_init"] = False
    elif ablate == "samples":
        params["e_step_samples"] = 1
    elif ablate == "ema":
        denoiser.set_params(ema_decay=None)
    elif ablate == "lognormal":
        denoiser.set_params(sigma_distribution="log_uniform")
    elif ablate == "reset":
        params["reset_optimizer"] = True
    return DiffusionPriorEM(**params)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from sklearn.experimental import enable_iterative_imputer  # noqa: F401
    from sklearn.impute import IterativeImputer, KNNImputer

    from diffem.operators import Identity
    from diffem.plotting import image_grid, metric_curves, save_figure

    t_all, cpu_all = time.perf_counter(), time.process_time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag
    device = str(resolve_device(args.device))
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        if args.verbose:
            print(msg, flush=True)

    clean, Y, operator, train, test = load_split(args)
    observed = np.broadcast_to(np.asarray(operator.observed.cpu(), dtype=bool), Y.shape)
    Y_nan = np.where(observed, Y, np.nan)
    missing_test = ~observed[test]
    log(
        f"digits: {len(train)} training / {len(test)} held-out images, "
        f"{missing_test.mean():.0%} of held-out pixels missing"
    )

    results: list[dict[str, Any]] = []

    def add(name: str, estimate: np.ndarray, seconds: float, cpu: float, note: str = "") -> None:
        results.append(
            {
                "method": name,
                "PSNR missing (dB)": psnr_missing(estimate, clean[test], missing_test),
                "fit+predict s": seconds,
                "CPU s": cpu,
                "note": note,
            }
        )
        log(f"{name}: {results[-1]['PSNR missing (dB)']:.2f} dB ({seconds:.0f} s)")

    def clock() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def since(start: tuple[float, float]) -> tuple[float, float]:
        return time.perf_counter() - start[0], time.process_time() - start[1]

    # ---- scikit-learn imputers, fitted on the corrupted training images with NaN
    if args.baselines:
        tic = clock()
        imp = IterativeImputer(max_iter=20, random_state=args.seed).fit(Y_nan[train])
        add(
            "IterativeImputer",
            imp.transform(Y_nan[test]),
            *since(tic),
            "max_iter=20, BayesianRidge",
        )
        tic = clock()
        knn = KNNImputer(n_neighbors=10, weights="distance").fit(Y_nan[train])
        add(
            "KNNImputer",
            knn.transform(Y_nan[test]),
            *since(tic),
            "n_neighbors=10, distance weights",
        )

    def posterior_mean(est: Any) -> np.ndarray:
        return np.asarray(est.transform(Y[test], operator[test]))

    # ---- Gaussian (PPCA) prior, and the mixture EM starts from if there is one
    for components in sorted({1, args.init_components}):
        tic = clock()
        start = make_estimator(args, device).set_params(
            n_iter=0, verbose=0, init_components=components
        )
        if components == 1:  # the PPCA baseline: the estimator's default closed-form fit
            start.set_params(gaussian_iter=type(start)().gaussian_iter)
        start.fit(Y[train], operator[train])
        start_mean = posterior_mean(start)
        add(
            START_NAME if components == 1 else "mixture start (EM init, n_iter=0)",
            start_mean,
            *since(tic),
            f"{start.gaussian_iter} closed-form EM iterations; exact posterior mean"
            if components == 1
            else f"{components} components, {4 * start.gaussian_iter} iterations, shrinkage "
            f"{start.init_shrinkage:g}, rank {start.gaussian_rank or 'full'}; exact posterior "
            "mean",
        )

    # ---- EM
    est = make_estimator(args, device)
    rows: list[dict[str, Any]] = []

    def on_iteration(k: int, e: Any, record: Any) -> None:
        rows.append({"iteration": k, **record_summary(record)})
        log(
            f"EM iteration {k}: "
            + ", ".join(f"{c} {v:.4g}" for c, v in rows[-1].items() if c != "iteration")
        )

    tic = clock()
    fit_tracked(est, Y[train], operator[train], on_iteration)
    em_fit = since(tic)
    tic = clock()
    em_mean = posterior_mean(est)
    em_predict = since(tic)
    steps = int(sum(r["n_steps"] for r in est.history_))
    net = est.denoiser_
    params = sum(p.numel() for p in net.module_.parameters()) if hasattr(net, "module_") else 0
    name = "DiffusionPriorEM" + ("" if args.ablate == "none" else f" ({ABLATIONS[args.ablate]})")
    add(
        name,
        em_mean,
        em_fit[0] + em_predict[0],
        em_fit[1] + em_predict[1],
        f"{type(net).__name__} ({params / 1e6:.2f}M), iteration {est.best_iteration_} of "
        f"{est.n_iter_} kept, {steps} optimizer steps",
    )

    # ---- ceiling: the same pipeline on the clean training images, the same optimizer steps
    if args.ceiling:
        tic = clock()
        clean_op = Identity(clean.shape[1], noise_std=args.noise_std)
        reference = make_estimator(args, device).set_params(n_iter=0, verbose=0)
        reference.fit(clean[train], clean_op)
        clean_net = make_estimator(args, device).denoiser
        clean_net.set_params(
            max_epochs=max(1, math.ceil(steps / math.ceil(len(train) / args.batch_size))),
            sigma_data=float(est.sigma_data_),
            device=device,
        )
        if est.refine_init:
            clean_net.set_params(base=reference.init_prior_)
        clean_net.fit(torch.as_tensor(clean[train], dtype=torch.float32))
        saved = est.denoiser_
        try:
            est.denoiser_ = clean_net
            ceiling = posterior_mean(est)
        finally:
            est.denoiser_ = saved
        add(
            "ceiling: same pipeline on clean images",
            ceiling,
            *since(tic),
            f"{clean_net.max_epochs} epochs on the clean images (the steps of EM's M-steps)",
        )

    # ---- figures: the evidence along EM; observed / posterior samples / mean / truth
    figs = {
        "evidence": save_figure(
            metric_curves(
                [r["iteration"] for r in rows],
                {"evidence estimate (SMC)": [r["log evidence"] for r in rows]},
                errors={"evidence estimate (SMC)": [2 * r["± se"] for r in rows]},
                baselines={"Gaussian initialisation (exact)": est.initial_exact_log_evidence_},
                ylabel="mean log-evidence (nats / observation)",
                title="Digits: evidence estimate along EM (error bars: 2 standard errors)",
                logy=False,
            ),
            out / f"digits{tag}_evidence.png",
        )
    }
    show = np.arange(8)
    samples = np.asarray(
        est.sample_posterior(
            Y[test][show], operator[test][show], n_samples=3, random_state=args.seed
        )
    )
    rows_img = {"observed": Y_nan[test][show]}
    for s in range(samples.shape[1]):
        rows_img[f"sample {s + 1}"] = np.clip(samples[:, s], -1, 1)
    rows_img["posterior mean"] = np.clip(em_mean[show], -1, 1)
    rows_img["truth"] = clean[test][show]
    figs["posterior"] = save_figure(
        image_grid(
            rows_img,
            IMAGE_SHAPE,
            title=f"Held-out digits, {args.missing:.0%} missing (red), noise {args.noise_std}",
        ),
        out / f"digits{tag}_posterior.png",
    )

    # ---- criteria
    psnr = {r["method"]: r["PSNR missing (dB)"] for r in results}
    em = psnr[name]
    gaussian = psnr[START_NAME]
    crit = {"EM >= Gaussian (PPCA) prior + 1 dB": em >= gaussian + 1.0}
    if args.ceiling:
        crit["EM within 0.5 dB of the ceiling"] = em >= psnr[results[-1]["method"]] - 0.5
    if args.baselines:
        crit["EM above IterativeImputer and KNNImputer"] = em > max(
            psnr["IterativeImputer"], psnr["KNNImputer"]
        )
    crit["evidence changes >= -2 se at every iteration"] = all(
        r["evidence change"] >= -2 * r["change se"] for r in rows[1:]
    )
    total, cpu = since((t_all, cpu_all))
    write_report(
        out / f"digits{tag}.md",
        args,
        results,
        rows,
        crit,
        figs,
        (total, cpu, em_fit[1]),
        device,
        n_train=len(train),
        n_test=len(test),
    )
    log(f"total {total:.0f} s (CPU {cpu:.0f} s); {crit}")
    return {
        "results": results,
        "criteria": crit,
        "rows": rows,
        "em_name": name,
        "best_iteration": est.best_iteration_,
        "em_cpu": em_fit[1],
        # per-image paired comparisons (digits_ablation.py)
        "estimates": {"em": em_mean, "start": start_mean},
        "truth": clean[test],
        "missing": missing_test,
    }


def write_report(
    path: Path,
    args: argparse.Namespace,
    results: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    crit: dict[str, bool],
    figs: dict[str, Path],
    times: tuple[float, float, float],
    device: str,
    n_train: int,
    n_test: int,
) -> None:
    total, cpu, em_cpu = times
    start = f"the Gaussian ({args.gaussian_iter} closed-form EM iterations)"
    if args.init_components > 1:
        start = (
            f"a {args.init_components}-component mixture ({4 * args.gaussian_iter} extreme-"
            f"deconvolution iterations, shrinkage {args.init_shrinkage:g}, rank "
            f"{args.gaussian_rank or 'full'})"
        )
    net = make_estimator(args, device).denoiser
    channels = net.get_params(deep=False).get("module__channels", "")
    lines = [
        "# Digits benchmark: imputation of 75%-missing, noisy 8x8 digits"
        + (f", ablation: {ABLATIONS[args.ablate]}" if args.ablate != "none" else ""),
        "",
        *machine_header(torch.device(device)),
        f"- wall time: {total:.0f} s; CPU time of the process: {cpu:.0f} s (EM fit {em_cpu:.0f} "
        f"s); {torch.get_num_threads()} torch threads",
        f"- data: scikit-learn digits scaled to [-1, 1], {args.missing:.0%} of pixels missing "
        f"per image, noise std {args.noise_std}; {n_train} training / {n_test} held-out images",
        "- metric: PSNR (data range 2) of the estimate (clipped to [-1, 1]) of the missing "
        "pixels of the held-out images (MSE pooled over all of them); diffusion priors use "
        "the posterior mean (`transform`)",
        f"- denoiser: `{type(net).__name__}` ({channels}"
        f" channels), EMA {net.ema_decay}, {net.sigma_distribution} training noise levels, "
        f"{args.epochs} epochs per M-step ({args.first_epochs} for the first), batch "
        f"{args.batch_size}, lr {args.lr}",
        f"- EM: {args.n_iter} iterations from {start}; E-step: MMPS {args.steps} "
        f"DPM-Solver++(2M) steps, eta {args.e_step_eta}, cg_iter {args.cg_iter}, "
        f"{args.e_step_samples} samples per "
        f"observation; evidence: SMC {args.evidence_steps} steps, {args.evidence_particles} "
        f"particles, cg_iter {args.evidence_cg_iter} on "
        f"{args.evidence_rows} training observations; transform: MMPS with the same steps, "
        f"eta 1, mean of {args.transform_samples} draws",
        "",
        "## Results",
        "",
        format_table(
            results,
            ["method", "PSNR missing (dB)", "fit+predict s", "CPU s", "note"],
            floatfmt=".2f",
        ),
        "",
        "## Criteria",
        "",
        *[f"- {k}: **{'yes' if v else 'no'}**" for k, v in crit.items()],
        "",
        "## EM history and the evidence estimate",
        "",
        "Mean log-evidence of the evidence observations (nats per image) by the SMC "
        "normalising constants, its standard error, and the paired change from the previous "
        "iteration on the same observations with its standard error; iteration 0 is the "
        "Gaussian initialisation, estimated the same way.",
        "",
        format_table(rows),
        "",
        f"![evidence along EM]({figs['evidence'].name})",
        "",
        "## Posterior samples",
        "",
        f"![posterior samples]({figs['posterior'].name})",
        "",
    ]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
