r"""Cost of moment-matching posterior sampling relative to unconditional sampling.

MMPS (Rozet, Andry, Lanusse & Louppe, 2024, "Learning diffusion priors from observations by
expectation maximization", NeurIPS, section 4) replaces the denoiser call of each reverse step
by a denoiser call with graph *plus* ``cg_iter`` vector-Jacobian products through it (the
covariance :math:`\operatorname{Cov}[x \mid x_t] = \sigma_t^2 \nabla_{x_t} E[x \mid x_t]`
enters the conjugate-gradient solve of :math:`(\Sigma_y + A \operatorname{Cov} A^\top) u = y - A
E[x \mid x_t]`; diffem accumulates the likelihood term :math:`\sigma_t^2 J^\top A^\top u` from
those products, where azula's MMPS spends one more). This script measures that overhead on the
networks diffem trains, and compares with azula's MMPS (``azula.guidance.mmps.MMPSDenoiser``
with CG in a ``DDPMSampler``) on the same network, schedule, steps and observations, when azula
is installed: ``pip install --no-deps azula einops`` (``--no-deps`` keeps the installed torch).

Definition
----------
- **Networks.** Untrained denoisers of realistic size: an MLP on ``D = 64`` features (three
  residual blocks of width 256, EDM preconditioning; :class:`diffem.denoisers.MLPDenoiser`'s
  module when available, a plain torch module of the same shape otherwise), and an image U-Net
  (:class:`diffem.denoisers.UNetDenoiser`, default channels) when it exists: images of
  3x32x32 at the MLP's batch sizes on CUDA, 1x16x16 at batch 16 on CPU (where a 3x32x32
  U-Net takes minutes per call). Untrained weights cost the same as trained ones; the
  zero-initialised layers are redrawn at random so that the network is not linear in
  :math:`x_t` (a linear denoiser lets conjugate gradient converge in one iteration).
- **Observations.** MLP: a shared dense Gaussian projection to ``M = 32`` measurements,
  ``sigma_y = 0.1``. U-Net: random inpainting of half the pixels, ``sigma_y = 0.1``.
- **Samplers.** ``Unconditional(steps)`` (DDPM, ``eta = 1``) and ``MMPS(steps, cg_iter)`` for
  ``cg_iter`` in 1 and 3, each with ``steps = 64`` by default.
- **Timing.** One batch of ``B`` samples per call; one untimed warm-up call, then the median
  of ``--repeats`` timed calls (CUDA synchronised), both in wall time and in process CPU time
  (steadier on a shared CPU). The samplers' calls are interleaved (one call of each per
  round), so that load changes on a shared machine hit all of them alike. Reported:
  milliseconds per sample and the ratios MMPS / unconditional and MMPS / azula.

Run ``python benchmarks/sampler_speed.py --help`` for the options; ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from _common import (
    RESULTS_DIR,
    machine_header,
    markdown_table,
    publish,
    resolve_device,
    timed_medians,
)

from diffem.operators import Dense, Mask

Denoiser = Callable[[Tensor, Tensor], Tensor]


# ---------------------------------------------------------------------------------- networks
def _library_network(name: str, features: int, **kwargs) -> Denoiser | None:
    """An initialised, untrained diffem denoiser as a ``(x_t, sigma)`` callable, or ``None``."""
    import diffem.denoisers as denoisers

    cls = getattr(denoisers, name, None)
    if cls is None:
        return None
    net = cls(random_state=0, **kwargs)
    net.initialize_for(features)
    return net


@dataclass
class Case:
    name: str
    denoiser: Denoiser
    features: int
    operator: Callable[[int, torch.device], object]
    parameters: int


def _parameters(denoiser: object) -> int:
    module = getattr(denoiser, "module_", denoiser)
    if isinstance(module, nn.Module):
        return sum(p.numel() for p in module.parameters())
    return 0


def mlp_case(device: torch.device, features: int = 64) -> Case:
    net = _library_network("MLPDenoiser", features, device=str(device))
    _freeze(net)
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(features // 2, features, generator=generator) / math.sqrt(features)

    def operator(batch: int, device: torch.device):
        return Dense(matrix, noise_std=0.1).to(device).expand(batch)

    name = f"MLP (diffem MLPDenoiser), D={features}, 3x256"
    return Case(name, net, features, operator, _parameters(net))


def unet_case(device: torch.device, image_shape: tuple[int, int, int]) -> Case | None:
    features = math.prod(image_shape)
    net = _library_network("UNetDenoiser", features, image_shape=image_shape, device=str(device))
    if net is None:
        return None
    _freeze(net)
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(features, generator=generator) < 0.5

    def operator(batch: int, device: torch.device):
        return Mask(mask, noise_std=0.1).to(device).expand(batch)

    name = "U-Net (diffem UNetDenoiser), image " + "x".join(map(str, image_shape))
    return Case(name, net, features, operator, _parameters(net))


def _freeze(net: object) -> None:
    """Eval mode, no parameter gradients, and zero-initialised tensors (output projections,
    adaptive modulations) redrawn from N(0, 0.02^2): with a zero output layer the untrained
    denoiser is linear in ``x_t`` (``c_skip x_t``), and MMPS's conjugate gradient would then
    converge in one iteration, understating the cost of a trained network."""
    module = getattr(net, "module_", net)
    if not isinstance(module, nn.Module):
        return
    module.eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.requires_grad_(False)
            if p.numel() and not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=generator).to(p))


# ---------------------------------------------------------------------------------- azula
def azula_mmps(
    denoiser: Denoiser,
    y: Tensor,
    n_features: int,
    apply: Callable[[Tensor], Tensor],
    noise_var: float,
    steps: int,
    cg_iter: int,
) -> Callable[[], Tensor] | None:
    """A call of azula's MMPS (``MMPSDenoiser`` with ``cg_iter`` CG iterations in a
    ``DDPMSampler``) on the same network, variance-exploding schedule, number of steps and
    observations as diffem's, or ``None`` when azula is not installed."""
    try:
        from azula.denoise import Denoiser as AzulaDenoiser
        from azula.denoise import DiracPosterior
        from azula.guidance.mmps import MMPSDenoiser
        from azula.linalg.covariance import IsotropicCovariance
        from azula.noise import VESchedule
        from azula.sample import DDPMSampler
    except ImportError:
        return None

    class Wrapped(AzulaDenoiser):
        """diffem's ``denoiser(x_t, sigma)`` as an azula denoiser (``alpha_t = 1``)."""

        def __init__(self) -> None:
            super().__init__()
            self.schedule = VESchedule(sigma_min=1e-3, sigma_max=1e2)

        def forward(self, x_t: Tensor, t: Tensor, **kwargs: object) -> DiracPosterior:
            _, sigma = self.schedule(t)
            sigma = sigma.to(x_t.dtype).reshape(-1).expand(x_t.shape[0])
            return DiracPosterior(mean=denoiser(x_t, sigma))

    guided = MMPSDenoiser(
        Wrapped(), y, apply, IsotropicCovariance(noise_var), solver="cg", iterations=cg_iter
    )
    sampler = DDPMSampler(guided, steps=steps, silent=True)
    shape = (y.shape[0], n_features)
    return lambda: sampler(sampler.init(shape, device=y.device, dtype=y.dtype))


# ---------------------------------------------------------------------------------- timing
def time_case(
    case: Case, batch: int, args: argparse.Namespace, device: torch.device
) -> dict[str, tuple[float, float]]:
    """Median (wall, process CPU) seconds per call of each sampler for one batch size, the
    samplers' calls interleaved (:func:`_common.timed_medians`)."""
    from diffem.samplers import MMPS, Unconditional

    generator = torch.Generator(device=device).manual_seed(args.seed)
    unconditional = Unconditional(steps=args.steps, batch_size=batch)
    operator = case.operator(batch, device)
    x = unconditional.sample(case.denoiser, batch, case.features, generator=generator)
    y = operator.apply(x.to(device)) + 0.1 * torch.randn(
        batch, operator.n_measurements, generator=generator, device=device
    )
    calls: dict[str, Callable[[], object]] = {
        "unconditional": lambda: unconditional.sample(
            case.denoiser, batch, case.features, generator=generator
        )
    }
    for k in args.cg_iters:
        sampler = MMPS(steps=args.steps, cg_iter=k, batch_size=batch)
        calls[f"MMPS (cg {k})"] = lambda s=sampler: s.sample(
            case.denoiser, y, operator, generator=generator
        )
        peer = None
        if not args.no_azula:
            peer = azula_mmps(case.denoiser, y, case.features, operator.apply, 0.01, args.steps, k)
        if peer is not None:
            calls[f"azula MMPS (cg {k})"] = peer
    return timed_medians(calls, device, warmup=1, repeats=args.repeats)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny smoke run (MLP only, batch 16, 8 steps, 1 repeat); writes "
        "files only if --out is given",
    )
    parser.add_argument(
        "--batches", type=int, nargs="+", default=None, help="batch sizes (default 64 1024)"
    )
    parser.add_argument("--steps", type=int, default=None, help="diffusion steps (default 64)")
    parser.add_argument(
        "--cg-iters",
        type=int,
        nargs="+",
        default=[1, 3],
        help="MMPS conjugate-gradient iterations (default 1 3)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls per measurement, after one warm-up (default 3)",
    )
    parser.add_argument(
        "--unet-shape",
        type=int,
        nargs=3,
        default=None,
        metavar=("C", "H", "W"),
        help="image shape of the U-Net case (default 3 32 32 on CUDA, 1 16 16 on CPU)",
    )
    parser.add_argument(
        "--unet-batches",
        type=int,
        nargs="+",
        default=None,
        help="batch sizes of the U-Net case (default: --batches on CUDA, 16 on CPU)",
    )
    parser.add_argument("--no-unet", action="store_true", help="skip the U-Net case")
    parser.add_argument(
        "--no-azula", action="store_true", help="skip azula's MMPS (also skipped without azula)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; 1 with --quick)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"Markdown result file (default {RESULTS_DIR / 'sampler_speed.md'}, "
        "none with --quick)",
    )
    args = parser.parse_args(argv)
    defaults = (
        {"batches": [16], "steps": 8, "repeats": 1}
        if args.quick
        else {"batches": [64, 1024], "steps": 64, "repeats": 3}
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.quick:
        args.no_unet = True
    if args.quick and args.threads is None:
        args.threads = 1
    if args.out is None and not args.quick:
        args.out = RESULTS_DIR / "sampler_speed.md"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    plans: list[tuple[Case, list[int]]] = [(mlp_case(device), args.batches)]
    if not args.no_unet:
        cuda = device.type == "cuda"
        shape = args.unet_shape or ([3, 32, 32] if cuda else [1, 16, 16])
        case = unet_case(device, tuple(shape))
        if case is not None:
            batches = args.unet_batches or (args.batches if cuda else [16])
            plans.append((case, batches))

    rows = []
    for case, batches in plans:
        for batch in batches:
            timings = time_case(case, batch, args, device)
            base_wall, base_cpu = timings["unconditional"]
            for name, (wall, cpu) in timings.items():
                peer = timings.get(f"azula {name}")
                rows.append(
                    [
                        case.name,
                        f"{case.parameters / 1e6:.2f}M",
                        str(batch),
                        name,
                        f"{1e3 * wall / batch:.3g}",
                        f"{1e3 * cpu / batch:.3g}",
                        f"{wall / base_wall:.2f}",
                        f"{cpu / base_cpu:.2f}",
                        "-" if peer is None else f"{wall / peer[0]:.2f}",
                        "-" if peer is None else f"{cpu / peer[1]:.2f}",
                    ]
                )
            print(
                f"  {case.name}, batch {batch}: {time.perf_counter() - start:.0f} s elapsed",
                flush=True,
            )
    header = [
        "network",
        "params",
        "batch",
        "sampler",
        "wall ms/sample",
        "CPU ms/sample",
        "wall / uncond.",
        "CPU / uncond.",
        "wall / azula",
        "CPU / azula",
    ]
    settings = (
        f"- settings: {args.steps} steps (default `VESchedule`), warm-up 1 call then median of "
        f"{args.repeats} timed calls, one batch per call, float32, untrained networks in eval "
        f"mode with zero-initialised layers redrawn from N(0, 0.02^2); total wall time "
        f"{time.perf_counter() - start:.0f} s"
    )
    lines = [
        "# Sampler speed: MMPS against unconditional sampling",
        "",
        *machine_header(device),
        settings,
        "",
        "Milliseconds per sample (lower is better), the cost relative to unconditional "
        "sampling with the same network and batch size, and diffem's MMPS relative to azula's "
        "with the same network, schedule, steps, CG iterations and observations (targets: "
        "MMPS cg 1 <= 2.0x unconditional at batch 1024, <= 0.75x azula). *wall*: elapsed "
        "time; *CPU*: process CPU time (all threads), which on a shared machine does not "
        "count the time spent waiting for a core (on CUDA, wall time is the measure):",
        "",
        markdown_table(header, rows),
        "",
    ]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
