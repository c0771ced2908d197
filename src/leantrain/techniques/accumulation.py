"""Gradient accumulation: sum gradients of k micro-batches, then take one optimizer step.

Trains with an effective batch of k × batch_size while holding only one micro-batch of
activations, so a large batch fits in a small memory. Each micro-batch loss is divided by k so
the summed gradient equals the large batch's mean gradient: lossless for models without
batch-statistics layers (BatchNorm sees micro-batches). Costs k forward/backward passes per
step, so it buys memory, not speed.
"""

from __future__ import annotations

import torch

NAME = "grad_accum"
LOSSLESS = True
VARIANTS = ()
BENCH_NOTE = "buys memory, not speed (k passes per step); not a speed-up to rank"


def supported(device: torch.device) -> tuple[bool, str]:
    return True, "works on every device"


def scale_loss(loss: torch.Tensor, accum: int) -> torch.Tensor:
    """The micro-batch loss to backpropagate so that k of them sum to the mean."""
    return loss / accum if accum > 1 else loss


def is_step_boundary(micro_index: int, accum: int, last_in_epoch: bool) -> bool:
    """Step after every k-th micro-batch, and at the end of an epoch (a short last group)."""
    return (micro_index + 1) % accum == 0 or last_in_epoch
