r"""Checkpoints of :class:`~diffem.em.DiffusionPriorEM` fits.

After every EM iteration the estimator writes ``checkpoint_dir/em_iter{k:04d}.joblib`` (written
to a temporary file, then renamed, so that an interrupted write never leaves a truncated
checkpoint) and removes the older ones. A checkpoint holds the fitted state (denoiser, sampler,
Gaussian prior, history, random seed) and a *fingerprint* of the training problem: the
hyper-parameters that change the result (everything except ``n_iter``, ``verbose``,
``callback``, ``device``, ``checkpoint_dir`` and the prediction-time costs) and a hash of
the data and operator. A later ``fit`` with the same fingerprint resumes from the latest
checkpoint whose iteration is at most ``n_iter``.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import joblib

__all__ = ["find_checkpoint", "fingerprint", "save_checkpoint"]

_PATTERN = re.compile(r"^em_iter(\d{4,})\.joblib$")
_FORMAT = 2

# Parameters that do not change the fitted prior (or that may change between resumed runs).
_IGNORED = {
    "n_iter",
    "verbose",
    "callback",
    "device",
    "checkpoint_dir",
    "n_transform_samples",
    "n_score_samples",
    "score_steps",
    "denoiser",
    "sampler",
    "warmup_sampler",
    "tol",
    "n_iter_no_change",
    "keep_best",
}


def _stable_repr(value: Any) -> str:
    text = repr(value)
    if " at 0x" in text:  # objects without a value-based repr: their type only
        return f"<{type(value).__module__}.{type(value).__qualname__}>"
    return text


def fingerprint(params: dict[str, Any], Y: Any, operator: Any) -> str:
    """A hash of the training problem: relevant hyper-parameters, data and operator.

    ``params`` is ``estimator.get_params(deep=True)``; nested ``*__verbose`` and ``*__device``
    entries are ignored like the top-level ones.
    """
    relevant = {}
    for key, value in sorted(params.items()):
        leaf = key.rsplit("__", 1)[-1]
        if key in _IGNORED or ("__" in key and leaf in ("verbose", "device", "batch_size")):
            continue
        relevant[key] = _stable_repr(value)
    return joblib.hash((relevant, joblib.hash(Y), joblib.hash(operator.to("cpu"))))


def _checkpoints(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _PATTERN.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(directory: str | os.PathLike, iteration: int, payload: dict[str, Any]) -> Path:
    """Writes the checkpoint of EM iteration ``iteration`` atomically; removes older ones."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"em_iter{iteration:04d}.joblib"
    payload = {"format": _FORMAT, "iteration": iteration, **payload}
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".em_iter", suffix=".tmp")
    os.close(fd)
    try:
        joblib.dump(payload, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    for k, path in _checkpoints(directory):
        if k != iteration:
            path.unlink(missing_ok=True)
    return target


def find_checkpoint(
    directory: str | os.PathLike, fingerprint_: str, max_iteration: int
) -> dict[str, Any] | None:
    """The latest compatible checkpoint in ``directory`` (iteration <= ``max_iteration``).

    Returns ``None`` (with a warning when a checkpoint exists but cannot be used) otherwise.
    """
    directory = Path(directory)
    for iteration, path in reversed(_checkpoints(directory)):
        try:
            payload = joblib.load(path)
        except Exception as error:  # a corrupt file must not prevent a fresh fit
            warnings.warn(f"ignoring unreadable checkpoint {path}: {error}", stacklevel=3)
            continue
        if payload.get("format") != _FORMAT or payload.get("fingerprint") != fingerprint_:
            warnings.warn(
                f"ignoring checkpoint {path}: it was written for other hyper-parameters or "
                "data; fitting from scratch (it will be overwritten).",
                stacklevel=3,
            )
            return None
        if iteration > max_iteration:
            warnings.warn(
                f"ignoring checkpoint {path}: it is at EM iteration {iteration} but n_iter = "
                f"{max_iteration}; fitting from scratch.",
                stacklevel=3,
            )
            return None
        return payload
    return None
