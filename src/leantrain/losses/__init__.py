"""Training losses: the task losses the trainer infers (`tasks`), and knowledge distillation.

A custom loss is called as `loss_fn(outputs, labels, inputs, *extras)` inside the plan's
autocast: `outputs` are the model's logits (read from a tensor, tuple, dict or ModelOutput),
`inputs` what the model was called with (a tensor or the batch's dict), extras further
per-sample tensors the batch carries (e.g. cached teacher logits).
"""

from __future__ import annotations

import torch

from . import tasks


def cross_entropy_loss(outputs: torch.Tensor, targets: torch.Tensor, inputs=None,
                       *extras: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over (batch, ..., classes) outputs and (batch, ...) targets, positions
    labelled -100 ignored: one class per sample, or one per position of a sequence."""
    return tasks.loss("token-classification", outputs, targets)


__all__ = ["cross_entropy_loss", "tasks"]
