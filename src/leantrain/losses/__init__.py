"""Training losses: the task loss the trainer uses by default, and knowledge distillation.

A loss is called as `loss_fn(outputs, targets, inputs, *extras)`, inside the plan's autocast;
extras are further per-sample tensors the batch carries (e.g. cached teacher logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy_loss(outputs: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor,
                       *extras: torch.Tensor) -> torch.Tensor:
    """The default training loss. A custom loss gets the same arguments (e.g. distillation).

    Outputs are (batch, ..., classes) with targets (batch, ...): one class per sample, or
    one per position of a sequence (a language model's next token).
    """
    return F.cross_entropy(outputs.flatten(0, -2), targets.flatten())


__all__ = ["cross_entropy_loss"]
