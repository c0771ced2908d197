"""Gradient clipping by global norm.

Rescales all gradients when their joint L2 norm exceeds `max_norm`, which keeps one bad batch
from throwing the weights far off (common with high learning rates, transformers, fp16).
Changes the update only when the norm is above the threshold; costs one reduction per step.
With a GradScaler the gradients are unscaled first, or the threshold would be meaningless.
"""

from __future__ import annotations

import torch
from torch import nn

NAME = "clip_norm"
LOSSLESS = False
VARIANTS = ()
BENCH_NOTE = "a stability aid that costs a reduction per step; not a speed-up to rank"


def clip_gradients(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    max_norm: float,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """Clip in place; returns the pre-clip total norm as a device tensor (no host sync)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    return nn.utils.clip_grad_norm_(model.parameters(), max_norm)
