"""What else used the machine while leantrain timed something.

On shared cores a timing measures the neighbours too: one tiny BERT step took 6 ms alone and
560 ms with one other process on the cores. Two snapshots, around a measurement, of the whole
machine's busy CPU time and of this process's own (its live children included) give the share
of all cores' time that *other* processes used meanwhile. A VM's steal time (the host taking
cores back) counts as others'. When the cores the others left free are fewer than torch's
threads (by more than OVERSUBSCRIBED cores), torch's threads were oversubscribed: the slowest
thread sets an op's time, so one neighbour slows every step. A measurement is flagged busy
when they were, or when others used BUSY_SHARE of the cores or more (caches and memory
bandwidth are shared even when the threads are not), in the JSON and the printed report: its
figures are noisier than a quiet machine's. On a GPU in use, NVML's per-process samples give
the share of the time other processes kept its SMs busy (a neighbour's kernels queue with
ours); GPU_BUSY_PERCENT or more flags the reading busy as well.

A command started from the command line fits torch's threads to the cores others leave free
(`fit_threads`): under one CPU hog on 2 cores, 1 thread stepped a tiny BERT 3.9x faster than 2
(benchmarks/busy.py). An explicit OMP_NUM_THREADS is the user's choice and is kept;
LEANTRAIN_FIT_THREADS=0 keeps torch's default.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch

from ..env import nvml_handle
from . import clock

OVERSUBSCRIBED = 0.5  # cores short of one per torch thread, on average, that count as busy
BUSY_SHARE = 0.25  # of all cores' time used by others: a shared machine, threads fitted or not
FIT_SAMPLE_S = 0.25  # how long a command watches the cores before fitting its threads
GPU_BUSY_PERCENT = 10.0  # of the time other processes kept the GPU's SMs busy


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
    # SM utilisation by other processes on the GPU in use (None: no GPU in use, or no NVML)
    gpu_others_percent: float | None = None

    @property
    def free_cores(self) -> float:
        return self.cores * (1 - self.others_share)

    @property
    def oversubscribed(self) -> bool:
        return self.free_cores < self.threads - OVERSUBSCRIBED

    @property
    def gpu_shared(self) -> bool:
        return (self.gpu_others_percent or 0.0) >= GPU_BUSY_PERCENT

    @property
    def busy(self) -> bool:
        return self.oversubscribed or self.others_share >= BUSY_SHARE or self.gpu_shared

    def describe(self) -> str:
        state = "BUSY" if self.busy else "quiet"
        threads = f"{self.threads} torch thread{'s' if self.threads > 1 else ''}"
        how = (f"{threads} on ~{self.free_cores:.1f} free cores: oversubscribed, set "
               f"OMP_NUM_THREADS={fitted_threads(self)}" if self.oversubscribed else threads)
        gpu = "" if self.gpu_others_percent is None else \
            f" and kept the GPU's SMs busy {self.gpu_others_percent:.0f}% of the time"
        return (f"machine {state}: other processes used {self.others_share:.0%} of the "
                f"{self.cores} cores' time{gpu} while timing ({how})"
                + ("; figures are noisier than on a quiet machine, re-run there to rely on "
                   "them" if self.busy else ""))

    def to_dict(self) -> dict:
        return {**asdict(self), "busy": self.busy}

    @classmethod
    def from_dict(cls, found: dict) -> LoadReading:
        return cls(found["others_share"], found["cores"], found["threads"], found["seconds"],
                   found.get("gpu_others_percent"))


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


def busy_line(found: dict | None) -> str | None:
    """The line a report prints for a reading (`LoadReading.to_dict()`) that was busy."""
    if not found:
        return None
    reading = LoadReading.from_dict(found)
    return reading.describe() if reading.busy else None


def gpu_others_percent(since_us: int) -> float | None:
    """How busy other processes kept the SMs of the CUDA device in use since `since_us` (epoch
    microseconds, NVML's clock): each one's mean sampled SM utilisation, summed. None when no
    GPU is in use here or NVML cannot tell (no driver library, no per-process accounting)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None  # (reading it must not initialise CUDA for a CPU run)
    try:
        nvml, handle = nvml_handle(torch.cuda.current_device())
        samples = nvml.nvmlDeviceGetProcessUtilization(handle, since_us)
    except Exception as exc:  # NVML raises one class per cause
        return 0.0 if type(exc).__name__ == "NVMLError_NotFound" else None  # (no samples)
    by_process = defaultdict(list)
    for sample in samples:
        if sample.pid != os.getpid() and sample.timeStamp >= since_us:
            by_process[sample.pid].append(sample.smUtil)
    return float(sum(sum(v) / len(v) for v in by_process.values()))


class LoadWatch:
    """`with LoadWatch() as watch: ...` then `watch.reading`."""

    def __enter__(self) -> LoadWatch:
        self.start, self.reading = snapshot(), None
        self.since_us = int(time.time() * 1e6)
        return self

    def __exit__(self, *exc) -> None:
        reading = between(self.start, snapshot())
        self.reading = LoadReading(reading.others_share, reading.cores, reading.threads,
                                   reading.seconds, gpu_others_percent(self.since_us))


def slowdown() -> float:
    """How many times longer than alone a single-threaded piece of work takes now: processes
    running or waiting per core, the larger of now's count and the last minute's average
    (the average lags a neighbour that just started), at least 1. On 2 cores beside 4
    spinning processes it is about 3."""
    cores = os.cpu_count() or 1
    average = os.getloadavg()[0]
    try:  # Linux: "0.50 0.40 0.30 2/345 12345", the 4th field's first number runs now
        now = float(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        now = 0.0
    return max(1.0, max(average, now) / cores)


def fitted_threads(reading: LoadReading) -> int:
    """One torch thread per core the others left free (at least one)."""
    return max(1, int(reading.free_cores + 0.5))


def fit_threads(sample_s: float = FIT_SAMPLE_S) -> str | None:
    """Watch the cores for `sample_s` while idle, and when torch's threads outnumber the free
    ones, run one per free core. Returns what was done, for the log (None: nothing)."""
    if os.environ.get("OMP_NUM_THREADS") or os.environ.get("LEANTRAIN_FIT_THREADS") == "0":
        return None  # the user's (or the launcher's) choice
    with LoadWatch() as watch:
        time.sleep(sample_s)
    reading = watch.reading
    if not reading.oversubscribed:
        return None
    fitted = fitted_threads(reading)
    torch.set_num_threads(fitted)
    return (f"other processes use {reading.others_share:.0%} of the {reading.cores} cores: "
            f"torch runs {fitted} thread{'s' if fitted > 1 else ''} instead of "
            f"{reading.threads}, so that none waits on a busy core (set OMP_NUM_THREADS to "
            "choose)")
