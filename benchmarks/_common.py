"""Shared helpers of the benchmark scripts: machine description, devices, timing, tables."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

__all__ = [
    "RESULTS_DIR",
    "command_line",
    "cpu_model",
    "machine_header",
    "markdown_table",
    "resolve_device",
    "synchronize",
    "timed",
    "timed_medians",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def command_line() -> str:
    """The command that started this process, as it could be typed again."""
    script = Path(sys.argv[0])
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


def resolve_device(device: str) -> torch.device:
    """``"auto"`` gives CUDA when available, else CPU; ``"cuda"`` fails loudly without it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda was requested but CUDA is not available.")
    return torch.device(device)


def machine_header(device: torch.device) -> list[str]:
    """Markdown lines describing the command, date and machine of a benchmark run."""
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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """Runs ``function()`` once and returns its result and the wall time in seconds."""
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return result, time.perf_counter() - start


def timed_medians(
    functions: dict[str, Callable[[], object]],
    device: torch.device,
    *,
    warmup: int = 1,
    repeats: int = 3,
) -> dict[str, tuple[float, float]]:
    """Median wall time and median process CPU time (seconds) of ``repeats`` calls of each
    function after ``warmup`` untimed calls, interleaved: each round calls every function once,
    so that a change of the machine's load during the run affects all of them alike and their
    ratios stay meaningful. On a shared CPU the process time (all threads of this process) is
    the steadier measure: it does not count the time spent waiting for a core."""
    for function in functions.values():
        for _ in range(warmup):
            timed(function, device)
    walls: dict[str, list[float]] = {name: [] for name in functions}
    cpus: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            cpu = time.process_time()
            walls[name].append(timed(function, device)[1])
            cpus[name].append(time.process_time() - cpu)
    return {
        name: (statistics.median(walls[name]), statistics.median(cpus[name])) for name in functions
    }


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table: first column left-aligned, the others right-aligned."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            ":" + "-" * (w + 1) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)
        )
        + "|"
    )
    return "\n".join([line(header), rule, *(line(r) for r in rows)])
