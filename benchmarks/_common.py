"""What the benchmark scripts share beyond the reports of :mod:`diffem._report` (machine
header, tables; re-exported here with the device helper): where results go, and timing."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from diffem._device import resolve_device
from diffem._report import machine_header, markdown_table

__all__ = [
    "RESULTS_DIR",
    "machine_header",
    "markdown_table",
    "publish",
    "resolve_device",
    "synchronize",
    "timed",
    "timed_medians",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def split_passthrough(argv: list[str] | None) -> tuple[list[str], list[str]]:
    """The command line (``sys.argv[1:]`` when ``argv`` is None) cut at ``--``: the script's
    own arguments, and those it passes on to the benchmark it runs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]


def publish(lines: list[str], out: Path | None) -> None:
    """Prints a result file's lines and, when ``out`` is given, writes them there."""
    text = "\n".join(lines)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")


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
