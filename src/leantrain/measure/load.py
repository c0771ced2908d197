"""What else used the machine while leantrain timed something.

On shared cores a timing measures the neighbours too: one tiny BERT step took 6 ms alone and
560 ms with one other process on the cores. Two snapshots, around a measurement, of the whole
machine's busy CPU time and of this process's own (its live children included) give the share
of all cores' time that *other* processes used meanwhile. A VM's steal time (the host taking
cores back) counts as others'. When the cores the others left free are fewer than torch's
threads (by more than OVERSUBSCRIBED cores), torch's threads were oversubscribed: the slowest
thread sets an op's time, so one neighbour slows every step. The measurement is then flagged
busy, in the JSON and the printed report: its figures are noisier than a quiet machine's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import psutil
import torch

from . import clock

OVERSUBSCRIBED = 0.5  # cores short of one per torch thread, on average, that count as busy


@dataclass(frozen=True)
class Snapshot:
    wall: float  # clock.now()
    machine_busy_s: float  # all cores' non-idle CPU time since boot (steal included)
    own_s: float  # this process's CPU time, its live and finished children's included
    cores: int
    threads: int  # torch's intra-op threads


@dataclass(frozen=True)
class LoadReading:
    others_share: float  # of all cores' time over the interval, used by other processes
    cores: int
    threads: int
    seconds: float

    @property
    def busy(self) -> bool:
        free = self.cores * (1 - self.others_share)
        return free < self.threads - OVERSUBSCRIBED

    def describe(self) -> str:
        state = "BUSY" if self.busy else "quiet"
        return (f"machine {state}: other processes used {self.others_share:.0%} of the "
                f"{self.cores} cores' time while timing ({self.threads} torch threads)"
                + ("; figures are noisier than on a quiet machine, re-run there to rely on "
                   "them" if self.busy else ""))

    def to_dict(self) -> dict:
        return {**asdict(self), "busy": self.busy}

    @classmethod
    def from_dict(cls, found: dict) -> LoadReading:
        return cls(found["others_share"], found["cores"], found["threads"], found["seconds"])


def snapshot() -> Snapshot:
    times = psutil.cpu_times()
    idle = times.idle + getattr(times, "iowait", 0.0)
    total = sum(getattr(times, f) for f in times._fields if f not in ("guest", "guest_nice"))
    me = psutil.Process()
    own = _cpu_seconds(me.cpu_times(), children=True)
    for child in me.children(recursive=True):
        try:
            own += _cpu_seconds(child.cpu_times(), children=False)
        except psutil.Error:  # ended between the listing and the reading
            continue
    return Snapshot(clock.now(), total - idle, own, psutil.cpu_count() or 1,
                    torch.get_num_threads())


def _cpu_seconds(times, children: bool) -> float:
    found = times.user + times.system
    if children:
        found += getattr(times, "children_user", 0.0) + getattr(times, "children_system", 0.0)
    return found


def between(start: Snapshot, end: Snapshot) -> LoadReading:
    """The load from `start` to `end` (0 when no time passed)."""
    seconds = max(end.wall - start.wall, 0.0)
    capacity = seconds * end.cores
    others = (end.machine_busy_s - start.machine_busy_s) - (end.own_s - start.own_s)
    share = min(max(others / capacity, 0.0), 1.0) if capacity > 0 else 0.0
    return LoadReading(share, end.cores, end.threads, seconds)


class LoadWatch:
    """`with LoadWatch() as watch: ...` then `watch.reading`."""

    def __enter__(self) -> LoadWatch:
        self.start, self.reading = snapshot(), None
        return self

    def __exit__(self, *exc) -> None:
        self.reading = between(self.start, snapshot())
