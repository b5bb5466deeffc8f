r"""Differentiable nonlinear observation models :math:`y_i = f(x_i; \theta_i) + e_i`.

A :class:`Nonlinear` operator wraps a torch function ``forward(x, params) -> y``. Its
:meth:`~Nonlinear.apply` is :math:`f` itself; the samplers and the Gaussian computations use its
*linearisation* at a point :math:`\bar{x}`, :meth:`Nonlinear.linearize`, the batch of Jacobians
:math:`J_i = \partial f(\bar{x}_i; \theta_i) / \partial x` as a linear
:class:`~diffem.operators.Operator` (:class:`Linearized`) whose products are automatic
differentiation, never a dense matrix:

.. math::
    J_i^\top u = \nabla_x \big(u^\top f(x; \theta_i)\big)\big|_{x = \bar{x}_i}, \qquad
    J_i v = \nabla_u \big(v^\top J_i^\top u\big)

(vector-Jacobian products, and Jacobian-vector products by the double-backward identity, both
through one autograd graph of :math:`f` at :math:`\bar{x}`).

Every linear operator's :meth:`~diffem.operators.Operator.linearize` returns the operator
itself, so a guidance computes :math:`r = y - f(\hat{x})` with ``operator.apply`` and then
works with ``operator.linearize(x_hat)`` whatever the operator: for a nonlinear one, the
moment-matching likelihood of MMPS becomes :math:`\mathcal{N}(y \mid f(\hat{x}), \Sigma_y +
J \mathbb{V} J^\top)` with :math:`J` the Jacobian at :math:`\hat{x} = E[x \mid x_t]`, as in
the paper's code for nonlinear forward models (Rozet et al., 2024).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from diffem._validation import as_float_tensor, check_finite, check_int
from diffem.operators.base import Operator

__all__ = ["Linearized", "Nonlinear"]

Forward = Callable[[Tensor, Tensor | None], Tensor]


def _as_params(params: Any) -> Tensor:
    """Per-sample parameters as a tensor with a leading batch dimension (floats in torch's
    default dtype, like the other operators' parameters; integer and boolean tensors kept)."""
    if isinstance(params, Tensor) and not params.is_floating_point():
        tensor = params
    elif isinstance(params, np.ndarray) and params.dtype.kind in "biu":
        tensor = torch.as_tensor(params)
    else:
        tensor = as_float_tensor(params, "params")
    if tensor.ndim == 0 or tensor.shape[0] == 0:
        raise ValueError(
            f"params must have a leading batch dimension (n, ...) or (1, ...), got shape "
            f"{tuple(tensor.shape)}."
        )
    if tensor.is_floating_point():
        check_finite(tensor, "params")
    return tensor


def _rows(tensor: Tensor | None, batch: int) -> Tensor | None:
    """``tensor`` with its leading dimension (``batch`` or 1) expanded to ``batch``."""
    if tensor is None or tensor.shape[0] == batch:
        return tensor
    return tensor.expand(batch, *tensor.shape[1:])


class _Differentiable(Operator):
    """What :class:`Nonlinear` and :class:`Linearized` share: the function, its optional
    parameters (a batched tensor, or none) and the evaluation of ``forward`` on a batch."""

    forward: Forward
    params: Tensor | None

    def _set_function(self, forward: Any, params: Any) -> None:
        if not callable(forward):
            raise TypeError(
                f"forward must be a callable forward(x, params) -> y, got {type(forward).__name__}."
            )
        self.forward = forward
        self.params = params
        # Only an existing ``params`` tensor is batched (indexed, expanded, moved).
        self._batched = () if params is None else ("params",)

    def _evaluate(self, x: Tensor, batch: int) -> Tensor:
        """``forward(x, params)`` on ``batch`` rows, ``x`` and ``params`` expanded to it."""
        params = _rows(self.params, batch)
        if params is not None and params.is_floating_point():
            params = params.to(x.dtype)
        y = self.forward(_rows(x, batch), params)
        if not isinstance(y, Tensor) or y.shape != (batch, self._m):
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(
                f"forward must return a tensor of shape (B, n_measurements) = ({batch}, "
                f"{self._m}), got {shape}."
            )
        return y

    def _batch(self, *sizes: int) -> int:
        return max(self._n, *sizes)

    def __repr__(self) -> str:
        name = getattr(self.forward, "__qualname__", type(self.forward).__name__)
        return super().__repr__()[:-1] + f", forward={name})"


class Nonlinear(_Differentiable):
    r"""A differentiable observation model :math:`y_i = f(x_i; \theta_i) + e_i`,
    :math:`e_i \sim \mathcal{N}(0, \operatorname{diag}(\sigma_{y,i}^2))`.

    Samplers and the Gaussian computations linearise it (:meth:`linearize`, module docstring):
    MMPS, PiGDM, TMPD, DPS and SMC at the denoiser's estimate :math:`\hat{x} = E[x \mid x_t]`
    of each step (SMC's last weight uses the exact likelihood with :math:`f(x_0)`), and
    :class:`~diffem.priors.GaussianPrior`, :func:`~diffem.priors.fit_gaussian` and the
    estimator's evidence proposal by iterated linearisation at the posterior mean
    (:mod:`diffem.priors.linearize`).

    Parameters
    ----------
    forward : callable ``forward(x, params) -> y``
        A differentiable torch function mapping ``x`` ``(B, D)`` and ``params`` ``(B, ...)``
        (or ``None``) to ``y`` ``(B, M)``, row by row; it receives ``params`` with the same
        number of rows as ``x``, in ``x``'s floating dtype. It must be twice differentiable by
        autograd (a composition of differentiable torch operations that does not modify its
        inputs in place) and, for pickling (joblib, checkpoints, ``GridSearchCV`` with
        ``n_jobs``), be a function defined at the top level of a module: a lambda or a
        closure works but does not pickle.
    n_features, n_measurements : int
        ``D`` and ``M``.
    params : array of shape ``(n, ...)`` or ``(1, ...)`` (shared), or None
        Per-sample parameters :math:`\theta_i` (e.g. sensor positions ``(n, S, 2)``),
        indexed, expanded and moved with the operator. Floating arrays follow torch's default
        dtype (float32) like the other operators' parameters; integer arrays are kept.
    noise_std : float or array of shape ``(n,)`` or ``(n, M)``

    Examples
    --------
    >>> import torch
    >>> def ranges(x, sensors):            # distances to S sensors: (B, 2), (B, S, 2) -> (B, S)
    ...     return torch.linalg.vector_norm(x.unsqueeze(-2) - sensors, dim=-1)
    >>> sensors = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])   # shared: (1, 3, 2)
    >>> op = Nonlinear(ranges, 2, 3, sensors, noise_std=0.1)
    >>> op.apply(torch.tensor([[3.0, 4.0]]))
    tensor([[5.0000, 4.4721, 4.2426]])
    """

    #: Samplers and the Gaussian computations linearise this operator.
    is_linear = False

    def __init__(
        self,
        forward: Forward,
        n_features: int,
        n_measurements: int,
        params: Any = None,
        *,
        noise_std: Any = 0.0,
    ) -> None:
        self._d = check_int(n_features, "n_features", 1)
        self._m = check_int(n_measurements, "n_measurements", 1)
        params = None if params is None else _as_params(params)
        self._set_function(forward, params)
        self._n = 1 if params is None else params.shape[0]
        self._set_noise(noise_std)
        if params is not None:
            self.params = params.to(self.device)

    def apply(self, x: Tensor) -> Tensor:
        r""":math:`f(x_i; \theta_i)`, shape ``(n, D) -> (n, M)``."""
        self._check_input(x, self._d, "x")
        return self._evaluate(x, self._batch(x.shape[0]))

    def adjoint(self, y: Tensor) -> Tensor:
        """A nonlinear map has no adjoint: raises ``TypeError`` (use :meth:`linearize`)."""
        raise TypeError(
            "a Nonlinear operator has no adjoint; linearise it at a point first: "
            "op.linearize(x).adjoint(u) is J(x)^T u."
        )

    def matrix(self) -> Tensor:
        """A nonlinear map has no matrix: raises ``TypeError`` (use :meth:`linearize`)."""
        raise TypeError(
            "a Nonlinear operator has no matrix; linearise it at a point first: "
            "op.linearize(x).matrix() is the Jacobian at x."
        )

    def linearize(self, x: Tensor) -> Linearized:
        r"""The Jacobians :math:`J_i = \partial f(x_i; \theta_i) / \partial x` at ``x``
        ``(n | 1, D)``, as a linear operator with this operator's noise (no graph to ``x``)."""
        self._check_input(x, self._d, "x")
        return Linearized(self, x.detach())


class _Graph(NamedTuple):
    """The autograd graph of :math:`f` at the linearisation points, for both products."""

    x: Tensor  # (B, D) leaf: the points
    y: Tensor  # (B, M) f(x)
    u: Tensor  # (B, M) leaf: a dummy cotangent
    jtu: Tensor | None  # (B, D) J^T u, built with its graph (None if f does not depend on x)


class Linearized(_Differentiable):
    r"""The Jacobians :math:`J_i` of a :class:`Nonlinear` operator at points
    :math:`\bar{x}_i`, a linear :class:`~diffem.operators.Operator` with the same noise.

    Both products are reverse-mode automatic differentiation through one graph of :math:`f` at
    :math:`\bar{x}`, built on first use and kept: :meth:`adjoint` is the vector-Jacobian
    product :math:`J^\top w = \nabla_x (w^\top f(x))`, and :meth:`apply` the Jacobian-vector
    product by the double-backward identity :math:`J v = \nabla_u (v^\top J^\top u)`, where
    :math:`J^\top u` was built with its graph for a dummy :math:`u` (it is linear in
    :math:`u`). So ``forward`` must be twice differentiable by autograd (any composition of
    differentiable torch operations is), each product costs about one backward pass, and no
    ``(M, D)`` matrix is formed; :meth:`~diffem.operators.Operator.matrix` builds the dense
    Jacobians from ``min(n, D)`` products for exact Gaussian computations. (Forward-mode
    ``torch.func.jvp`` would load torch's compiler stack on first use, seconds of start-up.)
    Built by :meth:`Nonlinear.linearize`; indexable, picklable and movable like any operator.

    Attributes
    ----------
    point : Tensor of shape ``(n | 1, D)``
        The linearisation points :math:`\bar{x}_i`.
    """

    def __init__(self, operator: Nonlinear, point: Tensor) -> None:
        self._d, self._m = operator.n_features, operator.n_measurements
        self._set_function(operator.forward, operator.params)
        self._batched = (*self._batched, "point")
        self.point = point
        self.noise_std = operator.noise_std
        self._n = max(len(operator), point.shape[0])
        self._graphs: dict[tuple[int, torch.dtype], _Graph] = {}

    def value(self) -> Tensor:
        r""":math:`f(\bar{x}_i; \theta_i)`, shape ``(n, M)``."""
        return self._graph(self._n, self.point.dtype).y.detach()

    def apply(self, x: Tensor) -> Tensor:
        r""":math:`J_i x_i`, shape ``(n, D) -> (n, M)``."""
        self._check_input(x, self._d, "x")
        graph = self._graph(self._batch(x.shape[0]), x.dtype)
        if graph.jtu is None:
            return torch.zeros_like(graph.u)
        with torch.enable_grad():
            (jv,) = torch.autograd.grad(
                graph.jtu, graph.u, _rows(x, len(graph.x)), retain_graph=True, allow_unused=True
            )
        return torch.zeros_like(graph.u) if jv is None else jv

    def adjoint(self, y: Tensor) -> Tensor:
        r""":math:`J_i^\top y_i`, shape ``(n, M) -> (n, D)``."""
        self._check_input(y, self._m, "y")
        graph = self._graph(self._batch(y.shape[0]), y.dtype)
        if not graph.y.requires_grad:  # f does not depend on x
            return torch.zeros_like(graph.x)
        with torch.enable_grad():
            (jtw,) = torch.autograd.grad(
                graph.y, graph.x, _rows(y, len(graph.x)), retain_graph=True, allow_unused=True
            )
        return torch.zeros_like(graph.x) if jtw is None else jtw

    def _graph(self, batch: int, dtype: torch.dtype) -> _Graph:
        """The graph at the points expanded to ``batch`` rows in ``dtype``, built once."""
        key = (batch, dtype)
        if key not in self._graphs:
            with torch.enable_grad():
                x = _rows(self.point.to(dtype), batch).detach().clone().requires_grad_(True)
                y = self._evaluate(x, batch)
                u = torch.zeros_like(y, requires_grad=True)
                jtu = None
                if y.requires_grad:
                    (jtu,) = torch.autograd.grad(y, x, u, create_graph=True, allow_unused=True)
                if jtu is not None and not jtu.requires_grad:
                    jtu = None  # J^T u does not depend on u: J = 0
            self._graphs[key] = _Graph(x, y, u, jtu)
        return self._graphs[key]

    # The cached graphs belong to one batch, device and dtype: copies start without them.
    def __copy__(self) -> Linearized:
        new = super().__copy__()
        new._graphs = {}
        return new

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_graphs"] = {}
        return state
