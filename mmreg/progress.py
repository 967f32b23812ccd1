"""Progress reporting and cancellation shared by the engine, the command line and Slicer modules.

A progress callback is any callable ``callback(fraction, message)`` with ``fraction`` in [0, 1].
It may raise :class:`mmreg.errors.CancelledError` (or return ``False``) to stop the run; the
engine checks it between optimisation steps, so a Cancel button answers within one step.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

from .errors import CancelledError

ProgressCallback = Callable[[float, str], Optional[bool]]


class Progress:
    """Maps the progress of sub-steps onto one overall [0, 1] range and checks for cancellation.

    ``Progress(callback)`` wraps a user callback (or ``None``). ``sub(start, end)`` returns a
    child whose 0..1 maps to ``start..end`` of the parent. ``timings`` collects wall seconds
    per named step (see :meth:`step`).
    """

    def __init__(self, callback: ProgressCallback | None = None, start: float = 0.0, end: float = 1.0,
                 timings: dict | None = None):
        self._callback = callback
        self._start = start
        self._end = end
        self.timings = {} if timings is None else timings

    def __call__(self, fraction: float, message: str = "") -> None:
        """Report ``fraction`` (0..1 of this range) with ``message``; raise CancelledError if asked to stop."""
        if self._callback is None:
            return
        overall = self._start + (self._end - self._start) * min(max(float(fraction), 0.0), 1.0)
        if self._callback(overall, message) is False:
            raise CancelledError("Registration cancelled by the user; inputs are unchanged and nothing was written.")

    def sub(self, start: float, end: float) -> "Progress":
        """A child progress covering ``start..end`` (fractions of this one)."""
        span = self._end - self._start
        return Progress(self._callback, self._start + span * start, self._start + span * end, self.timings)

    def step(self, name: str):
        """Context manager that records the wall time of a named step into ``timings`` (seconds)."""
        progress = self

        class _Step:
            def __enter__(self_inner):
                self_inner.t0 = time.perf_counter()
                return progress

            def __exit__(self_inner, *exc):
                progress.timings[name] = progress.timings.get(name, 0.0) + time.perf_counter() - self_inner.t0
                return False

        return _Step()
