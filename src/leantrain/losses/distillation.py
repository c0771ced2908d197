"""Knowledge distillation (Hinton et al.): train a small student on a teacher's softened outputs.

loss = α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−α)·CE(s, y)

The temperature T > 1 spreads the teacher's probability mass over the wrong-but-similar classes
("dark knowledge"); T² keeps the soft term's gradients on the same scale as the hard term's when
T changes. The teacher runs frozen (eval mode, inference mode, no gradients, no optimizer state).
For unaugmented data its logits can be computed once and cached, which removes the teacher's
forward pass from every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from ..data.loaders import tensors_of
from ..errors import LeantrainError


def check_kd_args(temperature: float, alpha: float) -> None:
    if not temperature > 0:
        raise LeantrainError(f"distillation temperature must be > 0, got {temperature!r}")
    if not 0 <= alpha <= 1:
        raise LeantrainError(f"distillation alpha must be in [0, 1], got {alpha!r}")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            temperature: float = 4.0, alpha: float = 0.9) -> torch.Tensor:
    """α·T²·KL(teacher ‖ student) at temperature T, plus (1−α)·cross-entropy on the labels."""
    check_kd_args(temperature, alpha)
    if student_logits.shape != teacher_logits.shape:
        raise LeantrainError(
            f"student output shape {tuple(student_logits.shape)} differs from the teacher's "
            f"{tuple(teacher_logits.shape)}; both must score the same classes"
        )
    s, t = student_logits.float(), teacher_logits.float()
    soft = F.kl_div(F.log_softmax(s / temperature, dim=1), F.log_softmax(t / temperature, dim=1),
                    reduction="batchmean", log_target=True)
    hard = F.cross_entropy(s, targets)
    return alpha * temperature**2 * soft + (1 - alpha) * hard


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """Eval mode and no gradients: dropout off, BatchNorm statistics fixed, nothing to update."""
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def teacher_outputs(teacher: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The teacher's logits as an ordinary tensor (inference mode inside, usable by autograd)."""
    with torch.inference_mode():
        logits = teacher(inputs)
    return logits.clone()  # an inference tensor cannot be saved for the student's backward


class DistillationLoss:
    """A trainer loss: cached teacher logits when the batch carries them, else the live teacher.

    Called inside the trainer's autocast, so the live teacher runs in the plan's precision.
    """

    def __init__(self, teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.9):
        check_kd_args(temperature, alpha)
        self.teacher = freeze_teacher(teacher)
        self.temperature, self.alpha = temperature, alpha

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor,
                 *extras: torch.Tensor) -> torch.Tensor:
        logits = extras[0] if extras else teacher_outputs(self.teacher, inputs)
        return kd_loss(outputs, logits, targets, self.temperature, self.alpha)


def cache_teacher_logits(teacher: nn.Module, dataset: Dataset, batch_size: int = 512,
                         device: torch.device | str = "cpu",
                         channels_last: bool = False) -> TensorDataset:
    """(inputs, labels, teacher logits) for a tensor-backed dataset, computed once in fp32.

    Only valid for data without random augmentation: the cache holds one view per sample.
    """
    tensors = tensors_of(dataset)
    if tensors is None:
        raise LeantrainError("teacher logits can be cached only for tensor-backed datasets; "
                             "use the live teacher for other data")
    x, y = tensors[0], tensors[1]
    teacher = freeze_teacher(teacher)
    chunks = []
    for i in range(0, len(x), batch_size):
        batch = x[i:i + batch_size].to(device)
        if channels_last and batch.dim() == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        chunks.append(teacher_outputs(teacher, batch).float().cpu())
    return TensorDataset(x, y, torch.cat(chunks))
