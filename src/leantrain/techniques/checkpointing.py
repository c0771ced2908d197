"""Activation checkpointing: keep only each block's input, recompute its inside in backward.

Trades compute for memory: a block's intermediate activations (attention scores, MLP
hidden states) are not stored for backward but recomputed from the block's input, so peak
activation memory falls to about one block's worth plus the block boundaries, at the cost of
one extra forward per block (roughly a third more step time). Lossless: the same loss and
gradients (the recomputation draws the same dropout masks: RNG state is replayed). Applies
to models whose repeated blocks sit in an `nn.ModuleList`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import PlanConfig
from .base import Context, Outcome, switch

NAME = "activation_checkpointing"
LOSSLESS = True
VARIANTS = ()
BENCH_NOTE = ("a memory technique (it costs speed): measured by its own test and the "
              "text-gpt benchmark, not ranked by bench")


_SUBCLASSES: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    """`cls` with a forward that runs under torch.utils.checkpoint while training.

    A subclass swapped in (rather than a wrapper module) keeps state_dict keys unchanged, so
    checkpoints load into the plain model, and deepcopy keeps working.
    """
    if cls not in _SUBCLASSES:
        def forward(self, *args):
            if self.training and torch.is_grad_enabled():
                return checkpoint(super(sub, self).forward, *args, use_reentrant=False)
            return super(sub, self).forward(*args)

        sub = type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward,
                                                            "checkpointed": True})
        _SUBCLASSES[cls] = sub
    return _SUBCLASSES[cls]


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    return [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]


def check(ctx: Context, value: bool = True) -> tuple[bool, str]:
    lists = block_lists(ctx.model)
    if not lists:
        return False, "the model has no nn.ModuleList of repeated blocks to checkpoint"
    return True, f"{sum(len(b) for b in lists)} blocks recomputed in backward"


def decide(ctx: Context, plan: PlanConfig) -> tuple[bool, Outcome]:
    """Opt-in: it buys memory with speed, which only the user can weigh."""
    return switch(NAME, plan.activation_checkpointing, False, check(ctx))


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Checkpoint every entry of every block list, in place."""
    for blocks in block_lists(model):
        for block in blocks:
            if not getattr(block, "checkpointed", False):
                block.__class__ = _checkpointed_class(type(block))
    return model


@contextmanager
def recompute_paused(model: nn.Module) -> Iterator[None]:
    """Checkpointed blocks run plainly inside: counting FLOPs for MFU wants the model's FLOPs,
    not the recomputation's (counting those too would be hardware FLOPs utilization)."""
    swapped = [m for m in model.modules() if getattr(m, "checkpointed", False)]
    for m in swapped:
        m.__class__ = type(m).__mro__[1]
    try:
        yield
    finally:
        for m in swapped:
            m.__class__ = _checkpointed_class(type(m))
