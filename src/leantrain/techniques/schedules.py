"""Learning-rate schedules as one pure multiplier of the step: constant, step, cosine,
one-cycle and warm-up-stable-decay.

All of them share a linear warmup and are implemented as a LambdaLR over a pure function of the
step, so the scheduler's whole state is the step counter: it checkpoints and resumes exactly.
The base learning rate is the peak: no schedule ever exceeds the lr the user set.
one-cycle warms up from lr/25 to lr and anneals by cosine to lr/1e4 (Smith's super-convergence
shape). wsd holds the peak after the warmup and decays linearly to zero over the last
`decay_fraction` of the steps (Hu et al., MiniCPM, 2024): most steps at the user's lr, and the
gain of an annealed end. Which one is the default is decided by benchmarks/schedules.py.
"""

from __future__ import annotations

import math

import torch

from ..config import ScheduleConfig

NAME = "schedule"
LOSSLESS = False
VARIANTS = ()
BENCH_NOTE = "changes the learning-rate path (what is learned), not the step speed"
ONECYCLE_START = 1 / 25
ONECYCLE_END = 1e-4
EVIDENCE = "benchmarks/schedules.py"  # where config.ScheduleConfig's default comes from


def lr_multiplier(step: int, cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int) -> float:
    """The factor applied to the base learning rate at optimizer step `step` (0-based)."""
    total_steps = max(total_steps, 1)
    warmup = int(cfg.warmup_fraction * total_steps)
    start = ONECYCLE_START if cfg.name == "onecycle" else 0.0
    if step < warmup:
        return start + (1 - start) * (step + 1) / warmup
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "wsd":
        decay = max(int(cfg.decay_fraction * total_steps), 1)
        return min(1.0, (total_steps - step) / decay)
    if cfg.name == "step":
        every = cfg.step_size or steps_per_epoch
        return cfg.gamma ** ((step - warmup) // max(every, 1))
    progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
    floor = ONECYCLE_END if cfg.name == "onecycle" else 0.0
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, cfg, total_steps, steps_per_epoch)
    )


def describe(cfg: ScheduleConfig) -> str:
    """The schedule in words, and whether it is the default (with the evidence for it)."""
    warmup = f"{cfg.warmup_fraction:.0%} linear warm-up" if cfg.warmup_fraction else "no warm-up"
    shape = {"constant": "then the peak lr throughout",
             "step": f"then x{cfg.gamma:g} every {cfg.step_size or 'epoch'}"
                     f"{' steps' if cfg.step_size else ''}",
             "cosine": "then cosine to zero",
             "onecycle": "from lr/25, then cosine to lr/1e4",
             "wsd": f"then the peak lr, linear decay to zero over the last "
                    f"{cfg.decay_fraction:.0%}"}[cfg.name]
    default = " (the default, from " + EVIDENCE + ")" if cfg == ScheduleConfig() else ""
    return f"{cfg.name}: {warmup}, {shape}{default}"
