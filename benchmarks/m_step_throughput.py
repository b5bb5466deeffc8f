r"""M-step throughput: diffem's denoiser training against a plain torch loop.

The M-step of EM trains the denoiser by denoising score matching
(``Denoiser.partial_fit``, through skorch). This script times those training steps against a
plain torch loop over the *same* module (a copy of the net's initial weights), the same loss
(log-uniform noise levels, :math:`x_t = x + \sigma z`, EDM preconditioning and weighting
:math:`\lambda(\sigma) = 1 / c_{\text{out}}^2`), the same optimizer (class and settings: by
default diffem's fused AdamW) and the same batch size. The plain loop shuffles by slicing a
permuted index and does nothing else: no gradient clipping, learning-rate schedule,
divergence checks, epoch snapshots or history, all of which the diffem side keeps at their
defaults. A second plain loop uses torch's default ``AdamW`` arguments (single-tensor kernels
on a CPU), which is what a user writing the loop would get.

Networks: :class:`~diffem.denoisers.MLPDenoiser` with its default backbone on ``D = 5`` (the
manifold experiment's size) and ``D = 64``; :class:`~diffem.denoisers.UNetDenoiser` and
:class:`~diffem.denoisers.TransformerDenoiser` with their defaults on 1x8x8 images (the
digits). Each timed call is one ``partial_fit`` over ``--samples`` rows for ``--epochs``
epochs (or the same number of steps of the plain loop); the calls are interleaved
(:func:`_common.timed_medians`), so that load changes of a shared machine hit all variants
alike, and the table reports steps per second from the median process CPU time (wall time
on CUDA) and the ratio to the plain loop::

    python benchmarks/m_step_throughput.py            # CPU, writes results/m_step_throughput.md
    python benchmarks/m_step_throughput.py --device cuda --out results/m_step_throughput_cuda.md
    python benchmarks/m_step_throughput.py --quick    # smoke run, writes nothing
"""

from __future__ import annotations

import argparse
import copy
import inspect
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from _common import RESULTS_DIR, machine_header, markdown_table, resolve_device, timed_medians


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--samples", type=int, default=4096, help="rows per partial_fit call")
    p.add_argument("--epochs", type=int, default=2, help="epochs per partial_fit call")
    p.add_argument("--image-samples", type=int, default=1024, help="rows for the image nets")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--networks",
        nargs="+",
        default=["mlp5", "mlp64", "unet", "transformer"],
        choices=["mlp5", "mlp64", "unet", "transformer"],
    )
    p.add_argument("--quick", action="store_true", help="tiny smoke run, writes nothing")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="Markdown file (default results/...)")
    return p.parse_args(argv)


def plain_loop(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    X: Tensor,
    batch_size: int,
    epochs: int,
    sigma_min: float,
    sigma_max: float,
    sigma_data: float,
    generator: torch.Generator,
) -> Callable[[], int]:
    """A closure running ``epochs`` epochs of EDM denoising score matching in plain torch."""
    log_min, log_max = math.log(sigma_min), math.log(sigma_max)
    n = len(X)

    def run() -> int:
        steps = 0
        module.train()
        for _ in range(epochs):
            index = torch.randperm(n, generator=generator)
            for start in range(0, n, batch_size):
                x = X[index[start : start + batch_size]]
                u = torch.rand(len(x), generator=generator, device=X.device)
                sigma = torch.exp(log_min + u * (log_max - log_min))
                z = torch.randn(x.shape, generator=generator, device=X.device)
                s = sigma[:, None]
                x_t = x + s * z
                c_in = 1 / torch.sqrt(s**2 + sigma_data**2)
                c_skip = sigma_data**2 / (s**2 + sigma_data**2)
                c_out = s * sigma_data * c_in
                denoised = c_skip * x_t + c_out * module(c_in * x_t, torch.log(sigma) / 4)
                weight = 1 / c_out[:, 0] ** 2
                loss = (weight * (denoised - x).square().mean(1)).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                steps += 1
        return steps

    return run


def cases(args: argparse.Namespace) -> list[tuple[str, Any, int]]:
    """(name, unfitted denoiser, number of rows) of the compared networks."""
    from diffem import denoisers

    common = {"batch_size": args.batch_size, "max_epochs": args.epochs, "random_state": 0}
    image = {"image_shape": (1, 8, 8), **common}
    available = {
        "mlp5": ("MLP, D = 5", denoisers.MLPDenoiser(**common), 5),
        "mlp64": ("MLP, D = 64", denoisers.MLPDenoiser(**common), 64),
        "unet": ("U-Net, 1x8x8", denoisers.UNetDenoiser(**image), 64),
        "transformer": ("Transformer, 1x8x8", denoisers.TransformerDenoiser(**image), 64),
    }
    return [available[name] for name in args.networks]


def parts(args: argparse.Namespace, device: torch.device) -> list[list[str]]:
    """Milliseconds per call of the pieces the training loop chooses between, on the default
    MLP (``D = 64``) after one backward pass of a batch: an AdamW step with torch's fused,
    multi-tensor (``foreach``) and single-tensor kernels; gradient clipping, and the norm
    alone (what recomputing it would cost); the epoch snapshot of the weights and optimizer
    state by :func:`diffem.denoisers.base._cloned` and by ``copy.deepcopy``."""
    from diffem.denoisers import MLPDenoiser
    from diffem.denoisers.base import _cloned

    net = MLPDenoiser(random_state=0, device=str(device)).initialize_for(64)
    module = net.module_
    x = torch.randn(args.batch_size, 64, device=device)
    c_noise = torch.zeros(args.batch_size, device=device)
    module(x, c_noise).square().mean().backward()
    calls = 20

    def repeated(function: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(calls):
                function()

        return run

    functions: dict[str, Callable[[], None]] = {}
    for kernel in ("fused", "foreach", "single"):
        options = {"fused": True} if kernel == "fused" else {"foreach": kernel == "foreach"}
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-9, **options)
        optimizer.step()  # allocates the moments
        functions[f"AdamW step ({kernel})"] = repeated(optimizer.step)
    params = list(module.parameters())
    functions["clip_grad_norm_ (norm and scaling)"] = repeated(
        lambda: torch.nn.utils.clip_grad_norm_(params, 1e9)
    )
    functions["gradient norm alone"] = repeated(
        lambda: torch.nn.utils.get_total_norm([p.grad for p in params])
    )
    state = {"module": module.state_dict(), "optimizer": optimizer.state_dict()}
    functions["epoch snapshot, _cloned"] = repeated(lambda: _cloned(state))
    functions["epoch snapshot, copy.deepcopy"] = repeated(lambda: copy.deepcopy(state))
    timings = timed_medians(functions, device, repeats=args.repeats)
    column = 0 if device.type == "cuda" else 1
    return [[name, f"{1e3 * value[column] / calls:.3f}"] for name, value in timings.items()]


def main(argv: list[str] | None = None) -> list[list[str]]:
    args = parse_args(argv)
    if args.quick:
        args.samples, args.image_samples, args.epochs, args.repeats = 512, 256, 1, 2
    device = resolve_device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = []
    for name, net, features in cases(args):
        image = "x" in name
        n = args.image_samples if image else args.samples
        g = torch.Generator().manual_seed(args.seed)
        X = torch.randn(n, features, generator=g).to(device)
        net.set_params(device=str(device), max_epochs=args.epochs)
        net.initialize_for(features)
        module = copy.deepcopy(net.module_)
        accepted = inspect.signature(type(net.optimizer_)).parameters
        params = {k: v for k, v in net.optimizer_.defaults.items() if k in accepted}
        optimizer = type(net.optimizer_)(module.parameters(), **params)
        default_module = copy.deepcopy(net.module_)
        default_optimizer = torch.optim.AdamW(default_module.parameters(), lr=net.lr)
        plain, plain_default = (
            plain_loop(
                m,
                o,
                X,
                args.batch_size,
                args.epochs,
                net.sigma_min,
                net.sigma_max,
                net.sigma_data,
                torch.Generator(device=device).manual_seed(1),
            )
            for m, o in ((module, optimizer), (default_module, default_optimizer))
        )
        steps = math.ceil(n / args.batch_size) * args.epochs

        def diffem_fit(net: Any = net, X: Tensor = X) -> None:
            net.partial_fit(X)

        timings = timed_medians(
            {"diffem": diffem_fit, "plain": plain, "plain, torch defaults": plain_default},
            device,
            repeats=args.repeats,
        )
        column = 0 if device.type == "cuda" else 1
        rate = {key: steps / value[column] for key, value in timings.items()}
        kernel = (
            "fused" if params.get("fused") else "foreach" if params.get("foreach") else "single"
        )
        rows.append(
            [
                name,
                f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f}M",
                f"{type(net.optimizer_).__name__} ({kernel})",
                f"{rate['diffem']:.1f}",
                f"{rate['plain']:.1f}",
                f"{rate['plain, torch defaults']:.1f}",
                f"{rate['diffem'] / rate['plain']:.2f}",
                f"{rate['diffem'] / rate['plain, torch defaults']:.2f}",
            ]
        )
        print(f"  {name}: {rows[-1][3:]} ({time.perf_counter() - start:.0f} s)", flush=True)

    measure = "wall" if device.type == "cuda" else "process CPU"
    header = [
        "network",
        "params",
        "optimizer",
        "diffem steps/s",
        "plain steps/s",
        "plain (torch AdamW defaults) steps/s",
        "diffem / plain",
        "diffem / plain (defaults)",
    ]
    table = markdown_table(header, rows)
    print(table)
    parts_table = markdown_table(["part (default MLP, D = 64)", "ms per call"], parts(args, device))
    print(parts_table)
    if args.quick and args.out is None:
        return rows
    out = Path(args.out) if args.out else RESULTS_DIR / "m_step_throughput.md"
    lines = [
        "# M-step throughput: diffem's denoiser training against a plain torch loop",
        "",
        *machine_header(device),
        f"- settings: batch {args.batch_size}, {args.samples} rows (image nets "
        f"{args.image_samples}) and {args.epochs} epochs per timed call, steps/s from the "
        f"median {measure} time of {args.repeats} interleaved calls after one warm-up call; "
        f"total wall time {time.perf_counter() - start:.0f} s",
        "- diffem: `partial_fit` with the denoiser's defaults (cosine learning-rate schedule, "
        "gradient clipping at 1, divergence checks, per-epoch snapshot, skorch history); "
        "plain: the same module, loss, optimizer and batch size in a bare torch loop",
        "",
        table,
        "",
        "## The parts the training loop chooses between",
        "",
        f"One call each after a backward pass at batch {args.batch_size}; median {measure} "
        f"time of {args.repeats} interleaved rounds of 20 calls.",
        "",
        parts_table,
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
