"""Whether torch.compile pays on this run: decided by measurement, not assumed.

Compiling can win or lose per model on the same machine (2-core AMD EPYC, torch 2.13, one step
of the tiny HF examples: BERT 1.13x, the digits CNN 1.14x, GPT-2 0.93x), and it costs a compile
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

from dataclasses import dataclass
from typing import Any

from ..measure.compile_watch import break_even_steps

MARGIN = 2.0  # a compile must pay back this many times over within the run


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
