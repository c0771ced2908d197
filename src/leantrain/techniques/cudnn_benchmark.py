"""cuDNN benchmark: time the available convolution algorithms per input shape, keep the fastest.

A win for fixed shapes (most conv nets), a loss when shapes change every step (each new shape
is timed again). Lossless up to the choice of algorithm. The switch is process-global in torch,
so it is applied in a context that restores the previous value on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..config import PlanConfig
from .base import Context, Outcome, switch
from .variant import Variant

NAME = "cudnn_benchmark"
LOSSLESS = True
VARIANTS = (Variant("cudnn_benchmark", {"plan": {"cudnn_benchmark": True}}),)


def check(ctx: Context, value: bool = True) -> tuple[bool, str]:
    if ctx.device.type != "cuda":
        return False, f"{NAME} is a CUDA setting; the device is {ctx.device.type}"
    return True, "CUDA device"


def decide(ctx: Context, plan: PlanConfig) -> tuple[bool, Outcome]:
    """"auto" is on for CUDA devices (the trainer drops the short last batch under it)."""
    return switch(NAME, plan.cudnn_benchmark, True, check(ctx))


@contextlib.contextmanager
def enabled(on: bool) -> Iterator[None]:
    """Set the switch for the duration of the block, then restore what was there."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved
