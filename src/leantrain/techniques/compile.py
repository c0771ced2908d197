"""torch.compile: trace the model into graphs and generate fused kernels (Inductor).

Fusing elementwise ops into their producers cuts memory traffic and Python overhead, which
pays off for models with many small ops and on GPUs. The first steps compile (tens of seconds,
more on few cores), so it only pays for runs long enough to amortise that; leantrain reports the
compile time apart from step time. Lossless up to float reassociation. "auto" (the default) is
eager by this rule and compiled where `run.compile_choice` measured it to pay.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import PlanConfig
from ..env import compiler_available
from .base import Context, Outcome, switch
from .compile_mode import torch_mode
from .variant import Variant

NAME = "compile"
LOSSLESS = True
VARIANTS = (Variant("compile", {"plan": {"compile": True}}),)


def check(ctx: Context, value: bool = True) -> tuple[bool, str]:
    if ctx.device.type == "mps":
        return False, "torch.compile on MPS is experimental in this torch"
    return compiler_available()


def decide(ctx: Context, plan: PlanConfig) -> tuple[bool, Outcome]:
    """The rule for "auto" is eager: whether compiling pays is measured (`run.defaults`)."""
    return switch(NAME, plan.compile, False, check(ctx))


def apply_compile(model: nn.Module, mode: str = "default") -> nn.Module:
    """Return a compiled wrapper in `mode` (`compile_mode.MODES`); the original module keeps
    the (shared) parameters."""
    return torch.compile(model, mode=torch_mode(mode))


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a torch.compile wrapper, so state_dict keys stay plain."""
    return getattr(model, "_orig_mod", model)
