r"""Distances between sample sets and image-quality metrics.

These are the metrics of the experiments of Rozet et al. (2024): distributional distances
between a learned prior's samples and held-out latents, and the peak signal-to-noise ratio of
reconstructions. The transport distances are thin wrappers over POT (Flamary et al., 2021;
``pip install pot``, in the ``demo`` and ``test`` extras), which fix the conventions the
experiments report:

- :func:`sliced_wasserstein` — the sliced Wasserstein distance (Rabin et al., 2011; Bonneel et
  al., 2015): POT's ``ot.sliced_wasserstein_distance`` (exact one-dimensional :math:`W_p` on
  every slice) on directions drawn with a scikit-learn ``random_state``.
- :func:`wasserstein` — the exact :math:`W_p` distance between two empirical measures: POT's
  ``ot.emd2`` (network simplex), the converged reference for the two approximations below.
- :func:`sinkhorn_divergence` — the debiased Sinkhorn divergence with its entropic terms
  (Genevay et al., 2018; Feydy et al., 2019): POT's ``ot.solve_sample(..., debias=True)`` run
  to convergence, or a fixed-budget symmetric solver with :math:`\varepsilon`-scaling, which
  POT lacks.
- :func:`psnr` — peak signal-to-noise ratio, optionally restricted to a mask (not in POT).

All functions accept NumPy arrays or torch tensors (on any device) and return Python floats
(or a NumPy array for ``psnr(..., reduction="none")``).

References

- F. Rozet, G. Andry, F. Lanusse and G. Louppe, "Learning Diffusion Priors from Observations
  by Expectation Maximization", NeurIPS 2024.
- R. Flamary et al., "POT: Python Optimal Transport", JMLR 22(78), 2021.
- J. Rabin, G. Peyré, J. Delon and M. Bernot, "Wasserstein Barycenter and its Application to
  Texture Mixing", SSVM 2011.
- N. Bonneel, J. Rabin, G. Peyré and H. Pfister, "Sliced and Radon Wasserstein Barycenters of
  Measures", JMIV 2015.
- A. Genevay, G. Peyré and M. Cuturi, "Learning Generative Models with Sinkhorn Divergences",
  AISTATS 2018.
- J. Feydy, T. Séjourné, F.-X. Vialard, S. Amari, A. Trouvé and G. Peyré, "Interpolating
  between Optimal Transport and MMD using Sinkhorn Divergences", AISTATS 2019.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from sklearn.utils import check_random_state
from torch import Tensor

from diffem._validation import as_float_tensor, check_finite, check_int, check_number

__all__ = ["psnr", "sinkhorn_divergence", "sliced_wasserstein", "wasserstein"]


def _ot() -> Any:
    """POT, imported when a transport metric is called."""
    try:
        import ot
    except ImportError as error:  # pragma: no cover - POT is in the demo and test extras
        raise ImportError(
            "diffem.metrics' transport distances need POT: pip install pot (or the diffem[demo] "
            "extra)."
        ) from error
    return ot


def _samples(value: Any, name: str, dtype: torch.dtype) -> Tensor:
    """A sample set as a finite ``(n, d)`` tensor of ``dtype``; ``(n,)`` means ``d = 1``."""
    tensor = as_float_tensor(value, name, dtype=dtype)
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(-1)
    if tensor.ndim != 2 or tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(
            f"{name} must have shape (n_samples, n_features) with n_samples >= 1, "
            f"got {tuple(tensor.shape)}."
        )
    check_finite(tensor, name)
    return tensor


def _pair(X: Any, Y: Any, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    X, Y = _samples(X, "X", dtype), _samples(Y, "Y", dtype)
    if X.shape[1] != Y.shape[1]:
        raise ValueError(
            f"X and Y must have the same number of features, got {X.shape[1]} and {Y.shape[1]}."
        )
    return X, Y.to(X.device)


# --------------------------------------------------------------------------- exact Wasserstein
def wasserstein(X: Any, Y: Any, p: float = 2.0) -> float:
    r"""Exact Wasserstein distance between the uniform empirical measures of two sample sets.

    .. math::

        W_p(X, Y) = \Big( \min_{\pi \in \Pi(\frac1n \mathbf{1}, \frac1m \mathbf{1})}
            \sum_{i,j} \pi_{ij} \lVert x_i - y_j \rVert^p \Big)^{1/p},

    solved exactly by POT's network simplex (``ot.emd2``) on the ``(n, m)`` cost matrix, in
    float64: :math:`O(nm)` memory and super-quadratic time (a few seconds for ``n = m = 2048``
    on one CPU core). Unlike :func:`sinkhorn_divergence` (entropic, fixed budget) and
    :func:`sliced_wasserstein` (random projections) it has no tuning parameter, which makes it
    the reference for ratios between distances.

    Parameters
    ----------
    X : array-like or tensor of shape ``(n, d)`` (or ``(n,)`` for ``d = 1``)
        First sample set.
    Y : array-like or tensor of shape ``(m, d)`` (or ``(m,)``)
        Second sample set; ``m`` may differ from ``n``.
    p : float, default 2.0
        Order :math:`p \geq 1`.

    Returns
    -------
    float
        :math:`W_p(X, Y) \geq 0`.

    Examples
    --------
    >>> import numpy as np
    >>> from diffem.metrics import wasserstein
    >>> x = np.random.default_rng(0).normal(size=(200, 3))
    >>> round(wasserstein(x, x + [0.3, 0.0, 0.4]), 6)
    0.5
    """
    p = check_number(p, "p", 1.0)
    X, Y = _pair(X, Y, torch.float64)
    cost = torch.cdist(X, Y).cpu().numpy() ** p
    a = np.full(len(X), 1.0 / len(X))
    b = np.full(len(Y), 1.0 / len(Y))
    value = float(_ot().emd2(a, b, cost, numItermax=10_000_000))
    return max(value, 0.0) ** (1.0 / p)


# --------------------------------------------------------------------------- sliced Wasserstein
def sliced_wasserstein(
    X: Any,
    Y: Any,
    n_projections: int = 256,
    p: float = 2.0,
    random_state: int | np.random.RandomState | None = None,
    projections: Any = None,
) -> float:
    r"""Sliced Wasserstein distance between two sample sets.

    .. math::

        \mathrm{SW}_p(X, Y) = \Big( \frac{1}{L} \sum_{l=1}^{L}
            W_p^p\big(\theta_l^\top X, \theta_l^\top Y\big) \Big)^{1/p},

    with :math:`L` directions :math:`\theta_l` drawn uniformly on the unit sphere
    :math:`\mathbb{S}^{d-1}` (a Monte Carlo estimate of the integral over the sphere; Rabin et
    al., 2011; Bonneel et al., 2015), between the uniform empirical measures. Each
    one-dimensional :math:`W_p` is exact (POT's ``ot.sliced_wasserstein_distance``: sorted
    samples, quantile functions compared on the union of their breakpoints :math:`\{i/n\} \cup
    \{j/m\}`). Computed in float64; cost :math:`O(L (n \log n + m \log m))`, memory
    :math:`O(L (n + m))`.

    In one dimension (``d = 1``) the result is the exact :math:`W_p` distance whatever
    ``n_projections``; in particular :math:`\mathrm{SW}_p(X, X + s) = |s|`.

    Parameters
    ----------
    X : array-like or tensor of shape ``(n, d)`` (or ``(n,)`` for ``d = 1``)
        First sample set.
    Y : array-like or tensor of shape ``(m, d)`` (or ``(m,)``)
        Second sample set; ``m`` may differ from ``n``.
    n_projections : int, default 256
        Number :math:`L` of random directions. Ignored if ``projections`` is given.
    p : float, default 2.0
        Order :math:`p \geq 1`.
    random_state : int, ``numpy.random.RandomState`` or None
        Seeds the random directions (normalised standard normal draws of
        ``check_random_state(random_state)``); the same seed gives the same directions, so that
        distances computed with one seed are comparable.
    projections : array-like of shape ``(L, d)``, optional
        Explicit directions (normalised to unit norm here) instead of random ones.

    Returns
    -------
    float
        :math:`\mathrm{SW}_p(X, Y) \geq 0`; symmetric in ``X`` and ``Y`` and invariant to the
        order of the samples.

    Examples
    --------
    >>> import numpy as np
    >>> from diffem.metrics import sliced_wasserstein
    >>> x = np.random.default_rng(0).normal(size=(1000, 1))
    >>> round(sliced_wasserstein(x, x + 0.5), 6)
    0.5
    """
    p = check_number(p, "p", 1.0)
    X, Y = _pair(X, Y, torch.float64)
    d = X.shape[1]
    if projections is not None:
        theta = as_float_tensor(projections, "projections", dtype=torch.float64)
        theta = theta.unsqueeze(0) if theta.ndim == 1 else theta
        if theta.ndim != 2 or theta.shape[1] != d or theta.shape[0] == 0:
            raise ValueError(
                f"projections must have shape (L, d) = (L, {d}), got {tuple(theta.shape)}."
            )
    elif d == 1:
        theta = torch.ones(1, 1, dtype=torch.float64)
    else:
        n_projections = check_int(n_projections, "n_projections", 1)
        rng = check_random_state(random_state)
        theta = torch.as_tensor(rng.standard_normal((n_projections, d)))
    norms = torch.linalg.norm(theta, dim=1, keepdim=True)
    if not bool(torch.isfinite(theta).all()) or bool((norms == 0).any()):
        raise ValueError("projections must be finite and non-zero.")
    theta = (theta / norms).to(X.device)
    return float(_ot().sliced_wasserstein_distance(X, Y, projections=theta.T, p=p))


# --------------------------------------------------------------------------- Sinkhorn
# What POT lacks: a Sinkhorn solver with epsilon-scaling (its method="geomloss" needs the
# geomloss package). At reg = 0.05 on 256 + 256 points of the manifold data (d = 5, one CPU
# thread), POT's ot.solve_sample(..., debias=True) (log-domain Sinkhorn at a fixed epsilon) took
# 7.1 s and had not converged after its default 1000 iterations (55 s for the 20000 it needs),
# where this fixed-budget solver takes 0.04 s; the demo evaluates the divergence after every EM
# iteration. Its accuracy: sinkhorn_divergence's docstring and the docs (Benchmarks).
def _softmin(eps: float, cost: Tensor, h: Tensor) -> Tensor:
    r""":math:`-\varepsilon \log \sum_j \exp(h_j - C_{ij} / \varepsilon)`, shape ``(n,)``."""
    return -eps * torch.logsumexp(h[None, :] - cost / eps, dim=1)


def _symmetric_sinkhorn(X: Tensor, Y: Tensor, reg: float, scaling: float, n_final: int) -> float:
    r"""Debiased :math:`S_\varepsilon(X, Y)` by symmetric log-domain Sinkhorn with
    :math:`\varepsilon`-scaling (Feydy et al., 2019, sec. 3.3).

    The four dual potentials :math:`f_{ba}, g_{ab}` (of :math:`\mathrm{OT}_\varepsilon(X, Y)`)
    and :math:`f_{aa}, g_{bb}` (of the symmetric problems) are updated together with averaged
    (symmetric) Sinkhorn steps while :math:`\varepsilon` decreases geometrically from the
    largest squared distance to ``reg``, then ``n_final`` more steps run at ``reg``. The
    divergence is the dual value :math:`\langle a, f_{ba} - f_{aa} \rangle + \langle b,
    g_{ab} - g_{bb} \rangle`.
    """
    n, m = X.shape[0], Y.shape[0]
    cost_xy = torch.cdist(X, Y).square()
    cost_xx = torch.cdist(X, X).square()
    cost_yy = torch.cdist(Y, Y).square()
    log_a = torch.full((n,), -math.log(n), dtype=X.dtype, device=X.device)
    log_b = torch.full((m,), -math.log(m), dtype=X.dtype, device=X.device)
    diameter = max(float(cost_xy.max()), float(cost_xx.max()), float(cost_yy.max()), reg)
    schedule = [diameter]
    while schedule[-1] * scaling > reg:
        schedule.append(schedule[-1] * scaling)
    schedule += [reg] * n_final
    eps = schedule[0]
    f_ba, g_ab = _softmin(eps, cost_xy, log_b), _softmin(eps, cost_xy.T, log_a)
    f_aa, g_bb = _softmin(eps, cost_xx, log_a), _softmin(eps, cost_yy, log_b)
    for eps in schedule:
        ft_ba = _softmin(eps, cost_xy, log_b + g_ab / eps)
        gt_ab = _softmin(eps, cost_xy.T, log_a + f_ba / eps)
        ft_aa = _softmin(eps, cost_xx, log_a + f_aa / eps)
        gt_bb = _softmin(eps, cost_yy, log_b + g_bb / eps)
        f_ba, g_ab = 0.5 * (f_ba + ft_ba), 0.5 * (g_ab + gt_ab)
        f_aa, g_bb = 0.5 * (f_aa + ft_aa), 0.5 * (g_bb + gt_bb)
    # A last, full (not averaged) step at eps = reg, as in Feydy et al. (2019).
    f_ba, g_ab = (
        _softmin(reg, cost_xy, log_b + g_ab / reg),
        _softmin(reg, cost_xy.T, log_a + f_ba / reg),
    )
    f_aa = _softmin(reg, cost_xx, log_a + f_aa / reg)
    g_bb = _softmin(reg, cost_yy, log_b + g_bb / reg)
    return float((f_ba - f_aa).mean() + (g_ab - g_bb).mean())


def sinkhorn_divergence(
    X: Any,
    Y: Any,
    reg: float = 0.05,
    *,
    solver: Literal["symmetric", "pot"] = "symmetric",
    scaling: float = 0.5,
    n_final: int = 4,
    max_iter: int = 1000,
    tol: float = 1e-2,
    max_samples: int | None = None,
    random_state: int | np.random.RandomState | None = None,
    dtype: torch.dtype = torch.float32,
) -> float:
    r"""Debiased Sinkhorn divergence between two sample sets, entropic terms included.

    .. math::

        S_\varepsilon(X, Y) = \mathrm{OT}_\varepsilon(X, Y)
            - \tfrac12 \mathrm{OT}_\varepsilon(X, X) - \tfrac12 \mathrm{OT}_\varepsilon(Y, Y),

    .. math::

        \mathrm{OT}_\varepsilon(X, Y) = \min_{P \in \Pi(a, b)} \sum_{ij} P_{ij} \|x_i - y_j\|^2
            + \varepsilon \, \mathrm{KL}(P \,\|\, a b^\top),

    between the uniform empirical measures :math:`a = \frac1n \mathbf 1`, :math:`b = \frac1m
    \mathbf 1` with the squared Euclidean cost (Genevay et al., 2018; Feydy et al., 2019). This
    is POT's ``ot.solve_sample(X, Y, reg=reg, debias=True).value`` (the objective with its
    :math:`\varepsilon \mathrm{KL}` term; ``.value_linear`` and
    ``ot.bregman.empirical_sinkhorn_divergence`` drop it). The debiasing makes
    :math:`S_\varepsilon(X, X) = 0`; :math:`S_\varepsilon` is non-negative, symmetric, and
    interpolates between :math:`W_2^2` (:math:`\varepsilon \to 0`) and an energy-distance MMD
    (:math:`\varepsilon \to \infty`). It is the divergence the paper reports on the manifold
    experiment (Rozet et al., 2024).

    ``reg`` is :math:`\varepsilon`, in the units of the cost (squared distances): the entropic
    blur acts at length scale :math:`\sqrt{\varepsilon}`. The default 0.05 (blur ~0.22) suits
    data of unit scale such as the manifold data set in :math:`[-2, 2]^5`.

    **Solvers.** Both run in torch on the device of ``X`` (if it is a tensor), with dense
    ``(n, m)`` cost matrices.

    - ``"pot"``: POT's log-domain Sinkhorn on each of the three problems, until the marginals
      are met within ``tol`` (relative to the norm of the uniform weights) or for ``max_iter``
      iterations. Converged, but slow at small ``reg`` (no :math:`\varepsilon`-scaling).
    - ``"symmetric"`` (default): a fixed budget of the symmetric Sinkhorn iterations of Feydy
      et al. (2019, sec. 3.3): :math:`\varepsilon` decreases from the largest squared
      distance by factors ``scaling`` to ``reg`` (:math:`\varepsilon`-scaling), one averaged
      step of the three problems' potentials per value, then ``n_final`` steps at ``reg``; the
      result is the dual value. About ``4 * (log(diameter^2 / reg) / log(1 / scaling) +
      n_final)`` log-sum-exp passes over ``(n, m)`` matrices, whatever the convergence: it
      agrees with ``"pot"`` when ``reg`` is large compared with the spacing of the samples
      and underestimates it below (measurements in the documentation, *Benchmarks*). Use it
      to compare priors on one data set with one ``reg``; use ``"pot"`` for the value
      itself.

    Parameters
    ----------
    X : array-like or tensor of shape ``(n, d)``
    Y : array-like or tensor of shape ``(m, d)``
    reg : float, default 0.05
        Entropic regularisation :math:`\varepsilon > 0`.
    solver : {"symmetric", "pot"}, default "symmetric"
        See above.
    scaling : float in (0, 1), default 0.5
        ``"symmetric"``: factor of the :math:`\varepsilon`-scaling schedule.
    n_final : int, default 4
        ``"symmetric"``: steps at :math:`\varepsilon =` ``reg`` after the schedule.
    max_iter : int, default 1000
        ``"pot"``: Sinkhorn iterations per problem.
    tol : float, default 1e-2
        ``"pot"``: stopping threshold on the violation of the marginals, relative to the norm
        of the uniform weights (POT's ``tol`` is ``tol / sqrt(max(n, m))``).
    max_samples : int, optional
        If given, each set larger than this is subsampled (without replacement, using
        ``random_state``) to bound the :math:`O(nm)` cost.
    random_state : int, ``numpy.random.RandomState`` or None
        Used only for ``max_samples``.
    dtype : torch dtype, default ``torch.float32``
        Precision of the computation.

    Returns
    -------
    float
        :math:`S_\varepsilon(X, Y)`, clipped at 0 from below (tiny negative values can come from
        the finite tolerance).

    Warns
    -----
    UserWarning
        ``"pot"``: POT's, if Sinkhorn has not converged within ``max_iter`` iterations.
    """
    reg = check_number(reg, "reg", 0.0, low_open=True)
    scaling = check_number(scaling, "scaling", 0.0, 1.0, low_open=True, high_open=True)
    if solver not in ("symmetric", "pot"):
        raise ValueError(f"solver must be 'symmetric' or 'pot', got {solver!r}.")
    n_final = check_int(n_final, "n_final", 0)
    max_iter = check_int(max_iter, "max_iter", 1)
    tol = check_number(tol, "tol", 0.0, low_open=True)
    max_samples = check_int(max_samples, "max_samples", 1, allow_none=True)
    X, Y = _pair(X, Y, dtype)
    if max_samples is not None:
        rng = check_random_state(random_state)
        if X.shape[0] > max_samples:
            X = X[torch.as_tensor(rng.choice(X.shape[0], max_samples, replace=False))]
        if Y.shape[0] > max_samples:
            Y = Y[torch.as_tensor(rng.choice(Y.shape[0], max_samples, replace=False))]
    with torch.no_grad():
        if solver == "symmetric":
            value = _symmetric_sinkhorn(X, Y, reg, scaling, n_final)
        else:
            stop = tol / math.sqrt(max(X.shape[0], Y.shape[0]))
            result = _ot().solve_sample(X, Y, reg=reg, debias=True, max_iter=max_iter, tol=stop)
            value = float(result.value)
    return max(value, 0.0)


# --------------------------------------------------------------------------- PSNR
def _as_image_array(value: Any, name: str) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number):
        raise TypeError(f"{name} must be an array of real numbers, got dtype {array.dtype}.")
    return array.astype(np.float64)


def psnr(
    x_true: Any,
    x_est: Any,
    data_range: float = 2.0,
    mask: Any = None,
    reduction: Literal["mean", "none", "pooled"] = "mean",
) -> float | np.ndarray:
    r"""Peak signal-to-noise ratio, in decibels.

    .. math::

        \mathrm{PSNR}(x, \hat x) = 10 \log_{10} \frac{R^2}{\mathrm{MSE}(x, \hat x)},
        \qquad \mathrm{MSE} = \frac{1}{|\Omega|} \sum_{j \in \Omega} (x_j - \hat x_j)^2,

    with :math:`R` the dynamic range (``data_range``) and :math:`\Omega` the entries selected by
    ``mask`` (all entries by default).

    Parameters
    ----------
    x_true, x_est : array-like or tensor
        Reference and estimate, same shape. A 1-D array is one image (flattened); a ``(n,
        ...)`` array is a set of ``n`` images, each flattened.
    data_range : float, default 2.0
        :math:`R`, the range of valid pixel values: 2 for data scaled to :math:`[-1, 1]` like
        :mod:`diffem.datasets`, 1 for :math:`[0, 1]`, 255 for 8-bit images.
    mask : bool array-like, optional
        Same shape as ``x_true`` (or broadcastable to it, e.g. one ``(d,)`` mask for all
        images); only the ``True`` entries count, e.g. the hidden pixels of an inpainting
        problem.
    reduction : {"mean", "none", "pooled"}, default "mean"
        For a set of images: ``"mean"`` averages the per-image PSNRs (the usual convention of
        image-restoration papers), ``"none"`` returns them as an array of shape ``(n,)``,
        ``"pooled"`` computes one PSNR from the MSE over all selected entries. Images with no
        selected entry are NaN under ``"none"`` and left out of ``"mean"``.

    Returns
    -------
    float or ndarray of shape ``(n,)``
        PSNR in dB; ``inf`` where the estimate is exact.
    """
    x_true = _as_image_array(x_true, "x_true")
    x_est = _as_image_array(x_est, "x_est")
    if x_true.shape != x_est.shape:
        raise ValueError(
            f"x_true and x_est must have the same shape, got {x_true.shape} and {x_est.shape}."
        )
    if x_true.size == 0:
        raise ValueError("x_true and x_est must not be empty.")
    if not (isinstance(data_range, (int, float, np.number)) and data_range > 0):
        raise ValueError(f"data_range must be a positive number, got {data_range!r}.")
    if reduction not in ("mean", "none", "pooled"):
        raise ValueError(f"reduction must be 'mean', 'none' or 'pooled', got {reduction!r}.")
    if mask is None:
        weights = np.ones(x_true.shape)
    else:
        if isinstance(mask, Tensor):
            mask = mask.detach().cpu().numpy()
        mask = np.asarray(mask)
        if mask.dtype != np.bool_ and not np.all((mask == 0) | (mask == 1)):
            raise ValueError("mask must be boolean or contain only 0 and 1.")
        try:
            weights = np.broadcast_to(mask.astype(np.float64), x_true.shape)
        except ValueError as error:
            raise ValueError(
                f"mask must have shape {x_true.shape} or broadcast to it, got {mask.shape}."
            ) from error
    if not (np.all(np.isfinite(x_true[weights > 0])) and np.all(np.isfinite(x_est[weights > 0]))):
        raise ValueError("x_true and x_est must be finite on the selected entries.")
    single = x_true.ndim <= 1
    n = 1 if single else x_true.shape[0]
    err = (np.where(weights > 0, x_true - x_est, 0.0) ** 2).reshape(n, -1)
    weights = weights.reshape(n, -1)
    count = weights.sum(axis=1)
    sq = (err * weights).sum(axis=1)
    if count.sum() == 0:
        raise ValueError("mask selects no entry.")
    peak = float(data_range) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        if reduction == "pooled" or single:
            mse = sq.sum() / count.sum()
            return float(10.0 * np.log10(peak / mse)) if mse > 0 else math.inf
        mse = np.where(count > 0, sq / np.maximum(count, 1), np.nan)
        values = np.where(mse > 0, 10.0 * np.log10(peak / mse), np.inf)
        values = np.where(count > 0, values, np.nan)
    if reduction == "none":
        return values
    return float(np.nanmean(values))
