"""TF32: run fp32 matmuls and convolutions on tensor cores with a 10-bit mantissa.

Ampere and newer NVIDIA GPUs run TF32 several times faster than true fp32; the inputs are
rounded to 10 mantissa bits, so results change slightly: lossy. Models already in bf16 or
fp16 gain little from it. Process-global in torch, so it is applied in a context that
restores the previous values on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..config import PlanConfig
from ..env import tf32_capable
from .base import Context, Outcome, switch
from .variant import Variant

NAME = "tf32"
LOSSLESS = False
VARIANTS = (Variant("tf32", {"plan": {"tf32": True}}, lossless=False),)


def check(ctx: Context, value: bool = True) -> tuple[bool, str]:
    if ctx.device.type != "cuda":
        return False, f"{NAME} is a CUDA setting; the device is {ctx.device.type}"
    if not tf32_capable(ctx.device):
        return False, "TF32 needs an Ampere or newer GPU (compute capability >= 8.0)"
    return True, "CUDA device"


def decide(ctx: Context, plan: PlanConfig) -> tuple[bool, Outcome]:
    """"auto" is on where the GPU has TF32 tensor cores."""
    return switch(NAME, plan.tf32, True, check(ctx))


@contextlib.contextmanager
def enabled(on: bool) -> Iterator[None]:
    """Set TF32 for matmuls and cuDNN for the duration of the block, then restore."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
