"""Ctrl-C during :meth:`DiffusionPriorEM.fit <diffem.em.DiffusionPriorEM.fit>`.

skorch swallows ``KeyboardInterrupt`` inside its training loop (it stops training and returns
normally), so the estimator installs a SIGINT handler for the duration of ``fit`` that records
the interrupt before raising it as usual; the EM loop then rolls back to the last completed
iteration.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["InterruptFlag"]


class InterruptFlag:
    """Records SIGINT while :meth:`watch` is active (main thread only; elsewhere a no-op)."""

    def __init__(self) -> None:
        self.raised = False

    @contextmanager
    def watch(self) -> Iterator[InterruptFlag]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum: int, frame: Any) -> None:
            self.raised = True
            if callable(previous):
                previous(signum, frame)
            raise KeyboardInterrupt

        try:
            signal.signal(signal.SIGINT, handler)
        except ValueError:  # pragma: no cover - not the main interpreter
            yield self
            return
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)
