"""The clock every timing in leantrain reads, in one place.

Timed trials, windows, step breakdowns and budgets call `now()` through this module (not
`time.perf_counter` directly), so a test can hand them injected time: a fake clock that a
model advances by a chosen step time makes a comparison of speeds exact and repeatable on any
machine, loaded or not, where sleeping or busy-waiting measures the machine's load instead.
"""

from __future__ import annotations

import time


def now() -> float:
    """Seconds on a monotonic clock (`time.perf_counter`)."""
    return time.perf_counter()


def process_age() -> float:
    """Seconds since this process started (its interpreter, imports, data and model loading
    included): a command's budget counts them too, as the user's stopwatch does."""
    import psutil

    return max(0.0, time.time() - psutil.Process().create_time())
