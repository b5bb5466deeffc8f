r"""The seminar's example: a digits prior learned by EM from noisy images only, on a CPU.

The seminar on Rozet et al. (2024) shows an MNIST prior learned on a CPU with a transformer
denoiser from noisy images alone. This script runs that experiment at the scale of
scikit-learn's bundled 8x8 digits (no download): every image :math:`x \in [-1, 1]^{64}` is
seen once, as :math:`y = x + \sigma_y \epsilon` (identity operator, ``--noise-std``, default
0.2), and ``DiffusionPriorEM`` learns the prior from the noisy training images with an MLP,
a U-Net and a diffusion-transformer denoiser side by side. For held-out noisy images it
reports the PSNR (data range 2) against the clean images of

* the noisy images themselves;
* the posterior mean under the Gaussian (PPCA) prior EM starts from (exact);
* each learned prior's posterior mean (``transform``: the average of MMPS samples);
* each learned prior's Tweedie estimate :math:`D_\theta(y, \sigma_y)`: with an identity
  operator and Gaussian noise, :math:`p(x \mid y)` is the diffusion posterior
  :math:`p(x \mid x_t = y)` at :math:`\sigma_t = \sigma_y`, whose mean is the denoiser's output
  (one network call, no sampler: a check of the posterior sampler),

with the wall time of each fit, and draws a figure of posterior samples
(``noisy_digits.png``)::

    python benchmarks/noisy_digits.py                        # writes results/noisy_digits.md
    python benchmarks/noisy_digits.py --denoisers mlp --quick
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from _common import machine_header, markdown_table

IMAGE_SHAPE = (1, 8, 8)
NAMES = {"mlp": "MLP", "unet": "U-Net", "transformer": "Transformer"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--noise-std", type=float, default=0.2, help="sigma_y on the [-1, 1] scale")
    p.add_argument("--denoisers", nargs="+", default=list(NAMES), choices=list(NAMES))
    p.add_argument("--n-iter", type=int, default=4, help="EM iterations")
    p.add_argument("--epochs", type=int, default=32, help="epochs per M-step")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=32, help="MMPS steps")
    p.add_argument("--cg-iter", type=int, default=1)
    p.add_argument("--posterior-samples", type=int, default=4, help="samples per image")
    p.add_argument("--test-size", type=float, default=0.2)
    p.add_argument(
        "--ceiling",
        action="store_true",
        help="also train each denoiser on the clean training images (same optimizer steps)",
    )
    p.add_argument("--skip-em", action="store_true", help="no EM fits (with --ceiling)")
    p.add_argument("--name", default="noisy_digits", help="file name of the results")
    p.add_argument("--quick", action="store_true", help="tiny run (smoke test), writes nothing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--verbose", type=int, default=1)
    return p.parse_args(argv)


def make_denoiser(kind: str, args: argparse.Namespace) -> Any:
    """The compared denoisers, sized for a CPU (log-normal training noise levels)."""
    from diffem.denoisers import MLPDenoiser, TransformerDenoiser, UNetDenoiser

    common = {
        "max_epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "sigma_distribution": "log_normal",
        "random_state": args.seed,
    }
    if kind == "mlp":
        return MLPDenoiser(**common)
    if kind == "unet":
        return UNetDenoiser(image_shape=IMAGE_SHAPE, module__channels=(16, 32), **common)
    return TransformerDenoiser(
        image_shape=IMAGE_SHAPE,
        module__patch_size=2,
        module__hidden_features=64,
        module__n_blocks=4,
        module__heads=4,
        **common,
    )


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    """Wall and process CPU seconds since ``start`` (:func:`_clock`)."""
    wall, cpu = _clock()
    return wall - start[0], cpu - start[1]


def _seconds(row: dict[str, Any], key: str) -> list[str]:
    return [f"{v:.0f}" for v in row[key]] if key in row else ["-", "-"]


def psnr(estimate: np.ndarray, truth: np.ndarray) -> float:
    """PSNR (data range 2) of ``estimate`` clipped to [-1, 1], MSE pooled over all pixels."""
    from diffem.metrics import psnr as _psnr

    est = np.clip(np.asarray(estimate, dtype=np.float64), -1.0, 1.0)
    return float(_psnr(truth, est, data_range=2.0, reduction="pooled"))


def ceiling_rows(
    args: argparse.Namespace,
    clean_train: np.ndarray,
    y_test: np.ndarray,
    clean_test: np.ndarray,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    r"""Each denoiser trained on the *clean* training images for the optimizer steps of all of
    EM's M-steps (``n_iter * epochs`` epochs, one cosine schedule), with EM's data scale; the
    PSNR of its exact posterior mean :math:`D(y, \sigma_y)` on the held-out noisy images."""
    rows = []
    sigma_data = float(np.sqrt(np.mean(clean_train**2)))
    for kind in args.denoisers:
        net = make_denoiser(kind, args).set_params(
            max_epochs=args.n_iter * args.epochs, sigma_data=sigma_data
        )
        tic = _clock()
        net.fit(torch.as_tensor(clean_train, dtype=torch.float32))
        fit_seconds = _since(tic)
        with torch.no_grad():
            tweedie = net(torch.as_tensor(y_test, dtype=torch.float32), args.noise_std).numpy()
        rows.append(
            {
                "prior": f"{NAMES[kind]} trained on the clean images (ceiling)",
                "Tweedie PSNR": psnr(tweedie, clean_test),
                "fit": fit_seconds,
            }
        )
        log(f"{rows[-1]['prior']}: Tweedie {rows[-1]['Tweedie PSNR']:.2f} dB")
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from sklearn.datasets import load_digits

    from diffem import DiffusionPriorEM
    from diffem.operators import Identity
    from diffem.plotting import image_grid, save_figure
    from diffem.samplers import MMPS, SMC

    if args.quick:
        args.n_iter, args.epochs, args.steps, args.posterior_samples = 1, 2, 8, 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    load_start = os.getloadavg()[0]

    def log(message: str) -> None:
        if args.verbose:
            print(message, flush=True)

    clean = load_digits().data / 8.0 - 1.0
    rng = np.random.RandomState(args.seed)
    Y = clean + args.noise_std * rng.standard_normal(clean.shape)
    perm = rng.permutation(len(clean))
    n_test = round(args.test_size * len(clean))
    test, train = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    if args.quick:
        train, test = train[:256], test[:32]
    operator = Identity(clean.shape[1], noise_std=args.noise_std)
    log(
        f"noisy digits: {len(train)} training / {len(test)} held-out images, noise {args.noise_std}"
    )

    rows: list[dict[str, Any]] = [
        {"prior": "none (noisy images)", "PSNR": psnr(Y[test], clean[test])}
    ]
    figure_rows: dict[str, np.ndarray] = {"noisy": Y[test][:10]}

    def make_em(denoiser: Any, n_iter: int) -> Any:
        # The paper's plain EM (one MMPS sample per observation, the network not refining the
        # Gaussian, every iteration kept) with the evidence tracked cheaply on 32 images; the
        # estimator's recipe defaults (SMC E-step, 64-particle evidence on 128 rows) would cost
        # the U-Net and the transformer hours on a CPU.
        return DiffusionPriorEM(
            denoiser=denoiser,
            sampler=MMPS(steps=args.steps, cg_iter=args.cg_iter),
            e_step_samples=1,
            refine_init=False,
            evidence_sampler=SMC(steps=args.steps, particles=8, cg_iter=args.cg_iter),
            evidence_rows=32,
            tol=None,
            n_iter_no_change=None,
            keep_best=False,
            n_iter=n_iter,
            n_transform_samples=args.posterior_samples,
            device="cpu",
            random_state=args.seed,
            verbose=max(args.verbose - 1, 0),
        )

    tic = _clock()
    gaussian = make_em(None, 0).fit(Y[train], operator)
    rows.append(
        {
            "prior": "Gaussian (PPCA, EM's initialisation)",
            "PSNR": psnr(gaussian.transform(Y[test], operator), clean[test]),
            "fit": _since(tic),
        }
    )
    log(f"{rows[-1]['prior']}: {rows[-1]['PSNR']:.2f} dB")
    figure_rows["Gaussian mean"] = gaussian.transform(Y[test][:10], operator)

    for kind in [] if args.skip_em else args.denoisers:
        name = NAMES[kind]
        tic = _clock()
        est = make_em(make_denoiser(kind, args), args.n_iter).fit(Y[train], operator)
        fit_seconds = _since(tic)
        tic = _clock()
        mean = est.transform(Y[test], operator)
        transform_seconds = _since(tic)
        y_test = torch.as_tensor(Y[test], dtype=torch.float32)
        with torch.no_grad():
            tweedie = est.denoiser_(y_test, args.noise_std).numpy()
        params = sum(p.numel() for p in est.denoiser_.module_.parameters())
        rows.append(
            {
                "prior": f"EM, {name} ({params / 1e6:.2f}M parameters)",
                "PSNR": psnr(mean, clean[test]),
                "Tweedie PSNR": psnr(tweedie, clean[test]),
                "fit": fit_seconds,
                "transform": transform_seconds,
            }
        )
        log(
            f"{rows[-1]['prior']}: {rows[-1]['PSNR']:.2f} dB (Tweedie "
            f"{rows[-1]['Tweedie PSNR']:.2f} dB), fit {fit_seconds[0]:.0f} s wall, "
            f"{fit_seconds[1]:.0f} s CPU"
        )
        samples = est.sample_posterior(Y[test][:10], operator, n_samples=2, random_state=0)
        figure_rows[f"{name} sample 1"] = samples[:, 0]
        figure_rows[f"{name} sample 2"] = samples[:, 1]
        figure_rows[f"{name} mean"] = mean[:10]
    if args.ceiling:
        rows.extend(ceiling_rows(args, clean[train], Y[test], clean[test], log))
    figure_rows["truth"] = clean[test][:10]
    total = time.perf_counter() - t_all
    table = markdown_table(
        [
            "prior",
            "PSNR (dB)",
            "Tweedie PSNR (dB)",
            "fit wall s",
            "fit CPU s",
            "transform wall s",
            "transform CPU s",
        ],
        [
            [
                row["prior"],
                f"{row['PSNR']:.2f}" if "PSNR" in row else "-",
                f"{row['Tweedie PSNR']:.2f}" if "Tweedie PSNR" in row else "-",
                *_seconds(row, "fit"),
                *_seconds(row, "transform"),
            ]
            for row in rows
        ],
    )
    print(table)
    if args.quick:
        return {"rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figure_lines = []
    if not args.skip_em:
        figure = image_grid(
            {k: np.clip(v, -1, 1) for k, v in figure_rows.items()},
            IMAGE_SHAPE,
            vmin=-1.0,
            vmax=1.0,
            title=f"Held-out digits, noise {args.noise_std}: posterior samples and means",
        )
        fig_path = save_figure(figure, out / f"{args.name}.png")
        figure_lines = [f"![posterior samples]({fig_path.name})", ""]
    lines = [
        "# Noisy digits: "
        + (
            "denoisers trained on the clean images"
            if args.skip_em
            else "priors learned by EM from noisy images only"
        ),
        "",
        *machine_header(torch.device("cpu")),
        f"- wall time: {total:.0f} s with {torch.get_num_threads()} torch threads; load "
        f"average of the (shared) machine {load_start:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end (wall times grow with it)",
        f"- data: scikit-learn digits on [-1, 1], each seen once with Gaussian noise std "
        f"{args.noise_std} (identity operator); {len(train)} training / {len(test)} held-out "
        "images",
        f"- EM: {args.n_iter} iterations from the Gaussian initialisation, {args.epochs} epochs "
        f"per M-step (batch {args.batch_size}, lr {args.lr}, log-normal training noise "
        f"levels); E-step and transform: MMPS {args.steps} steps, cg_iter {args.cg_iter}; "
        f"posterior mean over {args.posterior_samples} samples",
        "- PSNR (data range 2) against the clean held-out images; Tweedie: the denoiser's "
        "output at the observation noise level, the exact posterior mean of the learned prior",
        "",
        table,
        "",
        *figure_lines,
    ]
    (out / f"{args.name}.md").write_text("\n".join(lines))
    log(f"total {total:.0f} s; wrote {out / f'{args.name}.md'}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
