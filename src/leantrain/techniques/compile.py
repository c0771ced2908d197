"""torch.compile: trace the model into graphs and generate fused kernels (Inductor).

Fusing elementwise ops into their producers cuts memory traffic and Python overhead, which
pays off for models with many small ops and on GPUs. The first steps compile (tens of seconds,
more on few cores), so it only pays for runs long enough to amortise that; leantrain reports the
compile time apart from step time. Lossless up to float reassociation. "auto" (the default) is
eager by this rule and compiled where `run.compile_choice` measured it to pay.
"""

from __future__ import annotations

import types
from collections import Counter

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


def repeated(blocks: list[nn.Module]) -> list[nn.Module]:
    """The blocks whose class occurs more than once (a transformer's layers): compiling those
    pays once for all of them; an embedding or a head alone is left eager, as torchtitan
    leaves them."""
    counts = Counter(type(block) for block in blocks)
    return [block for block in blocks if counts[type(block)] > 1]


def compile_blocks(blocks: list[nn.Module], mode: str = "default") -> None:
    """Compile each block in place, as torchtitan does under FSDP2: FSDP2's hooks (all-gather
    before a block, reduce-scatter after) run eagerly between the blocks' graphs, where one
    graph of the whole model would break at every hook. Blocks of one class share their
    compiled forward (one per class, the block passed as `self`), so a model of 24 blocks
    compiles about once. (The forward is compiled, not the module: `nn.Module.compile` traced
    nothing in torch 2.13, and a `torch.compile` wrapper would rename every parameter.)"""
    compiled: dict[type, object] = {}
    for block in blocks:
        cls = type(block)
        if cls not in compiled:
            compiled[cls] = torch.compile(cls.forward, mode=torch_mode(mode))
        block.forward = types.MethodType(compiled[cls], block)


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a torch.compile wrapper, so state_dict keys stay plain."""
    return getattr(model, "_orig_mod", model)
