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
