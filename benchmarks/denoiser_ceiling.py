r"""The digits ceiling: how good a prior can each denoiser learn from *clean* digits?

The digits benchmark (``digits.py``: scikit-learn's 8x8 digits on [-1, 1], 75% of the pixels
missing, noise 0.05) scores a prior by the PSNR of its posterior mean on the missing pixels of
held-out images. EM can at best match the same denoiser trained on the clean training images,
so this script measures that ceiling for candidate denoisers (architecture, size, training
noise levels, training budget), next to priors with exact posteriors:

* the Gaussian (PPCA) prior EM starts from, fitted to the corrupted training images
  (``fit_gaussian``, as ``DiffusionPriorEM``'s initialisation);
* a full-covariance Gaussian and a Gaussian mixture (scikit-learn's ``GaussianMixture``)
  fitted to the clean training images, whose exact posterior means show what a better prior
  is worth on this metric.

Each candidate is trained on the clean training images (``sigma_data`` set from them, as the
estimator does), then

* its denoising error :math:`E\lVert D(x + \sigma z, \sigma) - x \rVert^2 / D` on the held-out
  clean images at a few noise levels (cheap, no sampling), against the exact Gaussian
  denoiser's;
* the PSNR of its posterior mean: the average of ``--posterior-samples`` MMPS samples per
  image (what ``DiffusionPriorEM.transform`` computes), and that PSNR with the Monte Carlo
  error of the average removed (``K -> inf``: the MSE of a ``K``-sample mean is the MSE of
  the posterior mean plus the posterior variance over ``K``, estimated from the samples'
  spread).

Writes ``denoiser_ceiling.md`` to ``--out``::

    python benchmarks/denoiser_ceiling.py                       # the default candidates
    python benchmarks/denoiser_ceiling.py --candidates mlp mlp-lognormal --posterior-samples 8
"""

from __future__ import annotations

import argparse
import math
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
from digits import IMAGE_SHAPE, psnr_missing

SIGMAS = (0.1, 0.4, 1.6)


def candidates(epochs: int, batch_size: int, lr: float) -> dict[str, tuple[Callable[[], Any], str]]:
    """Named factories of unfitted denoisers, with a description."""
    from diffem.denoisers import MLPDenoiser, TransformerDenoiser, UNetDenoiser

    common = {"batch_size": batch_size, "lr": lr, "random_state": 0}
    short = {"max_epochs": epochs, **common}
    lognormal = {"sigma_distribution": "log_normal"}
    image = {"image_shape": IMAGE_SHAPE}
    return {
        "mlp": (lambda: MLPDenoiser(**short), f"MLP 256x3, log-uniform sigma, {epochs} epochs"),
        "mlp-lognormal": (
            lambda: MLPDenoiser(**short, **lognormal),
            f"MLP 256x3, log-normal sigma, {epochs} epochs",
        ),
        "mlp-lognormal-long": (
            lambda: MLPDenoiser(max_epochs=4 * epochs, **common, **lognormal),
            f"MLP 256x3, log-normal sigma, {4 * epochs} epochs",
        ),
        "mlp-wide": (
            lambda: MLPDenoiser(**short, module__hidden_features=512, module__n_blocks=4),
            f"MLP 512x4, log-uniform sigma, {epochs} epochs",
        ),
        "unet": (
            lambda: UNetDenoiser(**image, **short, module__channels=(16, 32)),
            f"U-Net (16, 32), log-uniform sigma, {epochs} epochs",
        ),
        "unet-lognormal": (
            lambda: UNetDenoiser(**image, **short, **lognormal, module__channels=(16, 32)),
            f"U-Net (16, 32), log-normal sigma, {epochs} epochs",
        ),
        "transformer-lognormal": (
            lambda: TransformerDenoiser(**image, **short, **lognormal, module__patch_size=4),
            f"Transformer 128x4, patch 4, log-normal sigma, {epochs} epochs",
        ),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--candidates", nargs="+", default=["mlp", "mlp-lognormal"])
    p.add_argument("--epochs", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--posterior-samples", type=int, default=16, help="K samples per image")
    p.add_argument("--eval-images", type=int, default=0, help="held-out images (0: all)")
    p.add_argument("--steps", type=int, default=64, help="MMPS steps")
    p.add_argument("--cg-iter", type=int, default=3)
    p.add_argument("--solver", default="dpmpp_2m")
    p.add_argument("--gmm-components", type=int, default=20)
    p.add_argument("--missing", type=float, default=0.75)
    p.add_argument("--noise-std", type=float, default=0.05)
    p.add_argument("--test-size", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--tag", default="")
    return p.parse_args(argv)


def split(args: argparse.Namespace) -> dict[str, Any]:
    """The corrupted digits and the training / held-out split of ``digits.py``."""
    from diffem.datasets import load_digits_corrupted

    clean, Y, operator = load_digits_corrupted(
        missing=args.missing, noise_std=args.noise_std, random_state=args.seed
    )
    clean = np.asarray(clean, dtype=np.float64)
    perm = np.random.RandomState(args.seed).permutation(len(clean))
    n_test = round(args.test_size * len(clean))
    test, train = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    if args.eval_images:
        test = test[: args.eval_images]
    Y = operator.prepare(torch.as_tensor(np.asarray(Y), dtype=torch.float32))
    observed = np.broadcast_to(np.asarray(operator.observed.cpu(), dtype=bool), Y.shape)
    return {
        "clean": clean,
        "Y": Y,
        "operator": operator,
        "train": train,
        "test": test,
        "missing": ~observed[test],
    }


def denoising_errors(denoiser: Any, x: torch.Tensor, seed: int = 0) -> list[float]:
    """Mean squared error per pixel of ``denoiser`` on ``x + sigma z`` at each of SIGMAS."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for sigma in SIGMAS:
        x_t = x + sigma * torch.randn(x.shape, generator=g)
        with torch.no_grad():
            out.append(float((denoiser(x_t, sigma) - x).square().mean()))
    return out


def posterior_mean_psnr(
    denoiser: Any, sampler: Any, data: dict[str, Any], k: int, seed: int
) -> tuple[float, float, float]:
    """PSNR of the ``k``-sample posterior mean, that PSNR as ``k -> inf``, and seconds."""
    test = data["test"]
    rows = torch.as_tensor(np.repeat(test, k))
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    samples = []
    for chunk in torch.split(rows, 2048):
        y, op = data["Y"][chunk], data["operator"][chunk]
        samples.append(sampler.sample(denoiser, y, op, generator=generator))
    seconds = time.perf_counter() - start
    x = torch.cat(samples).reshape(len(test), k, -1).double().numpy()
    mean, truth, missing = x.mean(1), data["clean"][test], data["missing"]
    psnr_k = psnr_missing(mean, truth, missing)
    mse_k = float(np.mean((np.clip(mean, -1, 1) - truth)[missing] ** 2))
    variance = float(np.mean(x.var(1, ddof=1)[missing]))
    mse_inf = max(mse_k - variance / k, 1e-12)
    return psnr_k, 10 * math.log10(4.0 / mse_inf), seconds


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    from sklearn.mixture import GaussianMixture

    from diffem.priors import GaussianMixturePrior, GaussianPrior, fit_gaussian
    from diffem.samplers import MMPS

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    data = split(args)
    Y, op, clean = data["Y"], data["operator"], data["clean"]
    train, test = data["train"], data["test"]
    x_train = torch.as_tensor(clean[train], dtype=torch.float32)
    x_test = torch.as_tensor(clean[test], dtype=torch.float32)
    x64 = x_train.double()
    sigma_data = math.sqrt(float(x64.var(0).mean() + (x64.mean(0) ** 2).mean()))
    rows: list[dict[str, Any]] = []

    def exact_row(name: str, prior: Any, seconds: float, note: str) -> None:
        mean = prior.posterior_mean(Y[test], op[test])
        psnr = psnr_missing(np.asarray(mean), clean[test], data["missing"])
        errors = denoising_errors(prior.to(dtype=torch.float32), x_test, args.seed)
        rows.append(
            {
                "prior": name,
                "PSNR": psnr,
                "PSNR K->inf": psnr,
                **{f"MSE s={s}": e for s, e in zip(SIGMAS, errors, strict=True)},
                "train s": seconds,
                "sample s": 0.0,
                "note": note,
            }
        )
        print(f"{name}: {psnr:.2f} dB", flush=True)

    tic = time.perf_counter()
    ppca = fit_gaussian(
        Y[train], op[train], n_iter=16, generator=torch.Generator().manual_seed(args.seed)
    )
    exact_row(
        "Gaussian (PPCA) from corrupted images",
        ppca,
        time.perf_counter() - tic,
        "EM's initialisation; exact posterior mean",
    )
    tic = time.perf_counter()
    gauss = GaussianPrior(x64.mean(0), torch.cov(x64.T) + 1e-6 * torch.eye(x64.shape[1]))
    exact_row(
        "Gaussian from clean images",
        gauss,
        time.perf_counter() - tic,
        "sample mean and covariance; exact posterior mean",
    )
    tic = time.perf_counter()
    gmm = GaussianMixture(
        args.gmm_components, covariance_type="full", reg_covar=3e-2, random_state=args.seed
    ).fit(clean[train])
    exact_row(
        f"Gaussian mixture ({args.gmm_components}) from clean images",
        GaussianMixturePrior(gmm.weights_, gmm.means_, gmm.covariances_),
        time.perf_counter() - tic,
        "scikit-learn GaussianMixture, reg_covar 0.03; exact posterior mean",
    )

    sampler = MMPS(
        steps=args.steps,
        cg_iter=args.cg_iter,
        solver=args.solver,
        warm_start=True,
        sigma_data=sigma_data,
    )
    registry = candidates(args.epochs, args.batch_size, args.lr)
    for name in args.candidates:
        factory, note = registry[name]
        net = factory().set_params(sigma_data=sigma_data)
        tic = time.perf_counter()
        net.fit(x_train)
        seconds = time.perf_counter() - tic
        sampler.set_params(sigma_min=net.sigma_min, sigma_max=net.sigma_max)
        errors = denoising_errors(net, x_test, args.seed)
        psnr_k, psnr_inf, sample_seconds = posterior_mean_psnr(
            net, sampler, data, args.posterior_samples, args.seed
        )
        params = sum(p.numel() for p in net.module_.parameters())
        rows.append(
            {
                "prior": name,
                "PSNR": psnr_k,
                "PSNR K->inf": psnr_inf,
                **{f"MSE s={s}": e for s, e in zip(SIGMAS, errors, strict=True)},
                "train s": seconds,
                "sample s": sample_seconds,
                "note": f"{note}; {params / 1e6:.2f}M parameters",
            }
        )
        print(
            f"{name}: {psnr_k:.2f} dB (K->inf {psnr_inf:.2f}), errors "
            f"{[round(e, 4) for e in errors]}, {seconds:.0f} s + {sample_seconds:.0f} s",
            flush=True,
        )
    write_report(args, rows, time.perf_counter() - t_all, len(train), len(test))
    return rows


def write_report(
    args: argparse.Namespace, rows: list[dict[str, Any]], total: float, n_train: int, n_test: int
) -> None:
    header = ["prior", "PSNR", "PSNR K->inf", *[f"MSE s={s}" for s in SIGMAS]]
    header += ["train s", "sample s", "note"]
    table = markdown_table(
        header,
        [
            [
                f"{row[h]:.4f}"
                if h.startswith("MSE")
                else f"{row[h]:.2f}"
                if isinstance(row[h], float)
                else str(row[h])
                for h in header
            ]
            for row in rows
        ],
    )
    lines = [
        "# Digits ceiling: priors trained on the clean digits",
        "",
        *machine_header(torch.device("cpu")),
        f"- wall time: {total:.0f} s",
        f"- data: scikit-learn digits on [-1, 1], {args.missing:.0%} of pixels missing, noise "
        f"std {args.noise_std}; {n_train} training / {n_test} held-out images (the split of "
        "`digits.py`)",
        f"- denoisers: {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, trained on "
        "the clean training images; posterior: MMPS "
        f"({args.steps} steps, cg_iter {args.cg_iter}, solver {args.solver}, warm start), "
        f"{args.posterior_samples} samples per image",
        "- PSNR (dB): posterior mean on the missing pixels of the held-out images; "
        "`K->inf` removes the Monte Carlo error of the K-sample mean; MSE s: denoising error "
        "per pixel on the held-out clean images at noise level s",
        "",
        table,
        "",
    ]
    tag = f"_{args.tag}" if args.tag else ""
    out = Path(args.out) / f"denoiser_ceiling{tag}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
