"""Reports of the demo and the benchmarks: how a run was made (command, date, machine), its
tables, and the per-iteration records of an EM fit."""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "command_line",
    "cpu_model",
    "fit_tracked",
    "format_table",
    "machine_header",
    "markdown_table",
    "powers_of_two",
    "record_summary",
]


# ---------------------------------------------------------------------------------- the run
def command_line() -> str:
    """The command that started this process, as it could be typed again."""
    script = Path(sys.argv[0])
    if script.name == "__main__.py":  # python -m package
        return " ".join(["python -m", script.parent.name, *map(shlex.quote, sys.argv[1:])])
    try:
        script = script.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    return " ".join(["python", shlex.quote(str(script)), *map(shlex.quote, sys.argv[1:])])


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (falls back to ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_header(device: torch.device) -> list[str]:
    """Markdown lines describing the command, date and machine of a run on ``device``."""
    if device.type == "cuda":
        accel = torch.cuda.get_device_name(device)
    else:
        accel = "none (CPU run)"
    env = " ".join(
        f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ
    )
    return [
        f"- command: `{env + ' ' if env else ''}{command_line()}`",
        f"- date: {_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- CPU: {cpu_model()}, {os.cpu_count()} cores visible, "
        f"{torch.get_num_threads()} torch threads",
        f"- torch {torch.__version__}, Python {platform.python_version()}, "
        f"device `{device}`, accelerator: {accel}",
    ]


# ---------------------------------------------------------------------------------- tables
def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table: first column left-aligned, the others right-aligned."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|".join(
        ":" + "-" * (w + 1) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)
    )
    return "\n".join([line(header), "|" + rule + "|", *(line(r) for r in rows)])


def format_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    floatfmt: str = ".4g",
    markdown: bool = True,
) -> str:
    """Rows of dicts as a :func:`markdown_table` (or plain right-aligned columns); floats with
    ``floatfmt``, missing entries empty."""
    if not rows:
        return ""
    columns = list(columns) if columns is not None else list(rows[0])

    def cell(v: Any) -> str:
        if isinstance(v, float | np.floating):
            return "nan" if not math.isfinite(float(v)) else format(float(v), floatfmt)
        return str(v)

    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    if markdown:
        return markdown_table(columns, body)
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(columns)]
    lines = [columns, *body]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(b, widths, strict=True)) for b in lines)


# ---------------------------------------------------------------------------------- EM runs
def powers_of_two(n: int) -> list[int]:
    """``[1, 2, 4, ...]`` up to ``n``, with ``n`` itself appended (the EM iterations plotted)."""
    out = [2**k for k in range(int(math.log2(max(n, 1))) + 1) if 2**k <= n]
    if n >= 1 and out[-1] != n:
        out.append(n)
    return out


def _record_value(record: Mapping[str, Any], key: str) -> float:
    """``record[key]`` as a float (the last entry of a sequence; NaN if absent)."""
    value = record.get(key)
    if isinstance(value, Sequence | np.ndarray) and not isinstance(value, str):
        value = np.asarray(value, dtype=np.float64)
        value = value[-1] if value.size else math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def record_summary(record: Mapping[str, Any]) -> dict[str, float]:
    """Train loss, E/M-step seconds and the evidence estimate (mean log-evidence, its standard
    error, its change from the previous iteration and that change's standard error) from one
    ``history_`` record."""
    return {
        "train loss": _record_value(record, "train_loss"),
        "E-step s": _record_value(record, "e_step_seconds"),
        "M-step s": _record_value(record, "m_step_seconds"),
        "log evidence": _record_value(record, "log_evidence"),
        "± se": _record_value(record, "log_evidence_std"),
        "evidence change": _record_value(record, "log_evidence_change"),
        "change se": _record_value(record, "log_evidence_change_std"),
    }


def fit_tracked(
    estimator: Any,
    Y: Any,
    operator: Any,
    on_iteration: Callable[[int, Any, Mapping[str, Any]], None],
) -> Any:
    """Fit ``estimator`` and call ``on_iteration(k, estimator, record)`` after EM iteration
    ``k`` (``k = 0`` is the Gaussian initialisation), with the prior of that iteration in
    place, through the estimator's ``callback`` parameter."""
    previous = estimator.get_params(deep=False)["callback"]

    def callback(est: Any, record: Mapping[str, Any]) -> None:
        on_iteration(int(record["iteration"]), est, record)

    estimator.set_params(callback=callback)
    try:
        estimator.fit(Y, operator)
    finally:
        estimator.set_params(callback=previous)
    return estimator
