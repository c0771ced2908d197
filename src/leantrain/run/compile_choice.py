"""Whether torch.compile pays on this run: the probe that measures it, and the verdict.

Compiling can win or lose per model on the same machine (2-core AMD EPYC, torch 2.13: under
the plan leantrain chose, this probe measured the tiny BERT example's steps at 1.09x, 95%
1.04-1.13x, the tiny GPT-2's at 0.94x and the digits CNN's at 0.84x), and it costs a compile
first (21-24 s cold for those HF models there; a new wrapper of the same model in the same
process then compiles in under 0.1 s, Dynamo's and Inductor's caches). So `plan.compile`
"auto" (the default) is eager unless the compiled step was measured faster on this model here,
on real batches, in paired rounds whose 95% interval lies above 1, and the compile pays for
itself within the run:

- the first run of a model probes compile only when the run is long enough that a compile of
  the usual cost on this device (`PRIOR`) would pay at the usual gain (a losing probe then
  costs at most a small share of the run). The probe's compile is not thrown away: the run's
  own compile after it reuses the process's caches;
- the measured speed-up, the compile's seconds and the eager step time are cached with the
  other measured choices, so a later run of the same model decides at no cost: compile when
  `break_even_steps` (with `MARGIN`) fits in the run, else eager, saying after how many steps
  compile would pay.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig, config_from_dict, merge
from ..measure.compile_watch import break_even_steps, graphs_compiled
from ..measure.rounds import interleave, interval, paired_ratios
from ..measure.timing import WARMUP_STEPS, timed_window
from ..techniques import compile_mode
from ..techniques.base import Context
from .plan import build
from .trainer import Trainer

MARGIN = 2.0  # a compile must pay back this many times over within the run
WARM_UP_WINDOWS = 6  # at most, until a window of compiled steps compiles no new graph
RETIMED_WINDOWS = 3  # at most, per timed window that compiled (its time is compile time)


@dataclass(frozen=True)
class Prior:
    """What a compile usually costs and gives on a device type, before this model is measured:
    CPU from the tiny HF examples above (the larger of their cold compiles, the winners' gain);
    CUDA from GPT-2 124 M on one H200 (issue 31: 2.15x bf16 + compile over bf16 eager)."""

    compile_s: float
    speedup: float


PRIOR = {"cpu": Prior(compile_s=25.0, speedup=1.15), "cuda": Prior(compile_s=60.0, speedup=2.0)}


def worth_probing(device_type: str, run_s: float) -> tuple[bool, str]:
    """Whether a run projected at `run_s` seconds could pay for a usual compile at the usual gain
    (with `MARGIN`); if not, why, in the summary's words."""
    prior = PRIOR.get(device_type)
    if prior is None:
        return False, f"not measured on {device_type}"
    needed = MARGIN * prior.compile_s / (1.0 - 1.0 / prior.speedup)
    if run_s >= needed:
        return True, ""
    return False, (f"not measured: a compile here usually takes ~{prior.compile_s:.0f} s and "
                   f"gives ~{prior.speedup:.2f}x, which pays on runs over ~{needed:.0f} s; "
                   f"this one is projected at {run_s:.0f} s")


def verdict(found: dict[str, Any], steps: int, sunk: bool) -> tuple[bool, str]:
    """(compile or not, the summary's note) from a probe's record (`median`, `interval`, `rounds`,
    `compile_s`, `eager_step_s`) for a run of `steps` optimizer steps. `sunk`: this run already
    paid the compile (it probed it), so only the speed-up decides."""
    low, high = found["interval"] if found.get("interval") else (None, None)
    speed = f"{found['median']:.2f}x as fast as eager"
    span = f"{found['rounds']} rounds, 95% interval {low:.2f}-{high:.2f}x" if low is not None \
        else f"{found['rounds']} rounds, no interval"
    mode = found.get("mode", "default")
    how = "compiled steps" if mode == "default" else f"compiled steps ({mode})"
    measured = f"measured: {how} ran {speed} ({span}) after a {found['compile_s']:.1f} s compile"
    if low is None or low <= 1.0:
        return False, f"{measured}; eager kept"
    if sunk:
        return True, f"{measured}; compiled from here on (the probe paid the compile)"
    steps_needed = break_even_steps(found["compile_s"], found["eager_step_s"],
                                    found["eager_step_s"] / found["median"])
    if MARGIN * steps_needed <= steps:
        return True, f"{measured}; pays after ~{steps_needed:,.0f} steps of this run's {steps:,}"
    return False, (f"{measured}; eager kept: compile would pay after ~{steps_needed:,.0f} "
                   f"steps (x{MARGIN:g} margin: {MARGIN * steps_needed:,.0f}); this run has "
                   f"{steps:,}")


def modes(cfg: TrainConfig, model: nn.Module, run_s: float, device: torch.device
          ) -> tuple[str, ...]:
    """The default mode, and on a GPU CUDA graphs (reduce-overhead) too, where the user left the
    mode alone and the run is long enough for a second compile: a launch-bound step (small
    kernels, the host behind) is what it removes, and only a measurement tells."""
    if cfg.plan.compile_mode != "default" or device.type != "cuda":
        return (cfg.plan.compile_mode,)
    ctx = Context(device, model, cfg.optim.name, None)
    graphs = compile_mode.check(ctx, "reduce-overhead")[0] and \
        worth_probing(device.type, run_s / 2)[0]
    return ("default", "reduce-overhead") if graphs else ("default",)


class Running:
    """A copy of the model training under `cfg`, kept going across timed windows (a compiled
    copy compiles once, at its first step)."""

    def __init__(self, cfg: TrainConfig, trials: Any):
        run = build(cfg, copy.deepcopy(trials.model), trials.train, trials.val, trials.loss_fn,
                    measure_loader=False, collate_fn=trials.collate_fn, evaluates=False)
        self.device = run.plan.device
        self.steps = Trainer(run, progress_bar=False).steps()

    def window(self, stop: Callable[[int, float], bool]) -> tuple[int, float]:
        return timed_window(lambda: next(self.steps)[0], self.device, stop)

    def close(self) -> None:
        self.steps.close()


def _warm_up(compiled: Running) -> tuple[int, float]:
    """(steps, seconds) from the first compiled step until a few steps pass with no new graph
    (padded batches of a new length recompile once, then Dynamo marks the length dynamic)."""
    steps, seconds = 0, 0.0
    for _ in range(WARM_UP_WINDOWS):
        before = graphs_compiled()
        seconds += compiled.window(lambda k, t: k >= 1 + WARMUP_STEPS)[1]
        steps += 1 + WARMUP_STEPS
        if steps > 1 + WARMUP_STEPS and graphs_compiled() == before:
            break
    return steps, seconds


def probe(trials: Any, cfg: TrainConfig, rounds: int,
                   modes: tuple[str, ...] = ("default",)) -> dict[str, Any]:
    """Eager against compiled steps of the plan `cfg` in each compile mode, paired over
    `rounds` windows after the compiles; a compile's seconds are its warm-up's wall time beyond
    its steps' share. Returns the fastest mode's record (its "mode"), every mode's under
    "modes"."""
    def plan(**values) -> TrainConfig:
        return config_from_dict(merge(cfg.to_dict(), {"plan": values}))

    runners = {"eager": Running(plan(compile=False), trials)}
    warm: dict[str, tuple[int, float]] = {}
    recompiled: dict[str, float] = {}
    try:
        for mode in modes:
            runners[mode] = Running(plan(compile=True, compile_mode=mode), trials)
        runners["eager"].window(lambda k, t: k >= WARMUP_STEPS)
        warm = {mode: _warm_up(runners[mode]) for mode in modes}

        def rate(name: str, r: int) -> float:
            """A window in which Dynamo compiled (a batch of a new length, long after the
            warm-up) times the compile, not the step: its time goes to the compile's seconds
            and the window runs again."""
            for _ in range(RETIMED_WINDOWS):
                before = graphs_compiled()
                samples, seconds = runners[name].window(
                    lambda k, t: k >= 2 and t >= trials.window_s)
                if graphs_compiled() == before:
                    break
                recompiled[name] = recompiled.get(name, 0.0) + seconds
            return samples / seconds

        rates = interleave(list(runners), rounds, rate)
    finally:
        for runner in runners.values():
            runner.close()
    per_step = cfg.data.batch_size * cfg.plan.grad_accum
    found = {mode: _compiled(rates[mode], rates["eager"], warm[mode], per_step,
                             recompiled.get(mode, 0.0)) for mode in modes}
    best = max(modes, key=lambda m: (bool(found[m]["interval"] and found[m]["interval"][0] > 1),
                                     found[m]["median"]))
    return {**found[best], "mode": best, "modes": found, "rates": rates,
            "eager_step_s": per_step / statistics.median(rates["eager"]),
            "window_s": trials.window_s}


def _compiled(rates: list[float], eager: list[float], warm: tuple[int, float], per_step: int,
              recompiled_s: float) -> dict[str, Any]:
    ratios = paired_ratios(rates, eager)
    step_s = per_step / statistics.median(rates)
    found = interval(ratios)
    return {"ratios": ratios, "median": statistics.median(ratios), "rounds": len(ratios),
            "interval": list(found) if found else None, "compiled_step_s": step_s,
            "compile_s": max(warm[1] - warm[0] * step_s, 0.0) + recompiled_s,
            "recompiled_s": recompiled_s}
