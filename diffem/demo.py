r"""End-to-end demo: the low-dimensional manifold experiment of Rozet et al. (2024).

Latents :math:`x_i \in \mathbb{R}^5` lie on a random smooth 1-D curve; each is observed through
its own random projection :math:`A_i \in \mathbb{R}^{2 \times 5}` (rows on the unit sphere) with
noise :math:`\sigma_y = 0.01`,

.. math:: y_i = A_i x_i + e_i, \qquad e_i \sim \mathcal{N}(0, \sigma_y^2 I_2).

No single observation tells where :math:`x_i` is, but together they determine the curve.
:class:`diffem.DiffusionPriorEM` (its recipe, see :class:`DemoConfig`) starts from a Gaussian
prior fitted by closed-form EM and alternates posterior sampling (E-step, twisted SMC) and
denoiser training (M-step). After every EM iteration the estimator records its estimate of the
mean log-evidence :math:`\frac1n \sum_i \log q_k(y_i)` (with its standard error and its change
from the previous iteration), which EM increases and on which it stops and keeps its best
iteration; the demo also draws prior samples and measures their sliced Wasserstein distance and
Sinkhorn divergence to held-out true latents (which EM never sees), then writes

* ``pairs.png``: pair plots of prior samples at EM iterations 1, 2, 4, 8, ... and the true
  latents (the layout of the paper's figure), and ``corner_final.png``;
* ``metrics.png``: the metrics against EM iteration; ``evidence.png``: the evidence estimate
  with its error bars;
* ``posterior.png``: posterior samples :math:`x \sim q(x \mid y_i)` for a few observations;
* ``history.csv`` and ``table.md``: the per-iteration table that is also printed (with the
  command, date and machine in ``table.md``).

Run it with ``python -m diffem demo`` (or the ``diffem demo`` console script); ``--quick`` is a
< 1 minute smoke run.

Reference: F. Rozet, G. Andry, F. Lanusse, G. Louppe, "Learning Diffusion Priors from
Observations by Expectation Maximization", NeurIPS 2024 (section 5.1).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from diffem._device import resolve_device
from diffem._report import (
    fit_tracked,
    format_table,
    machine_header,
    powers_of_two,
    record_summary,
)

__all__ = ["DemoConfig", "DemoResult", "distances", "run_demo"]


# --------------------------------------------------------------------------------------------
# configuration


@dataclass
class DemoConfig:
    """Size of the demo run: :meth:`full` (the README's demo; its measured time is in
    ``benchmarks/results/demo.md``) or :meth:`quick` (a smoke run).

    The estimator is ``DiffusionPriorEM``'s recipe (its defaults: twisted-SMC E-step after a
    cheap warm-up, EMA weights, several posterior samples per observation, the network
    refining the analytic initialisation, the evidence estimated after every iteration, early
    stopping and the best iteration kept) with the demo's network size, M-step epochs and
    number of iterations. ``steps`` (with ``particles`` and ``cg_iter``), when set, replaces
    the recipe's samplers by one smaller :class:`~diffem.samplers.SMC` (the quick run).
    """

    n_samples: int = 2048
    n_iter: int = 8
    gaussian_iter: int = 16
    init_components: int = 1
    hidden: int = 128
    n_blocks: int = 3
    epochs: int = 16
    batch_size: int = 256
    lr: float = 1e-3
    steps: int | None = None
    particles: int = 8
    cg_iter: int = 3
    n_eval: int = 1024
    n_posterior: int = 4
    n_posterior_samples: int = 256
    noise_std: float = 0.01
    random_state: int = 0
    device: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def full(cls, **overrides: Any) -> DemoConfig:
        return dataclasses.replace(cls(), **overrides)

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        base = cls(
            n_samples=512,
            n_iter=2,
            gaussian_iter=8,
            hidden=32,
            n_blocks=1,
            epochs=2,
            batch_size=256,
            steps=8,
            particles=4,
            cg_iter=1,
            n_eval=256,
            n_posterior=3,
            n_posterior_samples=32,
        )
        return dataclasses.replace(base, **overrides)


@dataclass
class DemoResult:
    """What :func:`run_demo` produced."""

    rows: list[dict[str, float]]
    figures: dict[str, Path]
    table: str
    config: DemoConfig
    estimator: Any = None
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------
# metrics


def _finite(samples: Any) -> np.ndarray:
    samples = np.asarray(samples, dtype=np.float64)
    return samples[np.isfinite(samples).all(axis=1)]


def distances(samples: Any, truth: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Sliced Wasserstein distance (:func:`diffem.metrics.sliced_wasserstein`, 256
    directions) and Sinkhorn divergence (:func:`diffem.metrics.sinkhorn_divergence`,
    ``reg=0.05``) of ``samples`` to
    ``truth``; non-finite samples are dropped."""
    from diffem.metrics import sinkhorn_divergence, sliced_wasserstein

    samples = _finite(samples)
    return {
        "sliced W2": float(sliced_wasserstein(samples, truth, random_state=seed)),
        "Sinkhorn": sinkhorn_divergence(samples, truth, reg=0.05),
    }


# --------------------------------------------------------------------------------------------
# the demo


def build_estimator(cfg: DemoConfig, verbose: int = 1) -> Any:
    """The :class:`diffem.DiffusionPriorEM` of the demo: the recipe with the demo's sizes."""
    from diffem import DiffusionPriorEM
    from diffem.em import recipe_denoiser
    from diffem.samplers import SMC

    denoiser = recipe_denoiser().set_params(
        lr=cfg.lr,
        max_epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        module__hidden_features=cfg.hidden,
        module__n_blocks=cfg.n_blocks,
    )
    samplers: dict[str, Any] = {}
    if cfg.steps is not None:
        sampler = SMC(steps=cfg.steps, particles=cfg.particles, cg_iter=cfg.cg_iter)
        samplers = {"sampler": sampler, "evidence_sampler": sampler}
    return DiffusionPriorEM(
        denoiser=denoiser,
        n_iter=cfg.n_iter,
        gaussian_iter=cfg.gaussian_iter,
        init_components=cfg.init_components,
        device=cfg.device,
        random_state=cfg.random_state,
        verbose=verbose,
        **samplers,
        **cfg.extra,
    )


def run_demo(
    out: str | os.PathLike[str] = "demo_output",
    *,
    quick: bool = False,
    n_samples: int | None = None,
    n_iter: int | None = None,
    device: str = "auto",
    random_state: int = 0,
    verbose: int = 1,
    stream: TextIO | None = None,
    config: DemoConfig | None = None,
) -> DemoResult:
    """Run the manifold experiment end to end and write its figures to ``out``.

    Parameters
    ----------
    out : path
        Output folder (created).
    quick : bool
        Tiny configuration (< 1 minute on 2 CPU cores), for smoke tests.
    n_samples, n_iter : int, optional
        Override the number of observations and of EM iterations.
    device : str
        ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    random_state : int
        Seed of the data, the estimator and the evaluation.
    verbose : int
        ``0`` silent, ``1`` table and progress bars.
    stream : text stream
        Where the table goes (default ``sys.stdout``).
    """
    from diffem.datasets import make_manifold
    from diffem.plotting import (
        corner_plot,
        metric_curves,
        pair_grid,
        posterior_plot,
        save_figure,
    )

    stream = stream if stream is not None else sys.stdout
    t_start = time.perf_counter()
    cfg = config or (DemoConfig.quick() if quick else DemoConfig.full())
    overrides: dict[str, Any] = {"device": device, "random_state": random_state}
    if n_samples is not None:
        overrides["n_samples"] = int(n_samples)
    if n_iter is not None:
        overrides["n_iter"] = int(n_iter)
    cfg = dataclasses.replace(cfg, **overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def say(msg: str = "") -> None:
        if verbose:
            print(msg, file=stream, flush=True)

    # data: observations to learn from, independent true latents to evaluate against
    latents, Y, operator = make_manifold(
        cfg.n_samples + cfg.n_eval, noise_std=cfg.noise_std, random_state=cfg.random_state
    )
    latents, Y = np.asarray(latents), np.asarray(Y)
    reference = latents[cfg.n_samples :].astype(np.float64)
    train = np.arange(cfg.n_samples)
    latents, Y, operator = latents[train], Y[train], operator[train]
    say(
        f"diffem demo: {cfg.n_samples} observations y = A x + e (A: 2x5 random projections, "
        f"noise {cfg.noise_std}), latents on a 1-D curve in R^{np.shape(latents)[1]}; "
        f"{cfg.n_iter} EM iterations on {resolve_device(cfg.device)}."
    )

    est = build_estimator(cfg, verbose=verbose)
    plotted = set(powers_of_two(cfg.n_iter))
    snapshots: dict[str, np.ndarray] = {}
    rows: list[dict[str, float]] = []
    columns = [
        "iteration",
        "log evidence",
        "± se",
        "evidence change",
        "change se",
        "train loss",
        "E-step s",
        "M-step s",
        "sliced W2",
        "Sinkhorn",
    ]

    def on_iteration(k: int, estimator: Any, record: Mapping[str, Any]) -> None:
        samples = np.asarray(estimator.sample(cfg.n_eval, random_state=cfg.random_state + k))
        row: dict[str, Any] = {"iteration": k, **record_summary(record)}
        row.update(distances(samples, reference, seed=cfg.random_state))
        rows.append(row)
        if k == 0:
            snapshots["Gaussian init"] = samples
        elif k in plotted:
            snapshots[f"EM iteration {k}"] = samples
        if verbose:
            if k == 0:
                print(
                    format_table([row], columns, markdown=False).splitlines()[0],
                    file=stream,
                    flush=True,
                )
            print(
                format_table([row], columns, markdown=False).splitlines()[1],
                file=stream,
                flush=True,
            )

    fit_tracked(est, Y, operator, on_iteration)
    table = format_table(rows, columns)

    figures: dict[str, Path] = {}
    snapshots["true latents"] = reference
    figures["pairs"] = save_figure(
        pair_grid(snapshots, title="Prior samples along EM iterations vs true latents"),
        out / "pairs.png",
    )
    kept = est.best_iteration_
    final = np.asarray(est.sample(cfg.n_eval, random_state=cfg.random_state + kept))
    figures["corner_final"] = save_figure(
        corner_plot(final, reference, title=f"Kept prior: EM iteration {kept} of {est.n_iter_}"),
        out / "corner_final.png",
    )
    its = [r["iteration"] for r in rows]
    figures["evidence"] = save_figure(
        metric_curves(
            its,
            {"evidence estimate": [r["log evidence"] for r in rows]},
            errors={"evidence estimate": [2 * r["± se"] for r in rows]},
            ylabel="mean log-evidence (nats / observation)",
            title="Evidence along EM (error bars: 2 standard errors)",
            logy=False,
        ),
        out / "evidence.png",
    )
    figures["metrics"] = save_figure(
        metric_curves(
            its,
            {
                "sliced Wasserstein": [r["sliced W2"] for r in rows],
                "Sinkhorn divergence": [r["Sinkhorn"] for r in rows],
            },
            ylabel="distance to true latents",
            title="Prior vs true latents (iteration 0 = Gaussian init)",
        ),
        out / "metrics.png",
    )

    idx = np.arange(cfg.n_posterior)
    post = np.asarray(
        est.sample_posterior(
            Y[idx], operator[idx], n_samples=cfg.n_posterior_samples, random_state=cfg.random_state
        )
    )
    figures["posterior"] = save_figure(
        posterior_plot(
            post,
            np.asarray(latents)[idx],
            background=reference,
            title="Posterior samples x ~ q(x | y) for a few observations",
        ),
        out / "posterior.png",
    )

    header = machine_header(resolve_device(cfg.device))
    (out / "table.md").write_text("\n".join([*header, "", table, ""]))
    with open(out / "history.csv", "w") as f:
        f.write(",".join(columns) + "\n")
        for r in rows:
            f.write(",".join(str(r.get(c, "")) for c in columns) + "\n")
    seconds = time.perf_counter() - t_start
    say()
    say(table)
    best = min(rows[1:], key=lambda r: r["Sinkhorn"], default=rows[0])
    say(
        f"\nkept prior: EM iteration {kept} of {est.n_iter_} (highest evidence; converged: "
        f"{est.converged_}), Sinkhorn {rows[kept]['Sinkhorn']:.3g}; lowest Sinkhorn along EM "
        f"{best['Sinkhorn']:.3g} at iteration {best['iteration']}."
    )
    say(
        f"\nfigures written to {out}/ ({', '.join(p.name for p in figures.values())}); "
        f"total {seconds:.0f} s."
    )
    return DemoResult(
        rows=rows, figures=figures, table=table, config=cfg, estimator=est, seconds=seconds
    )
