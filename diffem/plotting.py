r"""Figures for the demo and the benchmarks (matplotlib, Agg backend).

All functions take NumPy arrays and return a :class:`matplotlib.figure.Figure`; saving is the
caller's business (:func:`save_figure`). The pair plots follow the layout of the
low-dimensional manifold figure of Rozet et al. (2024, "Learning Diffusion Priors from
Observations by Expectation Maximization", NeurIPS): 2-D histograms of pairs of coordinates of
prior samples, EM iteration after EM iteration, next to the true latents.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

if os.environ.get("MPLBACKEND") is None:  # pragma: no branch - never override a user's choice
    matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

__all__ = [
    "corner_plot",
    "default_pairs",
    "image_grid",
    "metric_curves",
    "pair_grid",
    "posterior_plot",
    "save_figure",
]


def _cmap(name: str = "Blues") -> ListedColormap:
    """``name`` with white for empty bins, as in the paper's figures."""
    base = plt.get_cmap(name)
    colors = [base(i) for i in range(48, base.N)]
    return ListedColormap([(1.0, 1.0, 1.0), *colors])


def _hist2d(
    ax: plt.Axes,
    a: np.ndarray,
    b: np.ndarray,
    lim: tuple[float, float],
    bins: int,
    cmap: str = "Blues",
) -> None:
    h, xe, ye = np.histogram2d(a, b, bins=bins, range=[lim, lim])
    ax.pcolormesh(xe, ye, h.T, cmap=_cmap(cmap), shading="flat", rasterized=True)
    ax.set_xlim(lim)
    ax.set_ylim(lim)


def _finish(fig: Figure, title: str | None) -> None:
    """Title above the axes (room reserved for it) and a tight layout."""
    if title:
        fig.suptitle(title)
        height = fig.get_figheight()
        fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.45 / height))
    else:
        fig.tight_layout()


def default_pairs(n_features: int, max_pairs: int = 4) -> list[tuple[int, int]]:
    """Consecutive coordinate pairs ``(0, 1), (1, 2), ...``, at most ``max_pairs``."""
    pairs = [(i, i + 1) for i in range(n_features - 1)]
    return pairs[:max_pairs] if pairs else [(0, 0)]


def corner_plot(
    samples: np.ndarray,
    reference: np.ndarray | None = None,
    *,
    lim: tuple[float, float] = (-3.0, 3.0),
    bins: int = 64,
    title: str | None = None,
    labels: Sequence[str] | None = None,
) -> Figure:
    """Corner (pair) plot of ``samples`` of shape ``(n, d)``.

    Below the diagonal: 2-D histograms of every pair of coordinates. On the diagonal: 1-D
    histograms of ``samples`` (filled) and, if given, of ``reference`` (black line), e.g. the
    true latents.
    """
    samples = np.asarray(samples, dtype=np.float64)
    d = samples.shape[1]
    labels = list(labels) if labels is not None else [f"$x_{i}$" for i in range(d)]
    fig, axes = plt.subplots(d, d, figsize=(1.7 * d + 0.6, 1.7 * d + 0.6), squeeze=False)
    edges = np.linspace(*lim, bins + 1)
    for i in range(d):
        for j in range(d):
            ax = axes[i, j]
            if j > i:
                ax.set_visible(False)
                continue
            if i == j:
                ax.hist(
                    samples[:, i],
                    bins=edges,
                    density=True,
                    color="tab:blue",
                    alpha=0.6,
                    label="samples",
                )
                if reference is not None:
                    ax.hist(
                        np.asarray(reference)[:, i],
                        bins=edges,
                        density=True,
                        histtype="step",
                        color="black",
                        lw=1.0,
                        label="true latents",
                    )
                ax.set_xlim(lim)
                ax.set_yticks([])
            else:
                _hist2d(ax, samples[:, j], samples[:, i], lim, bins)
            if i == d - 1:
                ax.set_xlabel(labels[j])
            else:
                ax.tick_params(labelbottom=False)
            if j == 0 and i > 0:
                ax.set_ylabel(labels[i])
            elif j > 0:
                ax.tick_params(labelleft=False)
    ticks = [t for t in (-2.0, 0.0, 2.0) if lim[0] <= t <= lim[1]]
    for ax in axes.flat:
        ax.set_xticks(ticks)
        if ax.get_yticks().size and ax not in axes.diagonal():
            ax.set_yticks(ticks)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if reference is not None and d > 1:
        handles, labels_ = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels_, loc="upper right", fontsize=9, frameon=False)
    return fig


def pair_grid(
    snapshots: Mapping[str, np.ndarray],
    *,
    pairs: Sequence[tuple[int, int]] | None = None,
    lim: tuple[float, float] = (-3.0, 3.0),
    bins: int = 64,
    title: str | None = None,
) -> Figure:
    """Grid of 2-D histograms: one row per entry of ``snapshots``, one column per pair.

    ``snapshots`` maps row names (``"EM iteration 1"``, ``"true latents"``, ...) to samples of
    shape ``(n, d)``; rows are drawn in the mapping's order.
    """
    names = list(snapshots)
    d = np.asarray(snapshots[names[0]]).shape[1]
    pairs = list(pairs) if pairs is not None else default_pairs(d)
    nr, nc = len(names), len(pairs)
    fig, axes = plt.subplots(nr, nc, figsize=(2.1 * nc + 1.2, 2.1 * nr + 0.4), squeeze=False)
    for r, name in enumerate(names):
        x = np.asarray(snapshots[name], dtype=np.float64)
        cmap = "Greys" if "true" in name.lower() else "Blues"
        for c, (i, j) in enumerate(pairs):
            ax = axes[r, c]
            _hist2d(ax, x[:, i], x[:, j], lim, bins, cmap=cmap)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == nr - 1:
                ax.set_xlabel(f"$x_{i}$")
            if r == 0:
                ax.set_title(f"$x_{j}$ vs $x_{i}$", fontsize=9)
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
    _finish(fig, title)
    return fig


def metric_curves(
    iterations: Sequence[float],
    curves: Mapping[str, Sequence[float]],
    *,
    baselines: Mapping[str, float] | None = None,
    errors: Mapping[str, Sequence[float]] | None = None,
    ylabel: str = "metric",
    title: str | None = None,
    logy: bool = True,
) -> Figure:
    """Metrics against EM iteration, with horizontal lines for constant baselines and, for the
    curves named in ``errors``, error bars of those half-widths."""
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    it = np.asarray(iterations, dtype=np.float64)
    for name, values in curves.items():
        values = np.asarray(values, dtype=np.float64)
        if errors is not None and name in errors:
            bars = np.asarray(errors[name], dtype=np.float64)
            ax.errorbar(it, values, yerr=bars, marker="o", ms=3, capsize=2, label=name)
        else:
            ax.plot(it, values, marker="o", ms=3, label=name)
    styles = ["--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1))]
    for k, (name, value) in enumerate((baselines or {}).items()):
        ax.axhline(value, ls=styles[k % len(styles)], color=f"C{k + 2}", label=name)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("EM iteration")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def posterior_plot(
    posterior: np.ndarray,
    truth: np.ndarray,
    *,
    background: np.ndarray | None = None,
    pairs: Sequence[tuple[int, int]] | None = None,
    lim: tuple[float, float] = (-3.0, 3.0),
    title: str | None = None,
) -> Figure:
    """Posterior samples for a few observations.

    ``posterior`` has shape ``(k, S, d)`` (``S`` samples for each of ``k`` observations) and
    ``truth`` shape ``(k, d)``; one row per observation, one column per coordinate pair. The
    true latents (``background``) are drawn in grey for context.
    """
    posterior = np.asarray(posterior, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    k, _, d = posterior.shape
    pairs = list(pairs) if pairs is not None else default_pairs(d)
    fig, axes = plt.subplots(
        k, len(pairs), figsize=(2.3 * len(pairs) + 1.0, 2.3 * k + 0.4), squeeze=False
    )
    for r in range(k):
        for c, (i, j) in enumerate(pairs):
            ax = axes[r, c]
            if background is not None:
                ax.scatter(background[:, i], background[:, j], s=1, c="0.8", lw=0, rasterized=True)
            ax.scatter(
                posterior[r, :, i],
                posterior[r, :, j],
                s=5,
                c="tab:blue",
                alpha=0.5,
                lw=0,
                label="posterior samples",
            )
            ax.scatter(
                truth[r, i],
                truth[r, j],
                marker="*",
                s=80,
                c="tab:red",
                edgecolors="k",
                lw=0.5,
                label="true latent",
            )
            ax.set_xlim(lim)
            ax.set_ylim(lim)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == k - 1:
                ax.set_xlabel(f"$x_{i}$")
            if c == 0:
                ax.set_ylabel(f"obs. {r}: $x_{j}$")
            else:
                ax.set_ylabel(f"$x_{j}$")
    axes[0, -1].legend(fontsize=7, loc="upper right")
    _finish(fig, title)
    return fig


def image_grid(
    rows: Mapping[str, np.ndarray],
    image_shape: tuple[int, ...],
    *,
    vmin: float = 0.0,
    vmax: float = 1.0,
    title: str | None = None,
    missing_color: str = "tab:red",
) -> Figure:
    """Rows of flattened grey-level images (``(n, H*W)`` each, same ``n``); NaN drawn red."""
    names = list(rows)
    n = np.asarray(rows[names[0]]).shape[0]
    h, w = image_shape[-2:]
    cmap = plt.get_cmap("gray").copy()
    cmap.set_bad(missing_color)
    fig, axes = plt.subplots(
        len(names), n, figsize=(1.0 * n + 1.2, 1.05 * len(names) + 0.4), squeeze=False
    )
    for r, name in enumerate(names):
        imgs = np.asarray(rows[name], dtype=np.float64).reshape(n, h, w)
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(
                np.ma.masked_invalid(imgs[c]),
                cmap=cmap,
                vmin=vmin,
                vmax=vmax,
                interpolation="nearest",
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
    _finish(fig, title)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 110) -> Path:
    """Save ``fig`` to ``path`` (creating folders) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path
