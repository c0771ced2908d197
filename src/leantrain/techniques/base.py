"""The technique contract: what the plan asks of every technique it decides.

A planned technique is a module with:

- `NAME` (its key under `plan.` and in the summary), `LOSSLESS`, a docstring saying what it
  does, when it helps and when it hurts, and `VARIANTS` (how the bench switches it on);
- `check(ctx, value) -> (ok, reason)`: can `value` run here, given one `Context`;
- `decide(ctx, plan) -> (value, Outcome)`: the value for the plan's setting ("auto" is decided
  here, by the technique's own rule), or a `LeantrainError` when an explicit request cannot run;
- a function that applies it to plain objects, usable without the trainer.

`run.plan` iterates the registry over this contract, so a new technique is one module and one
registry line.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LeantrainError

Check = tuple[bool, str]


@dataclass(frozen=True)
class Context:
    """Everything a technique's check may look at."""

    device: torch.device
    model: nn.Module
    optimizer: str | None = None  # optim.name: which fused kernels exist
    strategy: str | None = None  # "ddp" | "fsdp" under `leantrain launch`, else None
    processes: int = 1
    tokens_per_batch: int | None = None  # one micro-batch's tokens (language models)
    clip_norm: float | None = None  # train.clip_norm: what runs between backward and step

    @property
    def sharded(self) -> bool:
        """FSDP2's DTensor parameters narrow what can run."""
        return self.strategy == "fsdp"


@dataclass(frozen=True)
class Outcome:
    name: str
    applied: bool
    detail: str

    def describe(self) -> str:
        return f"applied: {self.detail}" if self.applied else f"not applied: {self.detail}"


def switch(name: str, setting: str | bool, auto_on: bool, check: Check) -> tuple[bool, Outcome]:
    """Decide an on/off technique: True must be supported; "auto" is on where supported and
    `auto_on` (the technique's rule) says so."""
    ok, reason = check
    if setting is True and not ok:
        raise LeantrainError(f"plan.{name}: cannot be applied here: {reason}")
    on = ok and auto_on if setting == "auto" else bool(setting)
    if on:
        return True, Outcome(name, True, reason)
    if not ok:
        return False, Outcome(name, False, reason)
    return False, Outcome(name, False, "off by its rule for auto" if setting == "auto"
                          else "switched off in the plan")


def require(name: str, value: str, check: Check) -> str:
    """An explicit (non-switch) value that must run here; returns the reason it can."""
    ok, reason = check
    if not ok:
        raise LeantrainError(f"plan.{name} {value!r}: cannot be applied here: {reason}")
    return reason
