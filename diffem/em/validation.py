r"""Input validation of :class:`~diffem.em.DiffusionPriorEM`.

Every check raises ``ValueError`` (bad values or shapes) or ``TypeError`` (bad types) with a
message that names the argument and the expected shape. Observations are converted to NumPy
``float32`` arrays ``(n_samples, n_measurements)`` on the CPU (the estimator moves chunks to its
device); NaN is kept, since it marks missing entries for ``operator=None`` and may fill the
unobserved (pinned) entries of a :class:`~diffem.operators.Mask`.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch
from sklearn.utils.validation import check_array

from diffem._device import resolve_device
from diffem._validation import check_int as _check_int
from diffem._validation import check_number
from diffem.operators import Identity, Mask, Operator

__all__ = [
    "check_observations",
    "check_params",
    "resolve_operator",
]


def _is_sparse(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.layout != torch.strided
    try:
        import scipy.sparse as sp
    except ImportError:  # pragma: no cover - scipy ships with scikit-learn
        return False
    return sp.issparse(value)


def check_observations(
    Y: Any, *, name: str = "Y", estimator: Any = None, min_samples: int = 1
) -> np.ndarray:
    """Validates observations and returns them as a C-contiguous ``float32`` NumPy array.

    Parameters
    ----------
    Y : array-like or torch.Tensor of shape ``(n_samples, n_measurements)``
        NaN is allowed (missing or unobserved entries); infinity is not.
    name : str
        The argument's name, for error messages.
    estimator : estimator or None
        Named in scikit-learn's messages.
    min_samples : int
        Minimum number of rows.

    Returns
    -------
    ndarray of shape ``(n_samples, n_measurements)``, dtype float32.
    """
    if _is_sparse(Y):
        raise TypeError(
            f"{name} is a sparse matrix, but sparse input is not supported; pass a dense array "
            f"of shape (n_samples, n_measurements)."
        )
    if isinstance(Y, torch.Tensor):
        if Y.is_complex():
            raise ValueError(f"Complex data not supported: {name} has dtype {Y.dtype}.")
        if Y.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got a boolean tensor.")
        Y = Y.detach().cpu()
        if Y.dtype in (torch.bfloat16, torch.float16):
            Y = Y.float()
        Y = Y.numpy()
    if isinstance(Y, str) or (not hasattr(Y, "__len__") and not hasattr(Y, "__array__")):
        raise TypeError(
            f"{name} must be an array-like of numbers of shape (n_samples, n_measurements), "
            f"got {type(Y).__name__}."
        )
    try:
        array = check_array(
            Y,
            dtype=(np.float32, np.float64),
            ensure_all_finite="allow-nan",
            ensure_2d=True,
            ensure_min_samples=min_samples,
            input_name=name,
            estimator=estimator,
        )
    except ValueError as error:
        message = str(error)
        if "Complex data" in message or "sparse" in message:
            raise
        raise ValueError(
            f"{name} must be a 2-D array of shape (n_samples, n_measurements): {message}"
        ) from error
    except TypeError as error:
        raise TypeError(
            f"{name} must hold real numbers, of shape (n_samples, n_measurements): {error}"
        ) from error
    array = np.ascontiguousarray(array, dtype=np.float32)
    if np.isinf(array).any():
        raise ValueError(f"{name} contains infinity; only NaN may mark a missing entry.")
    return array


def resolve_operator(
    operator: Any,
    Y: np.ndarray,
    *,
    noise_std: float,
    name: str = "operator",
    n_features: int | None = None,
) -> Operator:
    """The observation operator for ``Y``, of batch ``len(Y)``.

    - ``None``: ``Mask.from_nan(Y, noise_std=noise_std)`` when ``Y`` has NaN (an imputer),
      otherwise ``Identity(Y.shape[1], noise_std=noise_std)``;
    - an :class:`~diffem.operators.Operator` of batch 1 (shared) is expanded to ``len(Y)``,
      one of batch ``len(Y)`` is used as is;
    - a 1-D array of length ``len(Y)`` is the target ``y`` that scikit-learn passes to
      unsupervised estimators; like them, it is ignored (as ``None``).

    Raises
    ------
    TypeError
        ``operator`` is something else.
    ValueError
        Batch or measurement sizes do not match ``Y``, or (with ``n_features``) the operator
        acts on a different number of features than the fitted prior.
    """
    n, m = Y.shape
    if operator is not None and not isinstance(operator, Operator) and _is_target(operator, n):
        operator = None
    if operator is None:
        if n_features is not None and m != n_features:
            raise ValueError(
                f"X has {m} features, but DiffusionPriorEM is expecting {n_features} features "
                f"as input: with {name}=None, Y must have shape (n_samples, {n_features})."
            )
        if np.isnan(Y).any():
            return Mask.from_nan(Y, noise_std=noise_std)
        return Identity(m, noise_std=noise_std).expand(n)
    if not isinstance(operator, Operator):
        raise TypeError(
            f"{name} must be a diffem.operators.Operator (e.g. Identity, Mask, Dense) or None, "
            f"got {type(operator).__name__}. Wrap masks or matrices in an operator, e.g. "
            f"Mask(mask, noise_std=...) or Dense(matrix, noise_std=...)."
        )
    n_op, m_op, d_op = operator.shape
    if n_op not in (1, n):
        raise ValueError(
            f"{name} has {n_op} samples but Y has {n} rows: len({name}) must be len(Y) = {n} "
            f"(one operator per observation) or 1 (shared)."
        )
    if m_op != m:
        raise ValueError(
            f"Y has {m} columns but {name}.n_measurements = {m_op}: Y must have shape "
            f"(n_samples, {m_op})."
        )
    if n_features is not None and d_op != n_features:
        raise ValueError(
            f"{name} acts on {d_op} features but the prior was fitted with n_features_in_ = "
            f"{n_features}: the operator must map ({n_features},) latents to ({m},) "
            f"measurements."
        )
    if n_op == 1 and n != 1:
        operator = operator.expand(n)
    return operator


def _is_target(value: Any, n: int) -> bool:
    """Whether ``value`` looks like a supervised target: a 1-D array-like of length ``n``."""
    if isinstance(value, (str, bytes, dict)):
        return False
    if isinstance(value, torch.Tensor):
        return value.ndim == 1 and value.shape[0] == n
    if not isinstance(value, (list, tuple, np.ndarray)) and not (
        hasattr(value, "__array__") or hasattr(value, "iloc")
    ):
        return False
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        return False
    return array.ndim == 1 and array.shape[0] == n


def check_params(estimator: Any) -> None:
    """Validates the hyper-parameters of a :class:`~diffem.em.DiffusionPriorEM` at fit time."""
    _check_int(estimator.n_iter, "n_iter", 0)
    _check_int(estimator.gaussian_iter, "gaussian_iter", 0)
    _check_int(estimator.gaussian_rank, "gaussian_rank", 1, allow_none=True)
    _check_int(estimator.n_transform_samples, "n_transform_samples", 1)
    _check_int(estimator.n_score_samples, "n_score_samples", 1)
    _check_int(estimator.score_steps, "score_steps", 1)
    _check_int(estimator.batch_size, "batch_size", 1)
    _check_int(estimator.verbose, "verbose", 0)
    _check_int(estimator.warmup_iter, "warmup_iter", 0)
    _check_int(estimator.e_step_samples, "e_step_samples", 1)
    _check_int(estimator.first_epochs, "first_epochs", 1, allow_none=True)
    _check_int(estimator.n_iter_no_change, "n_iter_no_change", 1, allow_none=True)
    _check_int(estimator.init_components, "init_components", 1)
    check_number(estimator.init_shrinkage, "init_shrinkage", 0.0)
    for name in ("reset_optimizer", "keep_best", "refine_init"):
        if not isinstance(getattr(estimator, name), (bool, np.bool_)):
            raise ValueError(f"{name} must be a bool, got {getattr(estimator, name)!r}.")
    _check_int(estimator.evidence_rows, "evidence_rows", 2, allow_none=True)
    check_number(estimator.lr_decay, "lr_decay", 0.0, 1.0, low_open=True)
    if estimator.tol is not None:
        check_number(estimator.tol, "tol", 0.0)
    noise_std = estimator.noise_std
    if isinstance(noise_std, bool) or not isinstance(noise_std, numbers.Real):
        raise ValueError(
            f"noise_std must be a non-negative float (used when operator=None), got "
            f"{noise_std!r}; pass an operator for per-sample noise."
        )
    if not np.isfinite(noise_std) or noise_std < 0:
        raise ValueError(f"noise_std must be a non-negative finite float, got {noise_std!r}.")
    if estimator.callback is not None and not callable(estimator.callback):
        raise TypeError(
            "callback must be a callable callback(estimator, record) or None, got "
            f"{type(estimator.callback).__name__}."
        )
    if (
        estimator.checkpoint_dir is not None
        and not isinstance(estimator.checkpoint_dir, (str, bytes))
        and not hasattr(estimator.checkpoint_dir, "__fspath__")
    ):
        raise ValueError(
            f"checkpoint_dir must be a path or None, got {type(estimator.checkpoint_dir).__name__}."
        )
    resolve_device(estimator.device)
