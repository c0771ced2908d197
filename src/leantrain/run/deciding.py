"""The "auto" choices a rule can get wrong, decided on the run's own first steps.

A rule is right for one model and wrong for the next (on this project's 2-core CPU bf16
autocast made a tiny GPT-2 1.5x as fast and a tiny BERT 0.93x, issue 44), and measuring on
copies of the model before the run costs steps a short run cannot spare. So the run starts on
the rule's plan and its own first steps decide: each candidate, the plan with one choice
flipped (precision fp32/bf16, the optimizer's kernels, channels_last), takes windows of real
training steps beside the current plan, in interleaved rounds (order reversed every other
round; the first step after a switch is not timed: one-off kernel set-up). From `MIN_ROUNDS`
rounds on, a candidate whose paired speed-up has a 95% interval above 1 becomes the plan (the
others then measure against it afresh), one whose interval lies below 1 is dropped, and the
rest go on until `SHARE` of the run's steps is spent: the plan then stays as it is for them.
A speed-up whose interval lies within `TIE` of 1 is a tie: the plan stays.

Every step trains, on the same data order and optimizer state, so deciding costs only the time
the slower windows lose, and a switch changes what the model learns only by the precision's
own rounding while a bf16 window runs. The decision goes to the run folder's config.yaml (a
resume continues on it) and to the plan cache (`run.plan_cache`): the next run starts on it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..config import config_from_dict, merge
from ..measure import clock
from ..measure.rounds import MIN_ROUNDS, interval, paired_ratios
from ..techniques.base import Outcome
from ..techniques.memory_format import switch_layout
from ..techniques.optimizer import switch_kernels
from . import plan_cache
from .plan import Run
from .records import write_config
from .state import TrainState

log = logging.getLogger(__name__)

SHARE = 0.25  # of the run's optimizer steps, at most, taken in measuring windows
WINDOW_S = 0.3  # a window's timed seconds, where the run has the steps for it
MIN_WINDOW = 2  # timed steps in a window, at least
SIZING_STEPS = 3  # the rule's steps timed to size the windows, after the run's first
KEYS = ("precision", "channels_last", "optimizer_impl")  # what can change between two steps
# speed-ups within this of 1 are ties (the rule kept): a window's timing cannot tell them apart
# from its own jitter, and a switch for them would not pay for its measuring
TIE = 0.01


def can_switch(key: str, value: Any, rule: Any) -> bool:
    """Whether a choice can change mid-run: fp8 converts layers and fp16 needs a loss scaler
    from the first step, so only fp32 <-> bf16 autocast among precisions."""
    if key == "precision":
        return {value, rule} <= {"fp32", "bf16"}
    return key in KEYS


def least_steps(candidates: int) -> int:
    """The fewest steps a decision can take: the sizing, then `MIN_ROUNDS` rounds of each
    candidate and the plan, each window a switch step and `MIN_WINDOW` timed steps."""
    return 1 + SIZING_STEPS + MIN_ROUNDS * (candidates + 1) * (1 + MIN_WINDOW)


@dataclass
class Pending:
    """What `run.defaults` leaves to the run's first steps."""

    flips: dict[str, Any]  # plan key -> the value tried against the rule's
    rule: dict[str, Any]  # plan key -> the rule's value
    total_steps: int
    cache_key: str | None  # None: plan.cache=false
    prior: dict[str, Any] = field(default_factory=dict)  # measured before the run (fp8)
    # compile "auto": given the run's projected seconds and the plan decided, the values to
    # set (compile, compile_mode: none to stay eager), the summary's note and the probe's
    # record (`run.defaults.compile_probe`)
    compile: Callable[[float, dict[str, Any]], tuple[dict[str, Any], str, dict | None]] | None \
        = None


def _show(key: str, value: Any) -> str:
    return f"{key} {'on' if value else 'off'}" if isinstance(value, bool) else str(value)


def _applied(key: str, value: Any) -> bool:
    return value not in ("fp32", "for-loop") if key != "channels_last" else bool(value)


class PlanTrial:
    """Decides `pending` on the run's steps: `after_step` after every optimizer step."""

    def __init__(self, pending: Pending, run: Run, out_dir: Path | None):
        self.pending, self.run, self.out_dir = pending, run, out_dir
        self.live = dict(pending.rule)  # what the steps run now
        self.current = dict(pending.rule)  # the plan the candidates measure against
        self.open = dict(pending.flips)
        self.notes: dict[str, str] = {}  # per plan key: how it was decided
        self.results: dict[str, dict[str, Any]] = {}  # per plan key: what was measured
        self.rates: dict[str, list[float]] = {}  # samples/s of windows since the plan changed
        self.timed: dict[tuple, list[tuple[int, float]]] = {}  # values -> (steps, seconds)
        self.compiled: dict[str, Any] = {}  # compile's values, when the probe chose it
        self.switches: list[float] = []  # seconds of each first step after a switch
        self.limit, self.seen, self.window = int(SHARE * pending.total_steps), 0, 0
        self.now, self.samples, self.tick, self.optimizer = 0.0, 0, 0.0, None
        self.paused: float | None = None  # when a compile probe paused the run
        self._steps: Iterator[None] | None = self._decide()

    def after_step(self, state: TrainState, tick: float) -> float:
        """After an optimizer step, before the loop's logs and evaluations. `tick`: when the
        loop's step clock last started (an evaluation, a checkpoint or an epoch's start moves
        it: a window's clock leaves that out). Returns the step clock, moved on past a compile
        probe (its seconds are not training time)."""
        if self._steps is None:
            return tick
        if self.run.plan.device.type == "cuda":
            torch.cuda.synchronize(self.run.plan.device)
        self.now, self.tick = clock.now(), tick
        self.samples, self.optimizer = state.progress.samples, state.optimizer
        self.seen, self.paused = self.seen + 1, None
        try:
            next(self._steps)
        except StopIteration:
            self._steps = None
        if self.paused is None:
            return tick
        state.progress.step_seconds += self.paused - tick  # (the steps before the probe)
        return clock.now()

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Validation on the current plan, the candidate's step settings restored after it."""
        shown = {k: v for k, v in self.live.items() if k != "optimizer_impl"}
        self._use({k: self.current[k] for k in shown})
        try:
            yield
        finally:
            self._use(shown)

    def _decide(self) -> Iterator[None]:
        yield  # the run's first step carries one-off set-up: not timed
        step_s, _ = yield from self._timed(None, SIZING_STEPS)
        rounds_fit = (self.limit - self.seen) // (MIN_ROUNDS * (len(self.open) + 1)) - 1
        self.window = max(MIN_WINDOW, min(math.ceil(WINDOW_S / step_s), rounds_fit))
        rounds = 0
        while self.open and self.seen + (len(self.open) + 1) * (self.window + 1) <= self.limit:
            if rounds == 0:
                self.rates = {name: [] for name in ("plan", *self.open)}
            names = ["plan", *self.open]
            for name in names if rounds % 2 == 0 else names[::-1]:
                values = self._values(name)
                self._use(values)
                began = self.now
                yield  # the first step after a switch: not in the rates (one-off set-up)
                self.switches.append(self.now - max(began, self.tick))
                self.rates[name].append((yield from self._timed(values, self.window))[1])
            rounds += 1
            if rounds >= MIN_ROUNDS and self._judge():
                rounds = 0  # a new plan: the others measure against it afresh
        self._use(self.current)
        self._settle(self._undecided)
        if self.pending.compile is not None:
            self._probe_compile(self._step_s(self.current) or step_s)
        self._finish()

    def _values(self, name: str) -> dict[str, Any]:
        return self.current if name == "plan" else {**self.current, name: self.open[name]}

    def _timed(self, values: dict[str, Any] | None, steps: int) -> Iterator[None]:
        """Time `steps` consecutive training steps; returns (seconds a step, samples/s). What
        the loop does between two steps (an evaluation, a checkpoint, an epoch's start) is
        left out: the window's clock stops at the step before and starts again at `tick`."""
        start, last, samples, elapsed = self.now, self.now, self.samples, 0.0
        for _ in range(steps):
            yield
            if self.tick > last:  # the loop paused after the last step
                elapsed, start = elapsed + last - start, self.tick
            last = self.now
        elapsed = max(elapsed + last - start, 1e-9)
        if values is not None:  # (the sizing steps carry the run's warm-up: not compared)
            self.timed.setdefault(tuple(sorted(values.items())), []).append((steps, elapsed))
        return elapsed / steps, (self.samples - samples) / elapsed

    def _use(self, values: dict[str, Any]) -> None:
        run = self.run
        for key, value in values.items():
            if self.live[key] == value:
                continue
            if key == "precision":
                run.plan.use_precision(value)
            elif key == "channels_last":
                switch_layout(run.model, self.optimizer, value)
                run.plan.channels_last = value
                run.step = replace(run.step, channels_last=value)
            else:
                switch_kernels(self.optimizer, value)
                run.plan.optimizer_impl = value
            self.live[key] = value

    def _judge(self) -> bool:
        """Drop the candidates measured slower or tied, take the fastest measured faster; True
        when the plan changed."""
        winners = {}
        for name in list(self.open):
            ratios = paired_ratios(self.rates[name], self.rates["plan"])
            found = interval(ratios)
            if found is None:
                continue
            if found[1] < 1.0 - TIE or found[0] >= 1.0 - TIE and found[1] <= 1.0 + TIE:
                self._close(name, ratios, found, taken=False)  # slower, or a tie
            elif found[0] > 1.0 + TIE:
                winners[name] = (ratios, found)
        if not winners:
            return False
        best = max(winners, key=lambda name: statistics.median(winners[name][0]))
        self._close(best, *winners[best], taken=True)
        return True

    def _measured(self, name: str, ratios: list[float], found: tuple[float, float] | None
                  ) -> str:
        span = f", 95% interval {found[0]:.2f}-{found[1]:.2f}x" if found else ""
        return (f"measured on the run's first steps: {_show(name, self.open[name])} ran "
                f"{statistics.median(ratios):.2f}x as fast as {_show(name, self.current[name])}"
                f" ({len(ratios)} rounds of {self.window} steps{span})")

    def _close(self, name: str, ratios: list[float], found: tuple[float, float],
               taken: bool) -> None:
        note = self._measured(name, ratios, found)
        value, against = self.open.pop(name), self.current[name]
        if taken:
            self.current[name] = value
            note += f"; taken from step {self.seen + 1}"
        else:
            note += f"; {_show(name, against)} kept"
        self.notes[name] = note
        self.results[name] = {"key": name, "rule": self.pending.rule[name], "against": against,
                              "tried": value, "ratios": ratios,
                              "median": statistics.median(ratios), "interval": list(found),
                              "chosen": self.current[name]}

    def _undecided(self, name: str) -> str:
        ratios = paired_ratios(self.rates.get(name, []), self.rates.get("plan", []))
        kept = f"{_show(name, self.current[name])} kept"
        if not ratios:
            return f"{kept} (not measured: {self.seen} steps, {SHARE:.0%} of the run, left " \
                   f"no room for a round)"
        return (f"{kept} ({self._measured(name, ratios, interval(ratios))}: not told from 1 "
                f"within {self.seen} steps, {SHARE:.0%} of the run)")

    def _settle(self, note_for_open: Callable[[str], str]) -> None:
        """The candidates still open get `note_for_open(name)`; each decided choice's outcome
        in the plan says what ran and how it was decided."""
        for name in self.open:
            self.notes[name] = note_for_open(name)
        self.open = {}
        for name, rule in self.pending.rule.items():
            ran = self.live[name]
            self._retell(name, _applied(name, ran), None if ran == rule else _show(name, ran),
                         self.notes[name])

    def _retell(self, name: str, applied: bool, ran: str | None, note: str) -> None:
        """The plan's outcome `name` says what ran (`ran`; None: its rule's words) and how
        that was decided (`note`)."""
        outcomes = self.run.plan.outcomes
        for i, outcome in enumerate(outcomes):
            if outcome.name == name:
                outcomes[i] = Outcome(name, applied, f"{ran or outcome.detail}; {note}")

    def _probe_compile(self, step_s: float) -> None:
        """Compile "auto": probed (on copies of the model) once the plan is decided, where the
        run's projected length could pay for a compile; taken from the next step if it won."""
        self.paused = clock.now()
        values, note, found = self.pending.compile(step_s * self.pending.total_steps,
                                                   self.current)
        self.notes["compile"] = note
        if found is not None:
            self.results["compile"] = found
        plan, self.compiled = self.run.plan, values
        if values.get("compile"):
            plan.compile, plan.compile_mode = True, values.get("compile_mode", "default")
        self._retell("compile", plan.compile,
                     f"compiled from step {self.seen + 1}" if plan.compile else None, note)
        if plan.compile:
            self._retell("compile_mode", True, plan.compile_mode,
                         "measured by the compile probe")

    def _finish(self) -> None:
        """The plan decided: say so, keep it for a resume and the next run."""
        run = self.run
        run.cfg = config_from_dict(merge(run.cfg.to_dict(),
                                         {"plan": {**self.current, **self.compiled}}))
        if self.out_dir is not None and run.dist.is_main:
            write_config(self.out_dir, run.cfg)
        record = self.record()
        if self.pending.cache_key is not None:
            plan_cache.write(self.pending.cache_key, record)
        log.info("plan: decided on the run's first %d steps (they lost ~%.1f s against the "
                 "chosen plan): %s", self.seen, max(record["cost_s"] or 0.0, 0.0),
                 "; ".join(f"{k}: {v}" for k, v in self.notes.items()))

    def _step_s(self, values: dict[str, Any]) -> float | None:
        windows = self.timed.get(tuple(sorted(values.items())), [])
        steps = sum(s for s, _ in windows)
        return sum(t for _, t in windows) / steps if steps else None

    def record(self) -> dict[str, Any]:
        """What the summary's plan_measurement and the plan cache keep: each choice's note and
        result (beside those measured before the run), the steps deciding took, and what its
        windows and switch steps lost against the chosen plan's steps (`cost_s`) beside what
        the chosen plan gains over the rule's in the rest of the run (`gain_s`)."""
        prior = self.pending.prior
        chosen, rule = self._step_s(self.current), self._step_s(self.pending.rule)
        final = tuple(sorted(self.current.items()))
        cost = None if chosen is None else sum(
            seconds - steps * chosen for values, windows in self.timed.items()
            if values != final for steps, seconds in windows) + sum(
            seconds - chosen for seconds in self.switches)
        gain = None if chosen is None or rule is None else \
            (rule - chosen) * max(self.pending.total_steps - self.seen, 0)
        return {**prior, "in_run": True,
                "values": {**prior.get("values", {}), **self.current, **self.compiled},
                "notes": {**prior.get("notes", {}), **self.notes},
                "results": {**prior.get("results", {}), **self.results},
                "steps": self.seen, "window_steps": self.window, "cost_s": cost,
                "gain_s": gain}

    def close(self) -> dict[str, Any]:
        """The summary's record when the run ends. A run that ended while measuring keeps the
        plan its last steps ran on and says so; nothing is cached."""
        if self._steps is not None:
            self._steps = None
            self._settle(lambda name: f"not decided: the run ended after {self.seen} steps, "
                                      f"while measuring")
            if self.pending.compile is not None:
                self.notes["compile"] = "eager (not decided: the run ended while measuring)"
        return self.record()
