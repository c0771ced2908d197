"""Budgets that hold whatever the load: work still running at its deadline is interrupted.

Planning by measured cost is not enough on a shared machine: a neighbour's job can make the
next compile or the next round take four times what the last one did (`bench --budget-s 60`
once took 292 s beside other work). Inside `until(at)`, a timer raises `BudgetSpent` in the
main thread when the clock passes `at`, wherever the work is (a compile, a first step, a
loader starting its workers), and `check()` raises it at a step boundary when the clock
(`measure.clock`, a fake one in tests) says the time is up. The work interrupted is thrown
away by its caller (a trial's model and loader are its own), never half-used.

Deadlines nest: the inner block ends at the earlier of the two. Outside the main thread no
signal can be delivered, so only `check()` enforces the deadline there. The timer is the
process's ITIMER_REAL: another user of it (a test runner's timeout) gets its own back after.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
import warnings
from collections.abc import Iterator

from . import clock


class BudgetSpent(BaseException):
    """The budget ran out mid-work. A BaseException, as KeyboardInterrupt is: code that catches
    Exception to fall back or to record a failure (a compiler, a trial) must not swallow it."""


_ends: list[float] = []  # the deadlines in force, innermost last


def current() -> float | None:
    """The deadline in force (`clock.now()` time), None when there is none."""
    return min(_ends) if _ends else None


def left() -> float:
    """Seconds to the deadline in force (inf when there is none)."""
    end = current()
    return math.inf if end is None else end - clock.now()


def check() -> None:
    """Raise BudgetSpent when the deadline in force has passed."""
    if left() <= 0:
        raise BudgetSpent


def _alarm(signum, frame) -> None:
    remaining = left()
    if remaining > 0:  # the clock (a fake one in tests) is not there yet: look again then
        _arm(remaining)
        return
    raise BudgetSpent


def _arm(seconds: float) -> None:
    signal.setitimer(signal.ITIMER_REAL, min(max(seconds, 1e-3), 1e6))


@contextlib.contextmanager
def until(at: float) -> Iterator[None]:
    """Run the block until `at` (on `clock.now()`); past it, BudgetSpent is raised in it."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGALRM, _alarm) if main else None
    # someone else's timer (a test runner's timeout) is given back, less the time spent here
    theirs, entered = signal.getitimer(signal.ITIMER_REAL) if main else (0.0, 0.0), \
        time.monotonic()
    _ends.append(at)
    try:
        with warnings.catch_warnings():
            # cut inside the backward a compiler traces (under anomaly mode), torch warns of
            # an "error detected" with the forward's traceback: the cut is no error
            warnings.filterwarnings("ignore", message="Error detected in")
            if main:
                _arm(left())
            check()
            yield
    finally:
        if main:  # an alarm now would skip this clean-up: held until the timer is off
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            signal.setitimer(signal.ITIMER_REAL, 0)
        _ends.pop()
        if main:
            if signal.SIGALRM in signal.sigpending():
                signal.sigwait({signal.SIGALRM})  # the held alarm belonged to this block
            signal.signal(signal.SIGALRM, previous)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})
            if _ends:
                _arm(left())  # the outer deadline's timer again (its own if it has passed)
            elif theirs[0] > 0:
                signal.setitimer(signal.ITIMER_REAL,
                                 max(theirs[0] - (time.monotonic() - entered), 1e-3), theirs[1])
