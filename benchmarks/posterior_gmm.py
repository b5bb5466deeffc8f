r"""Posterior sampling on a Gaussian mixture prior whose posterior is known exactly.

The benchmark of MCGdiff (Cardoso, Janati, Le Corff & Moulines, 2024, "Monte Carlo guided
diffusion for Bayesian linear inverse problems", ICLR) and TMPD (Boys, Girolami, Pidstrigach,
Reich, Mosca & Akyildiz, 2024, "Tweedie moment projected diffusions for inverse problems",
TMLR), here run with the samplers of Rozet et al. (2024, NeurIPS).

Definition
----------
- **Prior.** 25 components with equal weights and identity covariances; component
  :math:`(i, j)`, :math:`i, j \in \{-2, \dots, 2\}`, has mean
  :math:`(8i, 8j, 8i, 8j, \dots) \in \mathbb{R}^{d_x}` (the pair tiled across the dimensions).
- **Problem.** :math:`G \sim \mathcal{N}(0, 1)^{d_y \times d_x}` with thin SVD
  :math:`G = U S V^\top`; :math:`A = U \operatorname{diag}(s) V^\top` with :math:`s` the
  decreasingly sorted draws of :math:`d_y` uniforms on :math:`(0, 1)`. A latent
  :math:`x^\star` is drawn from the prior and :math:`y = A x^\star + \sigma_y \varepsilon`,
  :math:`\varepsilon \sim \mathcal{N}(0, I)`.
- **Posterior.** :math:`p(x \mid y)` is again a 25-component mixture, sampled exactly by
  :meth:`diffem.priors.GaussianMixturePrior.sample_posterior`.
- **Samplers.** Each diffusion sampler draws ``--samples`` independent samples of
  :math:`p(x \mid y)` using the *exact* denoiser :math:`E[x \mid x_t]` of the mixture prior,
  so that only the sampler's approximation is measured: MMPS with 1, 3 and 5 conjugate-gradient
  iterations, DPS, PiGDM and TMPD, all with the same steps and default parameters, except that
  MMPS gets ``sigma_data`` equal to the prior's per-coordinate standard deviation
  (:math:`\sqrt{129}`): there it only scales the safeguard bounds on the covariance, which
  would otherwise clip the exact denoiser's (valid) covariance. MMPS runs with the paper's
  ancestral solver and, as extra columns ("MMPS 2M"), with the second-order
  ``solver="dpmpp_2m"`` (same steps); the other samplers use the ancestral solver. The
  denoiser is ``GaussianMixturePrior.__call__`` (matrix-product form for isotropic
  components).
- **Metric.** Sliced Wasserstein distance (:math:`SW_2`, random directions on the sphere)
  between a sampler's samples and a reference set of exact posterior samples. The floor is the
  distance between two independent exact sets of the same size. Reported: mean
  :math:`\pm 1.96` standard errors over the random problems of each setting, and wall time per
  1000 samples.

Run ``python benchmarks/posterior_gmm.py --help`` for the options; ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from _common import RESULTS_DIR, machine_header, markdown_table, resolve_device, timed

from diffem.operators import Dense

EXACT = "exact"
FLOOR = "floor (exact vs exact)"
GRID = 8.0
# Sampler diagnostics (fractions of rows and steps) worth reporting.
DIAGNOSTICS = ("fallback", "clipped", "cg_safeguarded", "clamped")
# Largest number of latent entries (rows x d_x) that one sampler call processes.
CALL_ENTRIES = 2_000_000


# ---------------------------------------------------------------------------------- problem
def mixture_prior(d_x: int, dtype: torch.dtype, device: torch.device):
    """The 25-component prior (equal weights, unit covariances, means on the tiled grid) as a
    ``GaussianMixturePrior``, which is also the exact denoiser."""
    from diffem.priors import GaussianMixturePrior

    steps = torch.arange(-2, 3, dtype=torch.float64) * GRID
    pairs = torch.cartesian_prod(steps, steps)  # (25, 2): (8i, 8j)
    means = pairs.repeat(1, (d_x + 1) // 2)[:, :d_x]
    k = means.shape[0]
    weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
    covs = torch.ones(k, dtype=torch.float64)  # isotropic, unit variances
    return GaussianMixturePrior(weights.to(dtype), means.to(dtype), covs.to(dtype)).to(device)


def problem_seed(seed: int, *key: int) -> int:
    """An independent 63-bit seed for each (setting, problem, purpose) key."""
    return int(np.random.SeedSequence([seed, *key]).generate_state(2, dtype=np.uint64)[0] >> 1)


def random_matrix(d_y: int, d_x: int, generator: torch.Generator) -> Tensor:
    r""":math:`A = U \operatorname{diag}(s) V^\top`, ``s`` sorted uniforms (float64, CPU)."""
    gaussian = torch.randn(d_y, d_x, generator=generator, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(gaussian, full_matrices=False)
    s = torch.rand(d_y, generator=generator, dtype=torch.float64).sort(descending=True).values
    return u @ torch.diag(s) @ vh


@dataclass
class Problem:
    matrix: Tensor  # (d_y, d_x) float64
    y: Tensor  # (d_y,) float64
    x_star: Tensor  # (d_x,) float64


def make_problem(prior, d_x: int, d_y: int, sigma_y: float, seed: int) -> Problem:
    generator = torch.Generator().manual_seed(seed)
    matrix = random_matrix(d_y, d_x, generator)
    x_star = torch.as_tensor(np.asarray(prior.sample(1, generator=generator)))[0].double().cpu()
    noise = torch.randn(d_y, generator=generator, dtype=torch.float64)
    return Problem(matrix, matrix @ x_star + sigma_y * noise, x_star)


# ---------------------------------------------------------------------------------- metric
def sliced_wasserstein(x: Tensor, y: Tensor, n_projections: int, seed: int) -> float:
    r""":math:`SW_2` between two sample sets ``(N, D)``, with the directions fixed by ``seed``
    (:func:`diffem.metrics.sliced_wasserstein`); NaN if a set has non-finite values."""
    from diffem.metrics import sliced_wasserstein as library_sw

    x, y = x.double().cpu(), y.double().cpu()
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        return math.nan
    return float(library_sw(x, y, n_projections=n_projections, p=2.0, random_state=seed % 2**32))


# ---------------------------------------------------------------------------------- samplers
def make_samplers(
    steps: int,
    cg_iters: list[int],
    cg_iters_2m: list[int],
    mmps_sigma_data: float,
    smc_particles: list[int] = (),
    smc_solver: str = "ancestral",
    smc_cg_iter: int = 1,
) -> dict[str, object]:
    """The compared samplers with ``steps`` diffusion steps and default parameters, except
    MMPS's and SMC's ``sigma_data`` (the scale of the safeguard bounds) and the ``dpmpp_2m``
    solver of the "MMPS 2M" variants. The order fixes each sampler's seed: the 2M and SMC
    variants come last so that the other samplers keep their seeds."""
    from diffem.samplers import DPS, MMPS, SMC, TMPD, PiGDM

    samplers: dict[str, object] = {
        f"MMPS (cg {k})": MMPS(steps=steps, cg_iter=k, sigma_data=mmps_sigma_data) for k in cg_iters
    }
    samplers.update(
        {"DPS": DPS(steps=steps), "PiGDM": PiGDM(steps=steps), "TMPD": TMPD(steps=steps)}
    )
    samplers.update(
        {
            f"MMPS 2M (cg {k})": MMPS(
                steps=steps, cg_iter=k, sigma_data=mmps_sigma_data, solver="dpmpp_2m"
            )
            for k in cg_iters_2m
        }
    )
    samplers.update(
        {
            f"SMC (K {k})": SMC(
                steps=steps,
                particles=k,
                cg_iter=smc_cg_iter,
                sigma_data=mmps_sigma_data,
                solver=smc_solver,
            )
            for k in smc_particles
        }
    )
    return samplers


def display_order(names: list[str]) -> list[str]:
    """MMPS variants first (ancestral, then 2M), then the other samplers, SMC last."""
    return sorted(
        names,
        key=lambda name: (name.startswith("SMC"), not name.startswith("MMPS"), "2M" in name),
    )


def data_scale() -> float:
    r"""Per-coordinate standard deviation of the prior: unit component variance plus the
    variance of the grid means, :math:`\sqrt{1 + 2 \cdot 8^2}`."""
    grid = np.arange(-2, 3) * GRID
    return math.sqrt(1.0 + float(grid.var()))


def run_sampler(
    sampler,
    denoiser,
    problems: list[Problem],
    n_samples: int,
    sigma_y: float,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
) -> tuple[list[Tensor], float]:
    """``n_samples`` posterior samples for each problem; returns them and the wall time."""
    d_x = problems[0].matrix.shape[1]
    per_call = max(1, CALL_ENTRIES // (n_samples * d_x))
    outputs: list[Tensor] = []
    elapsed = 0.0
    for start in range(0, len(problems), per_call):
        chunk = problems[start : start + per_call]
        rows = len(chunk) * n_samples
        matrices = torch.stack([p.matrix for p in chunk]).to(device=device, dtype=dtype)
        if len(chunk) == 1:  # one shared matrix
            operator = Dense(matrices[0], noise_std=sigma_y).to(device).expand(rows)
        else:  # one matrix per row
            operator = Dense(matrices.repeat_interleave(n_samples, dim=0), noise_std=sigma_y)
            operator = operator.to(device)
        y = torch.stack([p.y for p in chunk]).to(device=device, dtype=dtype)
        y = y.repeat_interleave(n_samples, dim=0)
        if "batch_size" in sampler.get_params():
            sampler.set_params(batch_size=rows)
        generator = torch.Generator(device=device).manual_seed(seed + start)

        def call(y: Tensor = y, operator: Dense = operator, generator=generator) -> Tensor:
            return sampler.sample(denoiser, y, operator, generator=generator)

        x, seconds = timed(call, device)
        elapsed += seconds
        outputs.extend(x.detach().to("cpu", torch.float64).reshape(len(chunk), n_samples, d_x))
    return outputs, elapsed


def run_exact(
    prior,
    problems: list[Problem],
    n_samples: int,
    sigma_y: float,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
) -> tuple[Tensor, float]:
    """Two independent exact sets per problem, shape ``(P, 2 * n_samples, D)``, and the time."""
    matrices = torch.stack([p.matrix for p in problems]).to(device=device, dtype=dtype)
    operator = Dense(matrices, noise_std=sigma_y).to(device)
    y = torch.stack([p.y for p in problems]).to(device=device, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    samples, seconds = timed(
        lambda: prior.sample_posterior(y, operator, n_samples=2 * n_samples, generator=generator),
        device,
    )
    return torch.as_tensor(np.asarray(samples)).double(), seconds


# ---------------------------------------------------------------------------------- driver
@dataclass
class SettingResult:
    d_x: int
    d_y: int
    sigma_y: float
    distances: dict[str, list[float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    diagnostics: dict[str, dict[str, float]] = field(default_factory=dict)
    n_problems: int = 0
    n_samples: int = 0

    @property
    def n_samples_total(self) -> int:
        return self.n_problems * self.n_samples


def run_setting(
    d_x: int,
    d_y: int,
    sigma_index: int,
    sigma_y: float,
    n_problems: int,
    n: int,
    args: argparse.Namespace,
    device: torch.device,
    figure: dict[str, np.ndarray] | None,
) -> SettingResult:
    dtype = torch.float32
    prior = mixture_prior(d_x, dtype, device)
    denoiser = prior
    key = (d_x, d_y, sigma_index)
    problems = [
        make_problem(prior, d_x, d_y, sigma_y, problem_seed(args.seed, *key, p, 0))
        for p in range(n_problems)
    ]
    result = SettingResult(d_x, d_y, sigma_y, n_problems=n_problems, n_samples=n)

    exact, seconds = run_exact(
        prior, problems, n, sigma_y, device, dtype, problem_seed(args.seed, *key, 0, 1)
    )
    result.seconds[EXACT] = seconds / 2  # two sets were drawn
    reference, independent = exact[:, :n], exact[:, n:]
    sw_seeds = [problem_seed(args.seed, *key, p, 2) for p in range(n_problems)]

    def distances(samples) -> list[float]:
        return [
            sliced_wasserstein(s, r, args.projections, sw_seed)
            for s, r, sw_seed in zip(samples, reference, sw_seeds, strict=True)
        ]

    result.distances[FLOOR] = distances(independent)
    if figure is not None:
        figure[EXACT] = reference[0].numpy()
        figure["x_star"] = problems[0].x_star.numpy()

    for index, (name, sampler) in enumerate(
        make_samplers(
            args.steps,
            args.cg_iters,
            args.cg_iters_2m,
            args.mmps_sigma_data,
            args.smc_particles,
            args.smc_solver,
            args.smc_cg_iter,
        ).items()
    ):
        seed = problem_seed(args.seed, *key, 0, 3 + index)
        samples, seconds = run_sampler(sampler, denoiser, problems, n, sigma_y, device, dtype, seed)
        result.distances[name] = distances(samples)
        result.seconds[name] = seconds
        for key_, value in getattr(sampler, "diagnostics_", {}).items():
            if key_ in DIAGNOSTICS:
                result.diagnostics.setdefault(name, {})[key_] = value
        if figure is not None:
            figure[name] = samples[0].numpy()
    return result


def mean_ci(values: list[float]) -> tuple[float, float, int]:
    """Mean, 1.96 standard errors (over finite values) and the number of non-finite values."""
    array = np.asarray(values, dtype=float)
    finite = array[np.isfinite(array)]
    bad = int(array.size - finite.size)
    if finite.size == 0:
        return math.nan, math.nan, bad
    half = 1.96 * finite.std(ddof=1) / math.sqrt(finite.size) if finite.size > 1 else math.nan
    return float(finite.mean()), float(half), bad


def fmt(mean: float, half: float, bad: int) -> str:
    text = f"{mean:.3g} ± {half:.2g}" if math.isfinite(half) else f"{mean:.3g}"
    return text + (f" ({bad} NaN)" if bad else "")


def goal_column(result: SettingResult, names: list[str]) -> tuple[str, str]:
    """The best sampler over the floor (the goal: within 1.5x), and whether the best MMPS is
    best of the single-particle samplers (all but SMC)."""
    means = {name: mean_ci(result.distances[name]) for name in names}

    def score(name: str) -> float:
        mean, _, bad = means[name]
        return math.inf if bad or not math.isfinite(mean) else mean

    best = min(names, key=score)
    floor = mean_ci(result.distances[FLOOR])[0]
    ratio = score(best) / floor
    single = [name for name in names if not name.startswith("SMC")]
    best_single = min(single, key=score)
    mmps_best = "yes" if best_single.startswith("MMPS") else f"no: {best_single}"
    verdict = "yes" if ratio <= 1.5 else "no"
    return f"{ratio:.2f} {best} ({verdict})", mmps_best


def tables(results: list[SettingResult], names: list[str]) -> tuple[str, str]:
    header = [
        "d_x",
        "d_y",
        "sigma_y",
        "problems x N",
        FLOOR,
        *names,
        "best / floor (<= 1.5?)",
        "MMPS best single-particle",
    ]
    rows = []
    for r in results:
        cells = [fmt(*mean_ci(r.distances[name])) for name in [FLOOR, *names]]
        size = f"{r.n_problems} x {r.n_samples}"
        rows.append(
            [str(r.d_x), str(r.d_y), f"{r.sigma_y:g}", size, *cells, *goal_column(r, names)]
        )
    accuracy = markdown_table(header, rows)

    timing_rows = []
    for d_x in sorted({r.d_x for r in results}):
        group = [r for r in results if r.d_x == d_x]
        total = sum(r.n_samples_total for r in group)
        cells = [
            f"{1000 * sum(r.seconds[name] for r in group) / total:.3g}" for name in [EXACT, *names]
        ]
        timing_rows.append([str(d_x), *cells])
    timing = markdown_table(["d_x", EXACT, *names], timing_rows)
    return accuracy, timing


def diagnostics_table(results: list[SettingResult], names: list[str]) -> str:
    keys = [k for k in DIAGNOSTICS if any(k in d for r in results for d in r.diagnostics.values())]
    rows = []
    for name in names:
        cells = []
        for k in keys:
            values = [r.diagnostics.get(name, {}).get(k) for r in results]
            values = [v for v in values if v is not None]
            cells.append(f"{max(values):.2g}" if values else "-")
        rows.append([name, *cells])
    return markdown_table(["sampler", *keys], rows)


def plot(figure: dict[str, np.ndarray], names: list[str], title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    from diffem.plotting import save_figure

    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 3.4 * rows), squeeze=False)
    limit = 2.5 * GRID + 3
    grid = np.arange(-2, 3) * GRID
    gx, gy = np.meshgrid(grid, grid)
    exact = figure[EXACT]
    for ax, name in zip(axes.flat, names, strict=False):
        ax.scatter(gx, gy, s=12, marker="+", color="0.6", linewidths=0.8, label="prior means")
        ax.scatter(exact[:, 0], exact[:, 1], s=3, alpha=0.35, color="tab:blue", label=EXACT)
        samples = figure[name]
        ax.scatter(samples[:, 0], samples[:, 1], s=3, alpha=0.35, color="tab:orange", label=name)
        ax.set(xlim=(-limit, limit), ylim=(-limit, limit), aspect="equal", title=name)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    handles = [
        plt.Line2D([], [], ls="", marker="o", color="tab:blue", label="exact posterior"),
        plt.Line2D([], [], ls="", marker="o", color="tab:orange", label="sampler"),
        plt.Line2D([], [], ls="", marker="+", color="0.6", label="prior means"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    save_figure(fig, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny smoke run (d_x 8, d_y 1 and 2, 2 problems, 64 samples, 8 steps); "
        "writes files only if --out is given",
    )
    parser.add_argument(
        "--dims", type=int, nargs="+", default=None, help="latent dimensions d_x (default 8 80 800)"
    )
    parser.add_argument(
        "--dys",
        type=int,
        nargs="+",
        default=None,
        help="observation dimensions d_y (default 1 2 4)",
    )
    parser.add_argument(
        "--sigmas",
        type=float,
        nargs="+",
        default=None,
        help="observation noise std sigma_y (default 1.0 0.1)",
    )
    parser.add_argument(
        "--problems",
        type=int,
        nargs="+",
        default=None,
        help="random problems per setting, one value or one per --dims entry (default 20)",
    )
    parser.add_argument(
        "--samples",
        type=int,
        nargs="+",
        default=None,
        help="posterior samples per problem and sampler, one value or one per --dims entry "
        "(default 1000)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="diffusion steps of every sampler (default 64)"
    )
    parser.add_argument(
        "--cg-iters",
        type=int,
        nargs="+",
        default=[1, 3, 5],
        help="MMPS conjugate-gradient iterations to compare (default 1 3 5)",
    )
    parser.add_argument(
        "--projections",
        type=int,
        default=256,
        help="random directions of the sliced Wasserstein distance",
    )
    parser.add_argument(
        "--cg-iters-2m",
        type=int,
        nargs="*",
        default=[3],
        help="MMPS conjugate-gradient iterations with the dpmpp_2m solver (default 3; "
        "none to skip)",
    )
    parser.add_argument(
        "--smc-particles",
        type=int,
        nargs="*",
        default=[16, 64],
        help="particles K of the SMC columns (default 16 64; none to skip)",
    )
    parser.add_argument(
        "--smc-solver",
        default="ancestral",
        choices=["ancestral", "dpmpp_2m"],
        help="solver of the SMC columns (default ancestral)",
    )
    parser.add_argument(
        "--smc-cg-iter", type=int, default=1, help="CG iterations of the SMC columns (default 1)"
    )
    parser.add_argument(
        "--mmps-sigma-data",
        type=float,
        default=None,
        help="MMPS's data scale, which sets its covariance safeguard bounds; default: the "
        "prior's per-coordinate standard deviation, sqrt(129) = 11.36 (the library default 1 "
        "makes the bounds bind on this exact denoiser)",
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
        help="Markdown result file; the figure goes next to it as .png "
        f"(default {RESULTS_DIR / 'posterior_gmm.md'}, none with --quick)",
    )
    args = parser.parse_args(argv)
    defaults = (
        {"dims": [8], "dys": [1, 2], "sigmas": [1.0], "problems": 2, "samples": 64, "steps": 8}
        if args.quick
        else {
            "dims": [8, 80, 800],
            "dys": [1, 2, 4],
            "sigmas": [1.0, 0.1],
            "problems": 20,
            "samples": 1000,
            "steps": 64,
        }
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.mmps_sigma_data is None:
        args.mmps_sigma_data = data_scale()
    for name in ("problems", "samples"):
        values = getattr(args, name)
        if not isinstance(values, list):
            values = [values]
        if len(values) == 1:
            values = values * len(args.dims)
        if len(values) != len(args.dims):
            parser.error(f"--{name} takes one value or one per --dims entry ({len(args.dims)}).")
        setattr(args, name, values)
    if args.quick and args.threads is None:
        args.threads = 1
    if args.out is None and not args.quick:
        args.out = RESULTS_DIR / "posterior_gmm.md"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    figure_key = (args.dims[0], args.dys[0], 0)
    figure: dict[str, np.ndarray] = {}
    results: list[SettingResult] = []
    names: list[str] = []
    start = time.perf_counter()
    for d_x, n_problems, n in zip(args.dims, args.problems, args.samples, strict=True):
        for d_y in args.dys:
            for sigma_index, sigma_y in enumerate(args.sigmas):
                wanted = (d_x, d_y, sigma_index) == figure_key
                result = run_setting(
                    d_x,
                    d_y,
                    sigma_index,
                    sigma_y,
                    n_problems,
                    n,
                    args,
                    device,
                    figure if wanted else None,
                )
                results.append(result)
                names = display_order([n for n in result.distances if n != FLOOR])
                print(
                    f"  d_x={d_x} d_y={d_y} sigma_y={sigma_y:g}: "
                    f"{time.perf_counter() - start:.0f} s elapsed",
                    flush=True,
                )
    total = time.perf_counter() - start

    def per_dim(values: list[int]) -> str:
        if len(set(values)) == 1:
            return str(values[0])
        return (
            "(" + ", ".join(f"{v} at d_x={d}" for d, v in zip(args.dims, values, strict=True)) + ")"
        )

    accuracy, timing = tables(results, names)
    diagnostics = diagnostics_table(results, names)
    denoiser_line = (
        "- denoiser: `GaussianMixturePrior.__call__` (exact; matrix-product form for isotropic "
        "components)"
    )
    settings = (
        f"- settings: d_x in {args.dims}, d_y in {args.dys}, sigma_y in {args.sigmas}; "
        f"random problems per setting {per_dim(args.problems)}; samples per problem and "
        f"sampler (and in each of the two exact sets) {per_dim(args.samples)}; "
        f"{args.steps} diffusion steps (default `VESchedule`); MMPS cg_iter in "
        f"{args.cg_iters} with the ancestral solver and {args.cg_iters_2m} with "
        f'`solver="dpmpp_2m"` ("MMPS 2M"), sigma_data {args.mmps_sigma_data:.4g}; SMC '
        f"({args.smc_solver}, cg_iter {args.smc_cg_iter}) with K in {args.smc_particles} "
        "particles; DPS, "
        f"PiGDM and TMPD ancestral; other sampler parameters at their defaults; float32; "
        f"SW_2 with {args.projections} random directions; "
        f"seed {args.seed}; {torch.get_num_threads()} torch threads; total wall time {total:.0f} s"
    )
    lines = [
        "# Posterior sampling on the 25-component Gaussian mixture (exact posterior)",
        "",
        *machine_header(device),
        settings,
        denoiser_line,
        "",
        "Sliced Wasserstein distance to a reference set of exact posterior samples, mean ± 1.96 "
        "SE over the problems (lower is better). Goals: the best sampler within 1.5x of the "
        "exact-vs-exact floor, SMC's ratio falling with the particles K, and single-particle "
        "MMPS best of the single-particle samplers.",
        "",
        accuracy,
        "",
        "Wall time per 1000 posterior samples (seconds; all settings of a d_x pooled):",
        "",
        timing,
        "",
        "Sampler safeguards (largest fraction over the settings of (row, step) pairs where each "
        "fired; 0 means inactive):",
        "",
        diagnostics,
        "",
    ]
    if args.out is not None:
        figure_name = args.out.with_suffix(".png").name
        lines += [
            "First two coordinates of one problem's samples:",
            "",
            f"![samples]({figure_name})",
            "",
        ]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        d_x, d_y, _ = figure_key
        title = (
            f"d_x={d_x}, d_y={d_y}, sigma_y={args.sigmas[0]:g}, problem 0: first two "
            f"coordinates, {args.samples[0]} samples each"
        )
        plot(figure, names, title, args.out.with_suffix(".png"))
        print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
