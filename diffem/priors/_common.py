r"""Shared machinery of the analytic priors: input conversion and exact Gaussian conditioning.

For a Gaussian component :math:`x \sim \mathcal{N}(\mu, C)` observed through
:math:`y = A x + e`, :math:`e \sim \mathcal{N}(0, \Sigma_y)` (diagonal), everything is computed in
measurement space with the :math:`M \times M` matrix

.. math:: S = A C A^\top + \Sigma_y,

.. math::
    \log p(y) = \log \mathcal{N}(y; A\mu, S), \qquad
    E[x \mid y] = \mu + C A^\top S^{-1} (y - A \mu), \qquad
    \operatorname{Cov}[x \mid y] = C - C A^\top S^{-1} A C,

and exact posterior samples by Matheron's rule (pathwise conditioning; Wilson et al., 2020,
"Efficiently sampling functions from Gaussian process posteriors", ICML):

.. math:: x \sim \mathcal{N}(\mu, C),\; e \sim \mathcal{N}(0, \Sigma_y): \qquad
    x + C A^\top S^{-1} (y - A x - e) \sim p(x \mid y).

Pinned (unobserved) measurements have a zero row in :math:`A`, value 0 and variance 1 (see
:mod:`diffem.operators.base`); each adds :math:`-\tfrac12 \log 2\pi` to :math:`\log
\mathcal{N}(y; A\mu, S)`, which is removed so that log-evidences count observed entries only.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from diffem._validation import as_float_tensor
from diffem.operators.base import Operator

LOG_2PI = math.log(2 * math.pi)

# Number of float64 entries a chunk of measurement-space matrices may hold (about 128 MB).
_CHUNK_ENTRIES = 2**24


# ---------------------------------------------------------------------- draws and conversions
def _draw(
    draw: Any,
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """``draw(shape)`` (``torch.randn``, ``torch.rand``) on the generator's device, then moved to
    ``device``, so that a CPU generator gives the same draws for a prior on any device."""
    gen_device = generator.device if generator is not None else device
    return draw(shape, generator=generator, dtype=dtype, device=gen_device).to(device)


def randn(shape: tuple[int, ...], generator: Any, dtype: torch.dtype, device: Any) -> Tensor:
    """Standard normal draws of ``shape``."""
    return _draw(torch.randn, shape, generator, dtype, device)


def rand(shape: tuple[int, ...], generator: Any, dtype: torch.dtype, device: Any) -> Tensor:
    """Uniform draws on ``[0, 1)`` of ``shape``."""
    return _draw(torch.rand, shape, generator, dtype, device)


def to_numpy(tensor: Tensor, dtype: torch.dtype) -> np.ndarray:
    return tensor.detach().to(dtype=dtype).cpu().numpy()


def as_sigma(sigma: Any, x_t: Tensor) -> Tensor:
    """Noise levels as a ``(B,)`` tensor of ``x_t``'s dtype and device."""
    batch = x_t.shape[0]
    if isinstance(sigma, Tensor):
        sigma = sigma.to(dtype=x_t.dtype, device=x_t.device)
    else:
        sigma = torch.as_tensor(sigma, dtype=x_t.dtype, device=x_t.device)
    if sigma.ndim > 1:
        sigma = sigma.reshape(-1) if sigma.numel() in (1, batch) else sigma
    if sigma.ndim == 0 or sigma.numel() == 1:
        sigma = sigma.reshape(1).expand(batch)
    if sigma.shape != (batch,):
        raise ValueError(
            f"sigma must be a scalar or of shape (B,) = ({batch},), got {tuple(sigma.shape)}."
        )
    return sigma


def check_x_t(x_t: Any, n_features: int) -> Tensor:
    if not isinstance(x_t, Tensor):
        raise TypeError(f"x_t must be a torch.Tensor, got {type(x_t).__name__}.")
    if x_t.ndim != 2 or x_t.shape[-1] != n_features:
        raise ValueError(f"x_t must have shape (B, {n_features}), got {tuple(x_t.shape)}.")
    if not x_t.is_floating_point():
        raise TypeError(f"x_t must be a floating tensor, got {x_t.dtype}.")
    return x_t


# ---------------------------------------------------------------------- observations
class Observations(NamedTuple):
    """A chunk of observations on the pinned convention, in float64 on the prior's device."""

    y: Tensor  # (b, M)
    matrix: Tensor  # (b | 1, M, D)
    noise_var: Tensor  # (b | 1, M)
    n_pinned: Tensor  # (b | 1,)

    def __len__(self) -> int:
        return self.y.shape[0]


class ObservationSet:
    """Validated observations ``Y`` ``(n, M)`` with their operator (acting on ``n_features``
    features, if given), served in chunks.

    Dense operator matrices are built one chunk at a time, so memory stays bounded for any
    ``n``: a chunk holds about ``2**24 / factor`` entries of ``(M, max(M, D))`` matrices.
    """

    def __init__(
        self, Y: Any, operator: Operator, n_features: int | None, device: torch.device
    ) -> None:
        if not isinstance(operator, Operator):
            raise TypeError(
                f"operator must be a diffem.operators.Operator, got {type(operator).__name__}."
            )
        n_op, m, d = operator.shape
        if n_features is not None and d != n_features:
            raise ValueError(
                f"operator acts on {d} features but the prior has n_features = {n_features}."
            )
        y = as_float_tensor(Y, "Y", dtype=torch.float64, device=device)
        if y.ndim == 1 and n_op == 1:
            y = y.unsqueeze(0)
        if y.ndim != 2 or y.shape[1] != m:
            raise ValueError(f"Y must have shape (n, M) = (n, {m}), got {tuple(y.shape)}.")
        if n_op != 1 and y.shape[0] != n_op:
            raise ValueError(
                f"Y has {y.shape[0]} rows but the operator has {n_op} samples; expected Y of "
                f"shape ({n_op}, {m})."
            )
        if y.shape[0] == 0:
            raise ValueError("Y must have at least one row.")
        self.operator = operator.to(device=device, dtype=torch.float64)
        self.shared = n_op == 1
        self.y = y
        self.m, self.d = m, d
        self._shared_parts: tuple[Tensor, Tensor, Tensor] | None = None
        self._whole: Observations | None = None

    def __len__(self) -> int:
        return self.y.shape[0]

    def _parts(self, op: Operator) -> tuple[Tensor, Tensor, Tensor]:
        matrix = op.matrix().to(torch.float64)
        noise_var = op.noise_var.to(torch.float64).expand(-1, self.m)
        n_pinned = (self.m - op.n_observed()).to(torch.float64)
        return matrix, noise_var, n_pinned

    def chunk(self, start: int, stop: int) -> Observations:
        stop = min(stop, len(self))
        if self.shared:
            if self._shared_parts is None:
                self._shared_parts = self._parts(self.operator)
            matrix, noise_var, n_pinned = self._shared_parts
            op = self.operator
        else:
            op = self.operator[start:stop]
            matrix, noise_var, n_pinned = self._parts(op)
        y = op.prepare(self.y[start:stop])
        return Observations(y, matrix, noise_var, n_pinned)

    def chunks(self, factor: int = 1):
        """Yields consecutive :class:`Observations` chunks covering all rows in order."""
        rows = max(1, _CHUNK_ENTRIES // max(1, factor * self.m * max(self.m, self.d)))
        if rows >= len(self):
            # A single chunk: keep it, since iterative callers (EM) ask for it again.
            if self._whole is None:
                self._whole = self.chunk(0, len(self))
            yield self._whole
            return
        for start in range(0, len(self), rows):
            yield self.chunk(start, start + rows)


# ---------------------------------------------------------------------- covariances
class Covariance:
    """A float64 covariance :math:`C` with the few products the exact computations need."""

    dim: int

    def right(self, A: Tensor) -> Tensor:
        """:math:`A C` for ``A`` of shape ``(..., M, D)``."""
        raise NotImplementedError

    def sqrt_mul(self, z: Tensor) -> Tensor:
        """:math:`C^{1/2} z` for standard normal ``z`` of shape ``(B, R)``; gives ``(B, D)``."""
        raise NotImplementedError

    @property
    def sqrt_width(self) -> int:
        raise NotImplementedError

    def dense(self) -> Tensor:
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        z = randn((n, self.sqrt_width), generator, torch.float64, device)
        return self.sqrt_mul(z)


class FullCovariance(Covariance):
    def __init__(self, cov: Tensor, eigvals: Tensor, eigvecs: Tensor) -> None:
        self.cov, self.eigvals, self.eigvecs = cov, eigvals, eigvecs
        self.dim = cov.shape[-1]

    def right(self, A: Tensor) -> Tensor:
        return A @ self.cov

    @property
    def sqrt_width(self) -> int:
        return self.dim

    def sqrt_mul(self, z: Tensor) -> Tensor:
        return (z * self.eigvals.clamp_min(0).sqrt()) @ self.eigvecs.mT

    def dense(self) -> Tensor:
        return self.cov


class LowRankCovariance(Covariance):
    """:math:`C = F F^\\top + \\operatorname{diag}(d)`."""

    def __init__(self, factor: Tensor, diag: Tensor) -> None:
        self.factor, self.diag = factor, diag
        self.dim = diag.shape[-1]

    def right(self, A: Tensor) -> Tensor:
        return (A @ self.factor) @ self.factor.mT + A * self.diag

    @property
    def sqrt_width(self) -> int:
        return self.factor.shape[-1] + self.dim

    def sqrt_mul(self, z: Tensor) -> Tensor:
        r = self.factor.shape[-1]
        return z[:, :r] @ self.factor.mT + z[:, r:] * self.diag.sqrt()

    def dense(self) -> Tensor:
        return self.factor @ self.factor.mT + torch.diag(self.diag)


class DiagCovariance(Covariance):
    """:math:`C = \\operatorname{diag}(d)` (an isotropic one has all ``d`` equal)."""

    def __init__(self, diag: Tensor) -> None:
        self.diag = diag
        self.dim = diag.shape[-1]

    def right(self, A: Tensor) -> Tensor:
        return A * self.diag

    @property
    def sqrt_width(self) -> int:
        return self.dim

    def sqrt_mul(self, z: Tensor) -> Tensor:
        return z * self.diag.sqrt()

    def dense(self) -> Tensor:
        return torch.diag(self.diag)


# ---------------------------------------------------------------------- conditioning
def _cholesky(S: Tensor) -> Tensor:
    """Cholesky factor of a batch of SPD matrices, adding a growing jitter if needed."""
    L, info = torch.linalg.cholesky_ex(S)
    if not bool((info != 0).any()):
        return L
    scale = S.diagonal(dim1=-2, dim2=-1).abs().mean(-1, keepdim=True).clamp_min(1e-300)
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
    for exponent in range(-12, 0):
        jitter = (10.0**exponent) * scale.unsqueeze(-1) * eye
        L, info = torch.linalg.cholesky_ex(S + jitter)
        if not bool((info != 0).any()):
            return L
    raise ValueError(
        "the marginal covariance of the observations A C A^T + Sigma_y is singular; add "
        "observation noise (noise_std > 0) or a ridge to the prior covariance."
    )


class Conditioned(NamedTuple):
    """A Gaussian component conditioned on a chunk of observations."""

    L: Tensor  # (b, M, M) Cholesky factor of S
    AC: Tensor  # (b | 1, M, D)
    residual: Tensor  # (b, M), y - A mu
    log_evidence: Tensor  # (b,)

    def solve(self, v: Tensor) -> Tensor:
        """:math:`S^{-1} v` for ``v`` of shape ``(b, M)``."""
        return torch.cholesky_solve(v.unsqueeze(-1), self.L).squeeze(-1)

    def gain(self, v: Tensor) -> Tensor:
        """:math:`C A^\\top S^{-1} v`, shape ``(b, D)``."""
        return (self.AC.mT @ self.solve(v).unsqueeze(-1)).squeeze(-1)

    def mean_shift(self) -> Tensor:
        return self.gain(self.residual)

    def whitened_gain(self) -> Tensor:
        """:math:`W = L^{-1} A C` with :math:`S = L L^\\top`, shape ``(b, M, D)``."""
        return torch.linalg.solve_triangular(
            self.L, self.AC.expand(self.L.shape[0], -1, -1), upper=False
        )

    def cov_reduction(self) -> Tensor:
        """:math:`C A^\\top S^{-1} A C = W^\\top W`, shape ``(b, D, D)``."""
        W = self.whitened_gain()
        return W.mT @ W


def condition(mean: Tensor, cov: Covariance, obs: Observations) -> Conditioned:
    """Conditions :math:`\\mathcal{N}(\\mu, C)` on a chunk of observations (measurement space)."""
    A = obs.matrix
    AC = cov.right(A)  # (b | 1, M, D)
    S = AC @ A.mT + torch.diag_embed(obs.noise_var)
    S = 0.5 * (S + S.mT)
    b = obs.y.shape[0]
    if S.shape[0] != b:
        S = S.expand(b, -1, -1)
    L = _cholesky(S)
    residual = obs.y - (A @ mean.unsqueeze(-1)).squeeze(-1)
    w = torch.linalg.solve_triangular(L, residual.unsqueeze(-1), upper=False).squeeze(-1)
    m = obs.y.shape[-1]
    logdet = 2 * torch.log(L.diagonal(dim1=-2, dim2=-1)).sum(-1)
    log_evidence = -0.5 * (w**2).sum(-1) - 0.5 * logdet - 0.5 * (m - obs.n_pinned) * LOG_2PI
    return Conditioned(L, AC, residual, log_evidence)


def matheron(
    mean: Tensor,
    cov: Covariance,
    cond: Conditioned,
    obs: Observations,
    rows: Tensor,
    generator: torch.Generator | None,
) -> Tensor:
    """Exact posterior samples ``(len(rows), D)``, one per entry of ``rows`` (indices into the
    chunk), by Matheron's rule (Wilson et al., 2020)."""
    device = mean.device
    k = rows.shape[0]
    x = mean + cov.sample(k, generator, device)  # (k, D)
    e = randn((k, obs.y.shape[-1]), generator, torch.float64, device)

    def pick(t: Tensor) -> Tensor:
        return t if t.shape[0] == 1 else t[rows]

    e = e * pick(obs.noise_var).sqrt()
    Ax = (pick(obs.matrix) @ x.unsqueeze(-1)).squeeze(-1)  # (k, M)
    v = obs.y[rows] - Ax - e
    u = torch.cholesky_solve(v.unsqueeze(-1), cond.L[rows])  # (k, M, 1)
    return x + (pick(cond.AC).mT @ u).squeeze(-1)
