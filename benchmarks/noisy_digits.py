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
import sys
import time
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
    p.add_argument("--posterior-samples", type=int, default=8, help="samples per image")
    p.add_argument("--test-size", type=float, default=0.2)
    p.add_argument("--quick", action="store_true", help="tiny run (smoke test), writes nothing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: default)")
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
    return TransformerDenoiser(image_shape=IMAGE_SHAPE, module__patch_size=2, **common)


def psnr(estimate: np.ndarray, truth: np.ndarray) -> float:
    """PSNR (data range 2) of ``estimate`` clipped to [-1, 1], MSE pooled over all pixels."""
    from diffem.metrics import psnr as _psnr

    est = np.clip(np.asarray(estimate, dtype=np.float64), -1.0, 1.0)
    return float(_psnr(truth, est, data_range=2.0, reduction="pooled"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from sklearn.datasets import load_digits

    from diffem import DiffusionPriorEM
    from diffem.operators import Identity
    from diffem.plotting import image_grid, save_figure
    from diffem.samplers import MMPS

    if args.quick:
        args.n_iter, args.epochs, args.steps, args.posterior_samples = 1, 2, 8, 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t_all = time.perf_counter()

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
        {"prior": "none (noisy images)", "PSNR": psnr(Y[test], clean[test]), "fit s": 0.0}
    ]
    figure_rows: dict[str, np.ndarray] = {"noisy": Y[test][:10]}

    def make_em(denoiser: Any, n_iter: int) -> Any:
        return DiffusionPriorEM(
            denoiser=denoiser,
            sampler=MMPS(steps=args.steps, cg_iter=args.cg_iter),
            n_iter=n_iter,
            n_transform_samples=args.posterior_samples,
            device="cpu",
            random_state=args.seed,
            verbose=max(args.verbose - 1, 0),
        )

    tic = time.perf_counter()
    gaussian = make_em(None, 0).fit(Y[train], operator)
    rows.append(
        {
            "prior": "Gaussian (PPCA, EM's initialisation)",
            "PSNR": psnr(gaussian.transform(Y[test], operator), clean[test]),
            "fit s": time.perf_counter() - tic,
        }
    )
    log(f"{rows[-1]['prior']}: {rows[-1]['PSNR']:.2f} dB")
    figure_rows["Gaussian mean"] = gaussian.transform(Y[test][:10], operator)

    for kind in args.denoisers:
        name = NAMES[kind]
        tic = time.perf_counter()
        est = make_em(make_denoiser(kind, args), args.n_iter).fit(Y[train], operator)
        fit_seconds = time.perf_counter() - tic
        tic = time.perf_counter()
        mean = est.transform(Y[test], operator)
        transform_seconds = time.perf_counter() - tic
        y_test = torch.as_tensor(Y[test], dtype=torch.float32)
        with torch.no_grad():
            tweedie = est.denoiser_(y_test, args.noise_std).numpy()
        params = sum(p.numel() for p in est.denoiser_.module_.parameters())
        rows.append(
            {
                "prior": f"EM, {name} ({params / 1e6:.2f}M parameters)",
                "PSNR": psnr(mean, clean[test]),
                "Tweedie PSNR": psnr(tweedie, clean[test]),
                "fit s": fit_seconds,
                "transform s": transform_seconds,
            }
        )
        log(
            f"{rows[-1]['prior']}: {rows[-1]['PSNR']:.2f} dB (Tweedie "
            f"{rows[-1]['Tweedie PSNR']:.2f} dB), fit {fit_seconds:.0f} s"
        )
        samples = est.sample_posterior(Y[test][:10], operator, n_samples=2, random_state=0)
        figure_rows[f"{name} sample 1"] = samples[:, 0]
        figure_rows[f"{name} sample 2"] = samples[:, 1]
        figure_rows[f"{name} mean"] = mean[:10]
    figure_rows["truth"] = clean[test][:10]
    total = time.perf_counter() - t_all
    table = markdown_table(
        ["prior", "PSNR (dB)", "Tweedie PSNR (dB)", "fit s", "transform s"],
        [
            [
                row["prior"],
                f"{row['PSNR']:.2f}",
                f"{row['Tweedie PSNR']:.2f}" if "Tweedie PSNR" in row else "-",
                f"{row['fit s']:.0f}",
                f"{row['transform s']:.0f}" if "transform s" in row else "-",
            ]
            for row in rows
        ],
    )
    print(table)
    if args.quick:
        return {"rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figure = image_grid(
        {k: np.clip(v, -1, 1) for k, v in figure_rows.items()},
        IMAGE_SHAPE,
        vmin=-1.0,
        vmax=1.0,
        title=f"Held-out digits, noise {args.noise_std}: posterior samples and means",
    )
    fig_path = save_figure(figure, out / "noisy_digits.png")
    lines = [
        "# Noisy digits: priors learned by EM from noisy images only",
        "",
        *machine_header(torch.device("cpu")),
        f"- wall time: {total:.0f} s",
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
        f"![posterior samples]({fig_path.name})",
        "",
    ]
    (out / "noisy_digits.md").write_text("\n".join(lines))
    log(f"total {total:.0f} s; wrote {out / 'noisy_digits.md'}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
