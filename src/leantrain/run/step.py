"""The pieces of one training step, shared by the loop, the plan's checks and evaluation.

A batch is `(inputs, labels, *extras)`; it moves to the plan's device (and layout), the model
runs under the plan's autocast, and the loss takes `(outputs, labels, inputs, *extras)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..data.loaders import tensors_of
from ..errors import LeantrainError
from ..techniques.memory_format import to_channels_last

Batch = tuple[torch.Tensor, ...]


def to_device(batch: Batch, plan) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(inputs, labels, extras) on the plan's device; inputs in its memory format."""
    x, y = (t.to(plan.device, non_blocking=True) for t in batch[:2])
    x = to_channels_last(x) if plan.channels_last else x
    return x, y, [t.to(plan.device, non_blocking=True) for t in batch[2:]]


def forward_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, extras: list[torch.Tensor],
                 plan, loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
    with plan.autocast():
        out = model(x)
        return out, loss_fn(out, y, x, *extras)


def probe(model: nn.Module, batch: Batch, plan, loss_fn) -> None:
    """Forward and backward without a step: what measuring the loader and FLOPs runs."""
    x, y, extras = to_device(batch, plan)
    forward_loss(model, x, y, extras, plan, loss_fn)[1].backward()


def correct(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Correct predictions of a batch (one per sample or per sequence position), on the device."""
    return (out.detach().flatten(0, -2).argmax(-1) == y.flatten()).sum()


def score(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(summed cross-entropy, correct predictions, targets) of a batch, on the device."""
    loss = F.cross_entropy(out.detach().float().flatten(0, -2), y.flatten(), reduction="sum")
    return loss, correct(out, y), y.numel()


@torch.no_grad()
def evaluate(model: nn.Module, loader, plan) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over the loader, with one host sync at the end."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=plan.device)
    hits = torch.zeros((), device=plan.device, dtype=torch.long)
    count = 0
    for batch in loader.batches():
        x, y, _ = to_device(batch, plan)
        with plan.autocast():
            out = model(x)
        batch_loss, batch_correct, batch_count = score(out, y)
        loss_sum += batch_loss
        hits += batch_correct
        count += batch_count
    model.train(was_training)
    return hits.item() / count, loss_sum.item() / count


def check_model_fits_data(model: nn.Module, train_data: Dataset, loader, plan) -> int:
    """Run one batch before anything is written, so bad shapes or labels fail fast and clean.

    Returns the number of classes (the model's output width).
    """
    x, y, _ = to_device(next(iter(loader.batches())), plan)
    was_training = model.training
    model.eval()  # eval + no_grad: BatchNorm statistics and weights stay untouched
    try:
        with torch.no_grad(), plan.autocast():
            out = model(x)
    except Exception as exc:
        raise LeantrainError(
            f"the model cannot run on the data: input batch of shape {tuple(x.shape)} "
            f"failed with {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        model.train(was_training)
    if out.dim() < 2 or out.shape[:-1] != y.shape:
        raise LeantrainError(
            f"the model must return class scores of shape (batch, classes), or (batch, ..., "
            f"classes) for labels of shape (batch, ...); for an input of shape "
            f"{tuple(x.shape)} and labels of shape {tuple(y.shape)} it returned "
            f"{tuple(out.shape)}"
        )
    num_classes = out.shape[-1]
    tensors = tensors_of(train_data)
    labels = tensors[1] if tensors is not None else y
    if labels.is_floating_point() or labels.dim() != out.dim() - 1:
        raise LeantrainError(f"labels must be an integer tensor with one label per output "
                             f"row, got {labels.dtype} of shape {tuple(labels.shape)}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise LeantrainError(
            f"labels out of range: found {low}..{high}, but the model outputs {num_classes} "
            f"classes (labels must be in 0..{num_classes - 1})"
        )
    return num_classes
