r"""Source localisation from range measurements, the running example of Akyildiz's lecture notes
on sampling for Bayesian inference (Metropolis-Hastings).

A source at :math:`x \in \mathbb{R}^2` is heard by three sensors at :math:`s_1, s_2, s_3`,

.. math:: y_j = \lVert x - s_j \rVert + e_j, \qquad e_j \sim \mathcal{N}(0, \sigma_y^2),

a nonlinear observation model (:class:`~diffem.operators.Nonlinear` with :func:`ranges`). The
notes solve it for one source with a Gaussian prior by random-walk Metropolis-Hastings. Here
many sources are drawn from a clustered prior (:func:`source_prior`), each heard by its own three
sensors, and the prior is to be learned from the ranges alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.utils import check_random_state
from torch import Tensor
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from diffem._validation import check_int, check_number
from diffem.datasets._common import _Unpackable
from diffem.operators import Nonlinear, Operator
from diffem.priors import GaussianMixturePrior
from diffem.samplers.metropolis import MetropolisResult, random_walk_metropolis

__all__ = [
    "RangeSensorData",
    "log_posterior",
    "make_range_sensors",
    "metropolis_reference",
    "prior_log_density",
    "ranges",
    "source_prior",
]

LOG_2PI = math.log(2 * math.pi)


def ranges(x: Tensor, sensors: Tensor) -> Tensor:
    r"""Distances :math:`\lVert x - s_j \rVert` from sources ``x`` ``(B, 2)`` to their sensors
    ``sensors`` ``(B, S, 2)``; returns ``(B, S)``. The ``forward`` of the operator."""
    return torch.linalg.vector_norm(x.unsqueeze(-2) - sensors, dim=-1)


def source_prior(dtype: torch.dtype = torch.float32) -> GaussianMixturePrior:
    r"""The sources' prior: four elongated Gaussian clusters within a radius of about 2.5."""
    means = [[-1.6, 1.0], [1.4, 1.4], [0.2, -1.6], [1.8, -0.6]]
    shapes = [(0.5, 0.45, 0.15), (-0.3, 0.3, 0.3), (0.0, 0.5, 0.12), (1.2, 0.25, 0.1)]
    covs = []
    for angle, major, minor in shapes:
        rotation = np.array(
            [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
        )
        covs.append(rotation @ np.diag([major**2, minor**2]) @ rotation.T)
    weights = torch.tensor([0.3, 0.25, 0.3, 0.15], dtype=torch.float64)
    prior = GaussianMixturePrior(weights, torch.tensor(means, dtype=torch.float64), covs)
    return prior.to(dtype=dtype)


def log_posterior(
    prior: GaussianMixturePrior, Y: Tensor, operator: Operator
) -> Callable[[Tensor], Tensor]:
    r"""The unnormalised log-posteriors :math:`\log p(x) + \log \mathcal{N}(y_i; f_i(x),
    \Sigma_i)`, as a function ``(n, D) -> (n,)`` whose row ``i`` is evaluated against
    observation ``i`` (``Y`` ``(n, M)``, ``operator`` of batch ``n`` or 1), in ``Y``'s dtype.

    The Metropolis-Hastings target of :func:`diffem.samplers.random_walk_metropolis`.
    """
    density = _mixture(prior, Y.dtype, Y.device)
    op = operator.to(device=Y.device, dtype=Y.dtype)
    var = op.noise_var.expand(-1, op.n_measurements)

    def log_density(x: Tensor) -> Tensor:
        residual = Y - op.apply(x)
        log_likelihood = -0.5 * (residual**2 / var + torch.log(var) + LOG_2PI).sum(-1)
        return density.log_prob(x) + log_likelihood

    return log_density


def prior_log_density(prior: GaussianMixturePrior, x: Tensor) -> Tensor:
    r""":math:`\log p(x)` of a Gaussian mixture prior, ``(B, D) -> (B,)``."""
    return _mixture(prior, x.dtype, x.device).log_prob(x)


def _mixture(
    prior: GaussianMixturePrior, dtype: torch.dtype, device: torch.device
) -> MixtureSameFamily:
    weights, means, covs = (
        t.to(dtype=dtype, device=device) for t in (prior.weights, prior.means, prior.cov_matrices)
    )
    return MixtureSameFamily(
        Categorical(probs=weights, validate_args=False),
        MultivariateNormal(means, covs, validate_args=False),
        validate_args=False,
    )


def metropolis_reference(
    prior: GaussianMixturePrior,
    Y: Tensor,
    operator: Operator,
    *,
    chains: int = 64,
    n_samples: int = 64,
    burn_in: int = 2000,
    thin: int = 20,
    step_size: tuple[float, ...] = (0.05, 0.3, 1.5),
    pool: int = 4096,
    generator: torch.Generator | None = None,
) -> MetropolisResult:
    r"""Reference posterior samples under the true prior by random-walk Metropolis-Hastings
    (:func:`~diffem.samplers.random_walk_metropolis` on :func:`log_posterior`), ``chains``
    independent chains per observation.

    Each chain starts from a draw of a likelihood-weighted resampling of ``pool`` prior samples
    (sampling-importance-resampling): close to the posterior, modes included, so that the
    burn-in is short even when a random walk rarely crosses between modes; the chains stay
    exact Metropolis-Hastings chains. Step sizes as in
    :func:`~diffem.samplers.random_walk_metropolis` (a mixture of small and large steps).

    Returns
    -------
    MetropolisResult
        ``samples`` ``(n * chains, n_samples, D)``, the chains of observation ``i`` in rows
        ``i * chains`` to ``(i + 1) * chains - 1``, and their ``acceptance``.
    """
    n, d = Y.shape[0], prior.n_features
    rows = torch.arange(n).repeat_interleave(chains)
    target = log_posterior(prior, Y[rows], operator if len(operator) == 1 else operator[rows])
    draws = torch.as_tensor(prior.sample(pool, generator=generator), dtype=Y.dtype, device=Y.device)
    starts = []
    for i in range(n):
        op = operator if len(operator) == 1 else operator[i : i + 1]
        log_weights = log_posterior(prior, Y[i : i + 1].expand(pool, -1), op)(draws)
        log_weights = log_weights - prior_log_density(prior, draws)
        weights = torch.softmax(torch.nan_to_num(log_weights, nan=-torch.inf), dim=0)
        pick = torch.multinomial(weights, chains, replacement=True, generator=generator)
        starts.append(draws[pick])
    return random_walk_metropolis(
        target,
        torch.cat(starts).reshape(n * chains, d),
        n_samples,
        step_size,
        burn_in=burn_in,
        thin=thin,
        generator=generator,
    )


@dataclass(repr=False)
class RangeSensorData(_Unpackable):
    """Sources, their ranges to three sensors each, and the true prior.

    Unpacks as ``X, Y, operator``.

    Attributes
    ----------
    X : ndarray of shape ``(n_samples, 2)``, float32
        The sources (never seen by the estimator).
    Y : ndarray of shape ``(n_samples, 3)``, float32
        The noisy ranges :math:`y_{ij} = \\lVert x_i - s_{ij} \\rVert + e_{ij}`.
    operator : diffem.operators.Nonlinear
        :func:`ranges` with the sensor positions as per-sample parameters, and the noise std.
    sensors : ndarray of shape ``(n_samples, 3, 2)``, float32
        The sensor positions :math:`s_{ij}`.
    prior : diffem.priors.GaussianMixturePrior
        The sources' distribution (:func:`source_prior`): the ground truth, with its exact
        denoiser.
    """

    X: np.ndarray
    Y: np.ndarray
    operator: Nonlinear
    sensors: np.ndarray
    prior: GaussianMixturePrior

    _unpack = ("X", "Y", "operator")

    def __repr__(self) -> str:
        n, m, _ = self.operator.shape
        return f"RangeSensorData(n_samples={n}, n_sensors={m})"


def make_range_sensors(
    n_samples: int = 4096,
    noise_std: float = 0.3,
    random_state: int | np.random.RandomState | None = None,
    *,
    distance: float = 4.0,
    spread: float = 0.6,
) -> RangeSensorData:
    r"""Sources from :func:`source_prior`, each heard by its own three range sensors.

    Each source :math:`x_i` is heard by a small array of three sensors: the array's centre is
    uniform on the circle of radius ``distance`` around the origin, and each sensor is off
    the centre by :math:`\mathcal{N}(0, \texttt{spread}^2 I)`. The ranges,
    :math:`y_{ij} = \lVert x_i - s_{ij} \rVert + e_{ij}`,
    :math:`e_{ij} \sim \mathcal{N}(0, \sigma_y^2)`, locate a source well along the array's
    direction and poorly across it: the posteriors are arcs, cut by the prior's clusters into
    one or several modes. Since the arrays surround the sources, the prior is identifiable
    from the ranges.

    Parameters
    ----------
    n_samples : int, default 4096
    noise_std : float, default 0.3
        :math:`\sigma_y`.
    random_state : int, ``numpy.random.RandomState`` or None
    distance, spread : float
        Distance of the arrays from the origin and spread of their sensors.

    Returns
    -------
    RangeSensorData
        Unpacks as ``X, Y, operator``.

    Examples
    --------
    >>> from diffem.datasets import make_range_sensors
    >>> X, Y, operator = make_range_sensors(n_samples=100, random_state=0)
    >>> X.shape, Y.shape, operator.shape
    ((100, 2), (100, 3), (100, 3, 2))
    """
    n_samples = check_int(n_samples, "n_samples", 1)
    noise_std = check_number(noise_std, "noise_std", 0.0)
    distance = check_number(distance, "distance", 0.0)
    spread = check_number(spread, "spread", 0.0)
    rng = check_random_state(random_state)
    prior = source_prior(torch.float64)
    X = prior.sample(n_samples, generator=int(rng.randint(0, 2**31 - 1)))
    angle = rng.uniform(0.0, 2.0 * math.pi, size=n_samples)
    centre = distance * np.stack([np.cos(angle), np.sin(angle)], axis=-1)
    sensors = centre[:, None, :] + spread * rng.standard_normal((n_samples, 3, 2))
    clean = np.linalg.norm(X[:, None, :] - sensors, axis=-1)
    Y = clean + noise_std * rng.standard_normal(clean.shape)
    operator = Nonlinear(ranges, 2, 3, sensors.astype(np.float32), noise_std=noise_std)
    return RangeSensorData(
        X=X.astype(np.float32),
        Y=Y.astype(np.float32),
        operator=operator,
        sensors=sensors.astype(np.float32),
        prior=source_prior(),
    )
