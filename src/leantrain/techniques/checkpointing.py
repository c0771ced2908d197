"""Activation checkpointing: keep only each block's input, recompute its inside in backward.

Trades compute for memory: a block's intermediate activations (attention scores, MLP
hidden states) are not stored for backward but recomputed from the block's input, so peak
activation memory falls to about one block's worth plus the block boundaries, at the cost of
one extra forward per block (roughly a third more step time). Lossless: the same loss and
gradients (the recomputation draws the same dropout masks: RNG state is replayed). Applies
to models whose repeated blocks sit in an `nn.ModuleList` (keyword arguments pass through),
and to Hugging Face models through their own `gradient_checkpointing_enable`.
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
        def forward(self, *args, **kwargs):
            if self.training and torch.is_grad_enabled():
                return checkpoint(super(sub, self).forward, *args, use_reentrant=False,
                                  **kwargs)
            return super(sub, self).forward(*args, **kwargs)

        sub = type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward,
                                                            "checkpointed": True})
        _SUBCLASSES[cls] = sub
    return _SUBCLASSES[cls]


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    return [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]


def own_checkpointing(model: nn.Module) -> bool:
    """A Hugging Face model that checkpoints its own layers (it knows their arguments)."""
    return bool(getattr(model, "supports_gradient_checkpointing", False)) and \
        hasattr(model, "gradient_checkpointing_enable")


def _own(model: nn.Module, action: str):
    """The model's own switch: `activation_checkpointing_*` (transformers 5) or the older
    `gradient_checkpointing_*` name."""
    return getattr(model, f"activation_checkpointing_{action}", None) or \
        getattr(model, f"gradient_checkpointing_{action}")


def _enable_own(model: nn.Module) -> None:
    enable = _own(model, "enable")
    kwargs = {"use_reentrant": False}  # the reentrant variant drops keyword-only inputs
    if enable.__name__.startswith("activation"):
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        enable(gradient_checkpointing_kwargs=kwargs)


def users_checkpointing(model: nn.Module) -> bool:
    """The model already checkpoints its layers: the user turned on its own gradient
    checkpointing (a Hugging Face module's `gradient_checkpointing` flag), or a plan did."""
    return any(getattr(m, "gradient_checkpointing", False) is True
               or getattr(m, "checkpointed", False) for m in model.modules())


def check(ctx: Context, value: bool = True) -> tuple[bool, str]:
    if own_checkpointing(ctx.model):
        return True, f"the model's own {_own(ctx.model, 'enable').__name__}() (Hugging Face)"
    lists = block_lists(ctx.model)
    if not lists:
        return False, "the model has no nn.ModuleList of repeated blocks to checkpoint"
    return True, f"{sum(len(b) for b in lists)} blocks recomputed in backward"


def decide(ctx: Context, plan: PlanConfig) -> tuple[bool, Outcome]:
    """Opt-in: it buys memory with speed, which only the user can weigh. A model that already
    checkpoints (the user's own setting) keeps it exactly as it is, whatever the plan says:
    its variant (`use_reentrant`) and layers are the user's."""
    if users_checkpointing(ctx.model):
        return False, Outcome(NAME, True, "the model's own, as you set it (kept unchanged: "
                                          "leantrain neither re-applies nor turns it off)")
    return switch(NAME, plan.activation_checkpointing, False, check(ctx))


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Checkpoint every entry of every block list, in place (or the model's own way)."""
    if own_checkpointing(model):
        _enable_own(model)
        return model
    for blocks in block_lists(model):
        for block in blocks:
            if not getattr(block, "checkpointed", False):
                block.__class__ = _checkpointed_class(type(block))
    return model


@contextmanager
def recompute_paused(model: nn.Module) -> Iterator[None]:
    """Checkpointed blocks run plainly inside: counting FLOPs for MFU wants the model's FLOPs,
    not the recomputation's (counting those too would be hardware FLOPs utilization).

    A Hugging Face model's layers are paused by their own flags and the flags put back, so
    the checkpoint function the user chose (`use_reentrant=True`) is never replaced: disabling
    and re-enabling through the model's API had turned it into `use_reentrant=False`."""
    flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in flagged:
        m.gradient_checkpointing = False
    swapped = [m for m in model.modules() if getattr(m, "checkpointed", False)]
    for m in swapped:
        m.__class__ = type(m).__mro__[1]
    try:
        yield
    finally:
        for m in swapped:
            m.__class__ = _checkpointed_class(type(m))
        for m in flagged:
            m.gradient_checkpointing = True
