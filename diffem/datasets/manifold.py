r"""The low-dimensional manifold experiment of Rozet et al. (2024, sec. 5.1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from sklearn.utils import check_random_state

from diffem._validation import check_int, check_number
from diffem.datasets._common import _Unpackable
from diffem.operators import Dense

__all__ = ["ManifoldData", "make_manifold", "smooth_curve"]


@dataclass(repr=False)
class ManifoldData(_Unpackable):
    """Latents on a random smooth curve and their random projections.

    Unpacks as ``X, Y, operator``.

    Attributes
    ----------
    X : ndarray of shape ``(n_samples, n_features)``, float32
        The latents, in :math:`[-2, 2]` per coordinate (never seen by the estimator).
    Y : ndarray of shape ``(n_samples, n_measurements)``, float32
        The observations :math:`y_i = A_i x_i + e_i`.
    operator : diffem.operators.Dense
        The per-sample projections :math:`A_i`, matrices of shape ``(n_samples,
        n_measurements, n_features)`` with unit-norm rows, and the noise std.
    t : ndarray of shape ``(n_samples,)``, float32
        The curve parameter of each latent, in :math:`[0, 1]`.
    """

    X: np.ndarray
    Y: np.ndarray
    operator: Dense
    t: np.ndarray

    _unpack = ("X", "Y", "operator")

    def __repr__(self) -> str:
        n, m, d = self.operator.shape
        return f"ManifoldData(n_samples={n}, n_features={d}, n_measurements={m})"


def smooth_curve(
    t: np.ndarray,
    n_features: int,
    rng: np.random.RandomState,
    alpha: float = 3.0,
    epsilon: float = 1e-3,
) -> np.ndarray:
    r"""A random smooth curve :math:`\gamma : [0, 1] \to \mathbb{R}^D`, evaluated at ``t``.

    .. math::

        \gamma_j(t) = \sum_{k=1}^{K} \frac{a_{jk}}{k^\alpha}
            \sin\!\big(2\pi (k\, b_{jk}\, t + c_{jk})\big),
        \qquad a_{jk}, b_{jk}, c_{jk} \sim \mathcal{U}(0, 1),

    with :math:`K = \lceil \epsilon^{-1/\alpha} \rceil` terms: the random manifolds of Zenke &
    Vogels (2021), as used by Rozet et al. (2024) for their manifold experiment. Larger
    :math:`\alpha` gives smoother curves.

    Parameters
    ----------
    t : ndarray of shape ``(n,)``
        Curve parameters.
    n_features : int
        :math:`D`.
    rng : numpy.random.RandomState
        Draws :math:`a, b, c` (``3 D K`` uniforms, and nothing else).
    alpha, epsilon : float
        Smoothness exponent and truncation level.

    Returns
    -------
    ndarray of shape ``(n, n_features)``
    """
    cutoff = math.ceil(epsilon ** (-1.0 / alpha))
    k = np.arange(1, cutoff + 1, dtype=np.float64)
    a, b, c = rng.uniform(size=(3, n_features, cutoff))
    phase = 2.0 * np.pi * (k * b * np.asarray(t, dtype=np.float64)[:, None, None] + c)
    return np.sum(a / k**alpha * np.sin(phase), axis=-1)


def make_manifold(
    n_samples: int = 16384,
    n_features: int = 5,
    n_measurements: int = 2,
    noise_std: float = 0.01,
    random_state: int | np.random.RandomState | None = None,
    *,
    manifold_random_state: int | np.random.RandomState | None = None,
) -> ManifoldData:
    r"""The paper's low-dimensional experiment: a 1-D manifold in :math:`\mathbb{R}^5` seen
    through random 2-D projections (Rozet et al., 2024, sec. 5.1).

    Latents lie on a random smooth curve (:func:`smooth_curve`, after Zenke & Vogels, 2021),
    :math:`x_i = \gamma(t_i)` with :math:`t_i \sim \mathcal{U}(0, 1)`, each coordinate mapped
    affinely onto :math:`[-2, 2]` (its minimum and maximum over the whole curve, computed on a
    fine grid of :math:`t`, go to -2 and 2, so the scaling does not depend on the sample). Each
    latent is observed through its own matrix :math:`A_i \in \mathbb{R}^{M \times D}` with
    i.i.d. Gaussian entries and rows normalised to unit norm:

    .. math::

        y_i = A_i x_i + e_i, \qquad e_i \sim \mathcal{N}(0, \sigma_y^2 I_M),
        \qquad \sigma_y = \texttt{noise\_std}.

    No single :math:`A_i` reveals :math:`x_i`, but the projections span all directions, so
    the distribution of the :math:`x_i` is identifiable from the :math:`y_i`.

    Parameters
    ----------
    n_samples : int, default 16384
        Number of pairs :math:`(x_i, y_i)`. (The paper uses 65536.)
    n_features : int, default 5
        :math:`D`, the dimension of the latents.
    n_measurements : int, default 2
        :math:`M`, the dimension of each observation.
    noise_std : float, default 0.01
        :math:`\sigma_y`.
    random_state : int, ``numpy.random.RandomState`` or None
        Seeds everything: the curve (unless ``manifold_random_state`` is given), the
        parameters :math:`t_i`, the matrices and the noise. The curve depends only on this
        seed, not on ``n_samples``.
    manifold_random_state : int, ``numpy.random.RandomState`` or None, optional
        Seeds the curve alone, e.g. to draw a held-out set on the same manifold with another
        ``random_state``.

    Returns
    -------
    ManifoldData
        ``X`` ``(n_samples, n_features)``, ``Y`` ``(n_samples, n_measurements)`` (float32),
        ``operator`` (:class:`~diffem.operators.Dense` of shape ``(n_samples,
        n_measurements, n_features)`` with ``noise_std``) and ``t``; unpacks as ``X, Y,
        operator``.

    References
    ----------
    .. [1] F. Rozet, G. Andry, F. Lanusse and G. Louppe, "Learning Diffusion Priors from
       Observations by Expectation Maximization", NeurIPS 2024.
    .. [2] F. Zenke and T. P. Vogels, "The Remarkable Robustness of Surrogate Gradient
       Learning for Instilling Complex Function in Spiking Neural Networks", Neural
       Computation 2021 (random manifolds).

    Examples
    --------
    >>> from diffem.datasets import make_manifold
    >>> X, Y, operator = make_manifold(n_samples=1000, random_state=0)
    >>> X.shape, Y.shape, operator.shape
    ((1000, 5), (1000, 2), (1000, 2, 5))
    """
    n_samples = check_int(n_samples, "n_samples", 1)
    n_features = check_int(n_features, "n_features", 1)
    n_measurements = check_int(n_measurements, "n_measurements", 1)
    noise_std = check_number(noise_std, "noise_std", 0.0)
    rng = check_random_state(random_state)
    curve_rng = rng if manifold_random_state is None else check_random_state(manifold_random_state)
    # The curve's coefficients (a fixed number of uniforms) are drawn first, so that the curve
    # depends on the seed only; replaying the same state evaluates it at the t_i.
    state = curve_rng.get_state()
    on_grid = smooth_curve(np.linspace(0.0, 1.0, 8193), n_features, curve_rng)
    lo, hi = on_grid.min(axis=0), on_grid.max(axis=0)
    t = rng.uniform(size=n_samples)
    replay = np.random.RandomState()
    replay.set_state(state)
    X = smooth_curve(t, n_features, replay)
    X = np.clip((X - lo) * (4.0 / np.maximum(hi - lo, 1e-12)) - 2.0, -2.0, 2.0)
    A = rng.standard_normal((n_samples, n_measurements, n_features))
    A /= np.linalg.norm(A, axis=-1, keepdims=True)
    Y = np.einsum("nmd,nd->nm", A, X) + noise_std * rng.standard_normal((n_samples, n_measurements))
    operator = Dense(A.astype(np.float32), noise_std=noise_std)
    return ManifoldData(
        X=X.astype(np.float32),
        Y=Y.astype(np.float32),
        operator=operator,
        t=t.astype(np.float32),
    )
