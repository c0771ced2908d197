"""Where a training step's time goes: data wait, host-to-device copy, forward, backward, optimizer.

A step records a mark at the end of each phase; a phase lasts from the previous mark to its
own, and a step starts where the previous one ended. So the phases of a step add up to the
step exactly, and the step times add up to the loop's time except where `restart` skipped
something on purpose (compile warm-up, checkpoints, evaluation, logging).

On CPU a mark is `clock.now()` (`time.perf_counter`): CPU kernels run synchronously, so host
time is the time. On CUDA a mark is a recorded CUDA event, which adds no synchronization to the
hot path; events are read only once the GPU has passed them (`collect` never waits, `finish`
does, at the end of the run). There the "data" phase is the time the GPU sat idle between the
end of one step and the start of the next: waiting for the host, which is the loader plus
Python overhead. Host time spent fetching while the GPU was still busy costs nothing and counts
nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from . import clock, deadline

PHASES = ("data", "copy", "forward", "backward", "optimizer")
WARMUP_STEPS = 3  # steps a measured trial takes before its timed window (kernels, allocator)
DATA_WAIT_WARNING = 0.20  # warn when waiting for data takes more than this share of a step


class StepTimer:
    """Accumulates per-phase seconds over the micro-batches of a run."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.steps = 0
        self._pending: deque[list[Any]] = deque()  # marks of steps not read yet (CUDA)
        self._marks: list[Any] | None = None

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return clock.now()

    def restart(self) -> None:
        """The next step's data phase starts now (call after anything that is not a step)."""
        self._marks = [self._now()]

    def mark(self, phase: str) -> None:
        """End `phase` of the current step; the last phase ends the step."""
        if self._marks is None:
            self.restart()
        expected = PHASES[len(self._marks) - 1]
        if phase != expected:  # a phase skipped or repeated would silently shift every figure
            raise RuntimeError(f"step phase {phase!r} marked where {expected!r} was due")
        self._marks.append(self._now())
        if phase == PHASES[-1]:
            self._pending.append(self._marks)
            self._marks = [self._marks[-1]]
            if len(self._pending) > 256:  # bound the events held on a long unlogged stretch
                self.collect()

    def _elapsed(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1000 if self.cuda else end - start

    def collect(self) -> None:
        """Fold every step the device has finished into the totals, without waiting."""
        while self._pending and (not self.cuda or self._pending[0][-1].query()):
            marks = self._pending.popleft()
            for phase, start, end in zip(PHASES, marks, marks[1:], strict=False):
                self.seconds[phase] += self._elapsed(start, end)
            self.steps += 1

    def finish(self) -> None:
        """Wait for the last recorded step, then fold everything in."""
        if self.cuda and self._pending:
            self._pending[-1][-1].synchronize()
        self.collect()

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    def breakdown(self) -> dict[str, Any] | None:
        """Seconds and share of step time per phase; None before any step was timed."""
        total = self.total_seconds
        if not self.steps or total <= 0:
            return None
        return {
            "steps": self.steps,
            "seconds": dict(self.seconds),
            "fractions": {k: v / total for k, v in self.seconds.items()},
            "clock": "CUDA events" if self.cuda else "host clock",
        }


def format_breakdown(breakdown: dict[str, Any]) -> str:
    """One line: "data 3% · copy 0% · forward 41% · backward 44% · optimizer 12%"."""
    return " · ".join(f"{k} {v:.0%}" for k, v in breakdown["fractions"].items())


def timed_window(step: Callable[[], int], device: torch.device,
                 stop: Callable[[int, float], bool]) -> tuple[int, float]:
    """Run `step()` (it returns its samples) until `stop(steps run, seconds)`; the device is
    synchronised once, at the end, so the host runs ahead as in training. Returns (samples,
    seconds). The one timed loop of the bench's trials, the finders and doctor; a budget's
    deadline (`measure.deadline`) ends it between two steps."""
    start, samples, steps = clock.now(), 0, 0
    while not stop(steps, clock.now() - start):
        deadline.check()
        samples += step()
        steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return samples, clock.now() - start
