"""cuDNN benchmark and TF32: two global backend switches for NVIDIA GPUs.

cudnn.benchmark times the available convolution algorithms for each new input shape and keeps
the fastest: a win for fixed shapes, a loss when shapes change every step. TF32 runs fp32
matmuls and convolutions on tensor cores with a 10-bit mantissa (Ampere and newer): much faster
fp32 math, slightly less precise, hence lossy. Both are process-global in torch, so they are
applied in a context that restores the previous values on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..env import tf32_capable
from .variant import Variant

NAME = "backend_flags"
LOSSLESS = False  # TF32 changes fp32 results; benchmark alone is lossless up to algorithm choice
VARIANTS = (
    Variant("cudnn_benchmark", {"plan": {"cudnn_benchmark": True}}),
    Variant("tf32", {"plan": {"tf32": True}}, lossless=False),
)


def supported(device: torch.device, flag: str) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, f"{flag} is a CUDA setting; the device is {device.type}"
    if flag == "tf32" and not tf32_capable(device):
        return False, "TF32 needs an Ampere or newer GPU (compute capability >= 8.0)"
    return True, "CUDA device"


@contextlib.contextmanager
def backend_flags(cudnn_benchmark: bool, tf32: bool) -> Iterator[None]:
    """Set the flags for the duration of the block, then restore what was there."""
    saved = (
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        (
            torch.backends.cudnn.benchmark,
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
        ) = saved
