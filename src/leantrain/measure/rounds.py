"""Interleaved measuring rounds: the one way leantrain compares timings taken on a drifting machine.

Machine speed drifts (other tenants, clocks) over seconds. Measuring each candidate once per
round puts every candidate next to every other one in time, and reversing the order every
other round cancels a steady drift. Bench trials, the batch-size finder and the loader tuning
all measure through `interleave`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

Key = TypeVar("Key", bound=Hashable)
Result = TypeVar("Result")


def interleave(keys: list[Key], rounds: int, measure: Callable[[Key, int], Result | None],
               keep: Callable[[Result], bool] = lambda result: True
               ) -> dict[Key, list[Result]]:
    """Measure each key once per round, reversing the order every other round.

    `measure(key, round)` returns a result, or None to stop measuring that key (unsupported,
    failed, out of budget); a key whose last result fails `keep` is not measured again.
    """
    results: dict[Key, list[Result]] = {key: [] for key in keys}
    active = list(keys)
    for r in range(rounds):
        for key in (active if r % 2 == 0 else active[::-1]):
            result = measure(key, r)
            if result is not None:
                results[key].append(result)
        active = [k for k in active
                  if len(results[k]) == r + 1 and keep(results[k][-1])]
    return results


CONFIDENCE = 0.95


def paired_ratios(measured: list[float], reference: list[float]) -> list[float]:
    """Per-round ratios of two rates measured in the same interleaved rounds."""
    return [m / r for m, r in zip(measured, reference, strict=False) if m and r]


MIN_ROUNDS = 3  # paired rounds below which a ratio gets no interval (and so cannot win)
RESAMPLES = 2000  # bootstrap resamples of the rounds


def interval(ratios: list[float]) -> tuple[float, float] | None:
    """The 95% bootstrap interval (percentile method, fixed seed) of the median ratio; None
    with fewer than MIN_ROUNDS rounds: two pairs that agree give a tight interval that says
    nothing (1.92-1.94x from two pairs, where two whole runs gave 1.99x and 0.88x). With five
    rounds the interval is coarse but honest: it spans the rounds' disagreement. numpy's own
    resampling (scipy.stats' import took 1.1 s of a 9 s digits run that judged its plan)."""
    if len(ratios) < MIN_ROUNDS:
        return None
    if max(ratios) - min(ratios) < 1e-12:
        return ratios[0], ratios[0]
    import numpy as np

    values = np.asarray(ratios, dtype=float)
    picks = np.random.default_rng(0).integers(0, len(values), size=(RESAMPLES, len(values)))
    medians = np.median(values[picks], axis=1)
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(medians, [tail, 100 - tail])
    return float(low), float(high)


def spread(values: list[float]) -> float | None:
    """Coefficient of variation (standard deviation over mean) of a trial's round rates."""
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 / mean
