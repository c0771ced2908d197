"""Choose DataLoader settings by measuring the training step, not by a rule of thumb.

Whether workers help depends on how much per-item work the dataset does against how much
the model computes, and on how many cores both compete for; only a measurement knows. Each
candidate feeds real batches to `consume` (the caller's forward and backward, without an
optimizer step) for a short window; rounds are interleaved, the order reversed every other
round, so machine drift hits every candidate alike. The windows are sized so that measuring
costs about 5% of the projected run (0.3 to 2 s each); a run too short to pay for that is not
measured at all, and keeps the defaults with a note saying so. A measurement costs more than
its window (starting and stopping workers, the untimed first batch), so the budget learns that
overhead as it goes and sizes each round's windows from what is left. The fastest median wins;
among those within `NEAR` of it, the one with the fewest workers (each costs memory and a
core).

Workers are tried in powers of two up to the usable CPUs. On a CPU run each worker count is
also tried with fewer torch compute threads (the cores left over): workers and compute
threads oversubscribing the same cores can lose more than the workers gain. Then, for the
best, a deeper prefetch queue and (on CUDA) pinned memory on or off. `persistent_workers`
keeps the workers between epochs; the start-up time it saves per epoch is measured and reported.
"""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.utils.data import Dataset

from ..measure import clock
from ..measure.rounds import interleave
from .loaders import Batch, DataLoaderBatches, LoaderOptions, compute_threads
from .loaders import batch_size as samples_in
from .streams import StreamBatches, is_stream

log = logging.getLogger(__name__)

NEAR = 0.05
ROUNDS = 2
BUDGET_SHARE = 0.05  # measuring may cost this share of the run it tunes ...
MIN_WINDOW_S, MAX_WINDOW_S = 0.3, 2.0  # ... within these timed seconds per candidate and round


@dataclass
class Measured:
    options: LoaderOptions
    samples_per_second: list[float] = field(default_factory=list)
    data_wait: list[float] = field(default_factory=list)  # share of the window spent in next()
    startup_s: list[float] = field(default_factory=list)  # time to the first batch

    def median(self, name: str) -> float:
        return statistics.median(getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        return {"options": self.options.describe(),
                "samples_per_second": self.median("samples_per_second"),
                "data_wait_fraction": self.median("data_wait"),
                "startup_seconds": self.median("startup_s")}


@dataclass
class LoaderTuning:
    choice: LoaderOptions
    measured: list[Measured]
    seconds: float
    window_s: float
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"choice": self.choice.describe(), "seconds": self.seconds,
                "window_s": self.window_s, "note": self.note,
                "measured": [m.to_dict() for m in self.measured]}

    def describe(self) -> str:
        if not self.measured:
            return f"kept {self.choice.describe()}: {self.note}"
        rows = ", ".join(f"[{m.options.describe()}] {m.median('samples_per_second'):,.0f}/s"
                         for m in self.measured)
        return f"chose {self.choice.describe()} after {self.seconds:.1f} s of measuring: {rows}"


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_counts(cpus: int) -> list[int]:
    counts, n = [0], 1
    while n <= cpus:
        counts.append(n)
        n *= 2
    return counts


class Budget:
    """Seconds measuring may still spend, and what a measurement costs beyond its window."""

    def __init__(self, seconds: float, overhead_s: float):
        self.left = seconds
        self.overheads = [overhead_s]  # first from the look; then from every measurement
        self.windows: list[float] = []

    def _per_measurement(self, measurements: int) -> float:
        """Timed seconds each of the `measurements` still to come can have, overheads paid."""
        return self.left / max(measurements, 1) - statistics.median(self.overheads)

    def affords(self, measurements: int) -> bool:
        return self._per_measurement(measurements) >= MIN_WINDOW_S

    def window(self, measurements: int) -> float:
        """The window for each of the `measurements` still to come."""
        return min(MAX_WINDOW_S, max(MIN_WINDOW_S, self._per_measurement(measurements)))

    def spend(self, seconds: float, window_s: float) -> None:
        self.left -= seconds
        self.overheads.append(max(seconds - window_s, 0.0))
        self.windows.append(window_s)


Source = Callable[[LoaderOptions], DataLoaderBatches]  # the training loader, per candidate


def _measure(source: Source, options: LoaderOptions, consume: Callable[[Batch], None],
             window_s: float, into: Measured) -> None:
    loader = source(options)
    batches = iter(loader.loader)  # host batches: the trainer's copy is inside consume
    start = clock.now()
    first = next(batches, None)
    if first is None:
        return
    into.startup_s.append(clock.now() - start)
    with compute_threads(options):
        consume(first)  # the first batch also warms the model up; it is not timed
        samples, waiting, begin = 0, 0.0, clock.now()
        while not samples or clock.now() - begin < window_s:  # one batch at least
            ask = clock.now()
            batch = next(batches, None)
            if batch is None:  # an epoch shorter than the window: start another
                batches = iter(loader.loader)
                continue
            waiting += clock.now() - ask
            consume(batch)
            samples += samples_in(batch)
        elapsed = clock.now() - begin
    into.samples_per_second.append(samples / elapsed)
    into.data_wait.append(waiting / elapsed)
    del batches  # shuts the workers down before the next candidate starts its own


def _rounds(source: Source, candidates: list[LoaderOptions], consume,
            window: float | Budget, rounds: int, later: int = 0) -> list[Measured]:
    """Measure the candidates in interleaved rounds. With a Budget, each round's windows come
    from what is left of it, counting the `later` measurements still planned after these."""
    measured = [Measured(c) for c in candidates]

    def measure(index: int, r: int) -> bool:
        to_come = (rounds - r) * len(measured) + later
        window_s = window.window(to_come) if isinstance(window, Budget) else window
        start = clock.now()
        _measure(source, measured[index].options, consume, window_s, measured[index])
        if isinstance(window, Budget):
            window.spend(clock.now() - start, window_s)
        return True

    interleave(list(range(len(measured))), rounds, measure)
    return [m for m in measured if m.samples_per_second]


def _pick(measured: list[Measured]) -> Measured:
    best = max(m.median("samples_per_second") for m in measured)
    near = [m for m in measured if m.median("samples_per_second") >= (1 - NEAR) * best]
    return min(near, key=lambda m: (m.options.num_workers, m.options.prefetch_factor or 2,
                                    m.options.compute_threads is not None))


def budget_for(source: Source, samples: int, base: LoaderOptions,
               consume: Callable[[Batch], None], epochs: int, windows: int
               ) -> tuple[Budget | None, str]:
    """(budget, why): BUDGET_SHARE of the run, for `windows` measurements and their overheads.

    The run's length and a measurement's overhead come from a first look at the base
    settings. None: the run is too short to pay for even the shortest windows, so nothing
    more is measured.
    """
    look = Measured(base)
    start = clock.now()
    _measure(source, base, consume, MIN_WINDOW_S, look)
    look_s = clock.now() - start
    if not look.samples_per_second:
        return None, "the dataset yielded no batch"
    run_s = epochs * samples / look.samples_per_second[0]
    budget = Budget(BUDGET_SHARE * run_s - look_s, max(look_s - MIN_WINDOW_S, 0.0))
    if not budget.affords(windows):
        return None, (f"not measured: the run is projected at {run_s:.0f} s, too short to pay "
                      f"for {windows} windows of {MIN_WINDOW_S} s and their overhead "
                      f"({budget.overheads[0]:.2f} s each); set data.num_workers to choose "
                      f"yourself")
    return budget, f"projected run {run_s:.0f} s"


def tune_loader(dataset: Dataset, batch_size: int, consume: Callable[[Batch], None],
                base: LoaderOptions, tunable: set[str], on_cuda: bool, epochs: int, seed: int = 0,
                window_s: float | None = None, rounds: int = ROUNDS,
                collate_fn: Callable[[list], Batch] | None = None,
                run_samples: int | None = None) -> LoaderTuning:
    """Measure the settings named in `tunable` (LoaderOptions field names); keep `base` for
    the others. A stream's readers are measured like a DataLoader's workers.

    `window_s` None: sized from the projected run (see `budget_for`): `epochs` passes over
    the dataset, or `run_samples` in all (a stream's run, which has no length to pass over).
    """
    began = clock.now()
    streamed = is_stream(dataset)

    def source(options: LoaderOptions) -> DataLoaderBatches | StreamBatches:
        if streamed:
            return StreamBatches(dataset, batch_size, seed, options, collate_fn=collate_fn)
        return DataLoaderBatches(dataset, batch_size, shuffle=True, seed=seed, options=options,
                                 collate_fn=collate_fn)

    if "pin_memory" in tunable:
        base = replace(base, pin_memory=on_cuda)
    cpus = usable_cpus()
    counts = worker_counts(cpus) if "num_workers" in tunable else [base.num_workers]
    stage1 = []
    for n in counts:
        stage1.append(replace(base, num_workers=n))
        fewer = max(1, cpus - n)
        if n and not on_cuda and "num_workers" in tunable and fewer < torch.get_num_threads():
            # workers and compute share the cores: also try leaving them the workers' cores
            stage1.append(replace(base, num_workers=n, compute_threads=fewer))
    note = "windows given by the caller"
    window: float | Budget | None = window_s
    followers = 2 * rounds  # the best and one variant, measured again after stage 1
    if window is None:
        window, note = budget_for(source, run_samples or len(dataset), base, consume,
                                  1 if run_samples else epochs,
                                  len(stage1) * rounds + followers)
        if window is None:
            return LoaderTuning(base, [], clock.now() - began, 0.0, note)
    measured = _rounds(source, stage1, consume, window, rounds, followers)
    best = _pick(measured)
    variants = []
    if best.options.num_workers and "prefetch_factor" in tunable:
        variants.append(replace(best.options, prefetch_factor=4))
    if on_cuda and "pin_memory" in tunable:
        variants.append(replace(best.options, pin_memory=not best.options.pin_memory))
    if variants:
        measured += _rounds(source, [best.options, *variants], consume, window, rounds)[1:]
        best = _pick(measured)
    choice = best.options
    if "persistent_workers" in tunable and not streamed:  # (a stream's workers never persist)
        choice = replace(choice, persistent_workers=choice.num_workers > 0 and epochs > 1)
    used = statistics.median(window.windows) if isinstance(window, Budget) else window
    return LoaderTuning(choice, measured, clock.now() - began, used, note)
