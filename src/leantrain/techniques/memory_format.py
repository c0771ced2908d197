"""channels_last: store 4-D activations and conv weights as NHWC instead of NCHW.

oneDNN (CPU) and cuDNN (tensor cores) have their fastest convolution kernels for NHWC, so a
conv net avoids layout conversions inside every conv. Lossless (same math, different memory
order; results agree to float rounding). Does nothing useful for models without 2-D convs, and
can hurt where a model reshapes activations in ways that force copies back to NCHW.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import PlanConfig
from .base import Context, Outcome, switch
from .variant import Variant

NAME = "channels_last"
LOSSLESS = True
VARIANTS = (Variant("channels_last", {"plan": {"channels_last": True}}),)


def has_conv2d(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def check(ctx: Context, value: bool = True) -> tuple[bool, str]:
    if ctx.sharded:
        return False, ("FSDP2 shards contiguous parameters only, and channels_last weights are "
                       "not contiguous")
    if not has_conv2d(ctx.model):
        return False, "the model has no 2-D convolutions; NHWC cannot help it"
    return True, "model has 2-D convolutions"


def decide(ctx: Context, plan: PlanConfig) -> tuple[bool, Outcome]:
    """"auto" is on for models with 2-D convolutions."""
    return switch(NAME, plan.channels_last, True, check(ctx))


def apply_channels_last(model: nn.Module) -> nn.Module:
    """Convert the model's 4-D parameters and buffers to channels_last, in place."""
    return model.to(memory_format=torch.channels_last)


def to_channels_last(batch: torch.Tensor) -> torch.Tensor:
    """Convert a 4-D input batch; other ranks pass through unchanged."""
    if batch.dim() == 4:
        return batch.contiguous(memory_format=torch.channels_last)
    return batch


def switch_layout(model: nn.Module, optimizer: torch.optim.Optimizer, on: bool) -> None:
    """Move a model being trained to channels_last (`on`) or back, in place, mid-run: the same
    parameters (the optimizer keeps them), and their optimizer states follow their layout, or
    each step's foreach kernels would fall back to a tensor-by-tensor loop."""
    model.to(memory_format=torch.channels_last if on else torch.contiguous_format)
    for param, state in optimizer.state.items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape \
                    and value.stride() != param.stride():
                state[name] = torch.empty_like(param).copy_(value)
