r"""Benchmark: imputing corrupted 8x8 digits with a diffusion prior learned by EM.

scikit-learn's digits (1797 images of 8x8 grey levels, scaled to [-1, 1]) with 75% of the pixels
missing at random (per image) and Gaussian noise of std 0.05 on the observed ones
(``diffem.datasets.load_digits_corrupted``). The images are split into a training part
(corrupted images only are used for fitting) and a held-out part. For each held-out image the
missing pixels are estimated from its observed ones, and the PSNR of these estimates against
the true pixels is reported (data range 2, MSE over all missing pixels of all held-out
images), for

* ``DiffusionPriorEM`` (posterior mean: ``transform``), fitted on the corrupted training images;
* scikit-learn's ``IterativeImputer`` and ``KNNImputer``, fitted on the same images with NaN;
* the Gaussian (PPCA) prior the EM starts from (``n_iter=0``);
* the ceiling: the same diffusion prior trained on the clean training images;
* the covariance ablation of the paper (MMPS ``covariance="jacobian" | "gaussian" |
  "isotropic"`` during EM and at evaluation).

Writes ``digits.md`` (table, command, date, machine) and ``digits_posterior.png`` (observed /
posterior samples / posterior mean / truth) to ``--out``::

    python benchmarks/digits.py                # CPU scale
    python benchmarks/digits.py --denoiser unet --n-iter 32 --device cuda   # GPU
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

from diffem._report import fit_tracked, format_table, record_summary

IMAGE_SHAPE = (1, 8, 8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--missing", type=float, default=0.75)
    p.add_argument("--noise-std", type=float, default=0.05)
    p.add_argument("--test-size", type=float, default=0.2)
    p.add_argument("--denoiser", choices=["mlp", "unet"], default="mlp")
    p.add_argument("--hidden", type=int, default=256, help="MLP width")
    p.add_argument("--blocks", type=int, default=3, help="MLP residual blocks")
    p.add_argument("--n-iter", type=int, default=16, help="EM iterations")
    p.add_argument("--gaussian-iter", type=int, default=16)
    p.add_argument("--epochs", type=int, default=32, help="epochs per M-step")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=32, help="MMPS steps")
    p.add_argument("--cg-iter", type=int, default=1)
    p.add_argument(
        "--posterior-samples",
        type=int,
        default=8,
        help="posterior samples averaged by transform (if the estimator has it)",
    )
    p.add_argument(
        "--ablation",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run EM with the gaussian and isotropic covariances",
    )
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
    p.add_argument("--tag", default="")
    p.add_argument("--verbose", type=int, default=1)
    return p.parse_args(argv)


def psnr_missing(estimate: np.ndarray, truth: np.ndarray, missing: np.ndarray) -> float:
    """PSNR (data range 2, images in [-1, 1]) of ``estimate`` clipped to [-1, 1] on the
    ``missing`` entries, MSE pooled over all of them (:func:`diffem.metrics.psnr`)."""
    from diffem.metrics import psnr

    est = np.clip(np.asarray(estimate, dtype=np.float64), -1.0, 1.0)
    return float(
        psnr(
            np.asarray(truth, dtype=np.float64),
            est,
            data_range=2.0,
            mask=missing,
            reduction="pooled",
        )
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from sklearn.experimental import enable_iterative_imputer  # noqa: F401
    from sklearn.impute import IterativeImputer, KNNImputer

    from diffem import DiffusionPriorEM
    from diffem.datasets import load_digits_corrupted
    from diffem.plotting import image_grid, save_figure
    from diffem.samplers import MMPS

    t_all = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"_{args.tag}" if args.tag else ""
    device = str(resolve_device(args.device))
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        if args.verbose:
            print(msg, flush=True)

    clean, Y, operator = load_digits_corrupted(
        missing=args.missing, noise_std=args.noise_std, random_state=args.seed
    )
    clean, Y = np.asarray(clean, dtype=np.float64), np.asarray(Y, dtype=np.float64)
    rng = np.random.RandomState(args.seed)
    perm = rng.permutation(len(clean))
    n_test = round(args.test_size * len(clean))
    test, train = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    Y_nan = Y.copy()
    observed = np.broadcast_to(
        np.asarray(
            operator.observed.cpu() if hasattr(operator.observed, "cpu") else operator.observed,
            dtype=bool,
        ),
        Y.shape,
    )
    Y_nan[~observed] = np.nan
    missing_test = ~observed[test]
    log(
        f"digits: {len(train)} training / {len(test)} held-out images, "
        f"{missing_test.mean():.0%} of held-out pixels missing"
    )

    results: list[dict[str, Any]] = []

    def add(name: str, estimate: np.ndarray, seconds: float, note: str = "") -> None:
        results.append(
            {
                "method": name,
                "PSNR missing (dB)": psnr_missing(estimate, clean[test], missing_test),
                "fit+predict s": seconds,
                "note": note,
            }
        )
        log(f"{name}: {results[-1]['PSNR missing (dB)']:.2f} dB ({seconds:.0f} s)")

    # ---- scikit-learn imputers, fitted on the corrupted training images with NaN
    t0 = time.perf_counter()
    imp = IterativeImputer(max_iter=20, random_state=args.seed).fit(Y_nan[train])
    add(
        "IterativeImputer",
        imp.transform(Y_nan[test]),
        time.perf_counter() - t0,
        "max_iter=20, BayesianRidge",
    )
    t0 = time.perf_counter()
    knn = KNNImputer(n_neighbors=10, weights="distance").fit(Y_nan[train])
    add(
        "KNNImputer",
        knn.transform(Y_nan[test]),
        time.perf_counter() - t0,
        "n_neighbors=10, distance weights",
    )

    # ---- diffusion priors
    def make_denoiser(max_epochs: int) -> Any:
        if args.denoiser == "unet":
            from diffem.denoisers import UNetDenoiser

            return UNetDenoiser(
                image_shape=IMAGE_SHAPE,
                lr=args.lr,
                max_epochs=max_epochs,
                batch_size=args.batch_size,
                random_state=args.seed,
            )
        from diffem.denoisers import MLPDenoiser

        return MLPDenoiser(
            lr=args.lr,
            max_epochs=max_epochs,
            batch_size=args.batch_size,
            module__hidden_features=args.hidden,
            module__n_blocks=args.blocks,
            random_state=args.seed,
        )

    def make_em(covariance: str, n_iter: int) -> Any:
        return DiffusionPriorEM(
            denoiser=make_denoiser(args.epochs),
            sampler=MMPS(steps=args.steps, cg_iter=args.cg_iter, covariance=covariance),
            n_iter=n_iter,
            gaussian_iter=args.gaussian_iter,
            device=device,
            random_state=args.seed,
            verbose=args.verbose,
        )

    def posterior_mean(est: Any) -> np.ndarray:
        return np.asarray(est.transform(Y[test], operator[test]))

    # Gaussian (PPCA) prior: the EM initialisation alone
    t0 = time.perf_counter()
    gauss = make_em("jacobian", 0).fit(Y[train], operator[train])
    add(
        "Gaussian prior (EM init, n_iter=0)",
        posterior_mean(gauss),
        time.perf_counter() - t0,
        f"{args.gaussian_iter} closed-form EM iterations",
    )

    covariances = ["jacobian", "gaussian", "isotropic"] if args.ablation else ["jacobian"]
    history: dict[str, list[dict[str, Any]]] = {}
    ests: dict[str, Any] = {}
    for cov in covariances:
        t0 = time.perf_counter()
        est = make_em(cov, args.n_iter)
        rows: list[dict[str, Any]] = []
        fit_tracked(
            est,
            Y[train],
            operator[train],
            lambda k, e, rec, rows=rows: rows.append({"iteration": k, **record_summary(rec)}),
        )
        history[cov] = rows
        ests[cov] = est
        name = "DiffusionPriorEM" + ("" if cov == "jacobian" else f" (MMPS covariance={cov})")
        add(
            name,
            posterior_mean(est),
            time.perf_counter() - t0,
            f"{args.denoiser.upper()}, {args.n_iter} EM iterations, MMPS {args.steps} steps, "
            f"covariance={cov}",
        )

    # ---- ceiling: same denoiser on the clean training images, same total epochs
    t0 = time.perf_counter()
    main_est = ests["jacobian"]
    clean_net = make_denoiser(args.epochs * args.n_iter).set_params(device=device)
    clean_net.fit(torch.as_tensor(clean[train], dtype=torch.float32))
    saved = main_est.denoiser_
    try:
        main_est.denoiser_ = clean_net
        ceiling = posterior_mean(main_est)
    finally:
        main_est.denoiser_ = saved
    add(
        "ceiling: same prior trained on clean images",
        ceiling,
        time.perf_counter() - t0,
        f"{args.epochs * args.n_iter} epochs on clean images",
    )

    # ---- figure: observed / posterior samples / mean / truth
    k = 8
    show = np.arange(k)
    samples = np.asarray(
        main_est.sample_posterior(
            Y[test][show], operator[test][show], n_samples=3, random_state=args.seed
        )
    )
    mean = posterior_mean(main_est)[show]
    rows_img = {"observed": Y_nan[test][show]}
    for s in range(samples.shape[1]):
        rows_img[f"sample {s + 1}"] = np.clip(samples[:, s], -1, 1)
    rows_img["posterior mean"] = np.clip(mean, -1, 1)
    rows_img["truth"] = clean[test][show]
    fig_path = save_figure(
        image_grid(rows_img, IMAGE_SHAPE, title="Held-out digits, 75% missing (red), noise 0.05"),
        out / f"digits{tag}_posterior.png",
    )

    total = time.perf_counter() - t_all
    imputers = [r["PSNR missing (dB)"] for r in results if "Imputer" in r["method"]]
    em_psnr = next(r["PSNR missing (dB)"] for r in results if r["method"] == "DiffusionPriorEM")
    crit = {"DiffusionPriorEM above IterativeImputer and KNNImputer": em_psnr > max(imputers)}
    write_report(
        out / f"digits{tag}.md",
        args,
        results,
        history,
        crit,
        fig_path,
        total,
        device,
        n_train=len(train),
        n_test=len(test),
    )
    log(f"total {total:.0f} s; {crit}")
    return {"results": results, "criteria": crit, "history": history}


def write_report(
    path: Path,
    args: argparse.Namespace,
    results: list[dict[str, Any]],
    history: dict[str, list[dict[str, Any]]],
    crit: dict[str, bool],
    fig_path: Path,
    total: float,
    device: str,
    n_train: int,
    n_test: int,
) -> None:
    lines = [
        "# Digits benchmark: imputation of 75%-missing, noisy 8x8 digits",
        "",
        *machine_header(torch.device(device)),
        f"- wall time: {total:.0f} s",
        f"- data: scikit-learn digits scaled to [-1, 1], {args.missing:.0%} of pixels missing "
        f"per image, noise std {args.noise_std}; {n_train} training / {n_test} held-out images",
        "- metric: PSNR (data range 2) of the estimate (clipped to [-1, 1]) of the missing "
        "pixels of the held-out images (MSE pooled over all of them); diffusion priors use "
        "the posterior mean (`transform`)",
        f"- denoiser: {args.denoiser.upper()}"
        + (f" (width {args.hidden}, {args.blocks} blocks)" if args.denoiser == "mlp" else "")
        + f", {args.epochs} epochs per M-step, batch {args.batch_size}, lr {args.lr}; MMPS "
        f"{args.steps} steps, cg_iter {args.cg_iter}",
        "",
        "## Results",
        "",
        format_table(
            results, ["method", "PSNR missing (dB)", "fit+predict s", "note"], floatfmt=".2f"
        ),
        "",
        "## Criterion",
        "",
        *[f"- {k}: **{'yes' if v else 'no'}**" for k, v in crit.items()],
        "",
    ]
    for cov, rows in history.items():
        lines += [
            f"## EM history (covariance={cov})",
            "",
            format_table(rows, ["iteration", "train loss", "E-step s", "M-step s"]),
            "",
        ]
    lines += ["## Figure", "", f"![posterior samples]({fig_path.name})", ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
