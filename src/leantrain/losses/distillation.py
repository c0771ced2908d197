"""Knowledge distillation (Hinton et al.): train a small student on a teacher's softened outputs.

loss = α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−α)·CE(s, y)

The temperature T > 1 spreads the teacher's probability mass over the wrong-but-similar classes
("dark knowledge"); T² keeps the soft term's gradients on the same scale as the hard term's when
T changes. The teacher runs frozen (eval mode, inference mode, no gradients, no optimizer state).
For unaugmented data its logits can be computed once and cached, which removes the teacher's
forward pass from every step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from ..data.loaders import tensors_of
from ..errors import LeantrainError
from . import tasks
from .outputs import read_output

# (T, alpha) when the user gives none, by the teacher's output: each the best setting of its
# benchmark's sweep (README, "Knowledge distillation"). They differ: T=4, alpha=0.9, the best
# of six settings on digits, made the byte GPT 0.3 bits/byte worse than no distillation.
PER_SAMPLE_DEFAULT = (4.0, 0.9)  # one score per sample: benchmarks/distill_digits.py
PER_TOKEN_DEFAULT = (1.0, 0.5)  # a score per token (language models): benchmarks/distill_gpt.py


def default_kd_args(task: str) -> tuple[float, float]:
    """The measured (temperature, alpha) for `task`'s outputs."""
    return PER_SAMPLE_DEFAULT if task == "classification" else PER_TOKEN_DEFAULT


def check_kd_args(temperature: float | None, alpha: float | None) -> None:
    """Reject a bad temperature or alpha; None (not given: the task's default) passes."""
    if temperature is not None and not 0 < temperature < math.inf:  # inf: a NaN loss at step 1
        raise LeantrainError(f"distillation temperature must be > 0 and finite, got "
                             f"{temperature!r}")
    if alpha is not None and not 0 <= alpha <= 1:
        raise LeantrainError(f"distillation alpha must be in [0, 1], got {alpha!r}")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            temperature: float = 4.0, alpha: float = 0.9, task: str = "classification"
            ) -> torch.Tensor:
    """α·T²·KL(teacher ‖ student) at temperature T, plus (1−α)·cross-entropy on the labels.

    The class dimension is the last one: a row of scores per sample for (batch, classes), per
    token for (batch, time, vocab). The KL is summed over classes and averaged over the rows
    the task loss counts: positions labelled -100 are left out of both terms, and for
    "causal-lm" position t is scored against token t + 1, exactly as the task's own loss.
    """
    check_kd_args(temperature, alpha)
    if student_logits.shape != teacher_logits.shape:
        raise LeantrainError(
            f"student output shape {tuple(student_logits.shape)} differs from the teacher's "
            f"{tuple(teacher_logits.shape)}; both must score the same classes"
        )
    s_rows, labels = tasks.class_pairs(task, student_logits.float(), targets)
    t_rows, _ = tasks.class_pairs(task, teacher_logits.float(), targets)
    kept = (labels != tasks.IGNORE_INDEX).float()
    log_s = F.log_softmax(s_rows / temperature, dim=-1)
    log_t = F.log_softmax(t_rows / temperature, dim=-1)
    per_row = (log_t.exp() * (log_t - log_s)).sum(dim=-1)
    # a mean over the kept rows without indexing by a mask (which would wait on the device)
    soft = (per_row * kept).sum() / kept.sum().clamp_min(1.0)
    hard = F.cross_entropy(s_rows, labels, ignore_index=tasks.IGNORE_INDEX)
    return alpha * temperature**2 * soft + (1 - alpha) * hard


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """Eval mode and no gradients: dropout off, BatchNorm statistics fixed, nothing to update."""
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def teacher_outputs(teacher: nn.Module, inputs: Any) -> torch.Tensor:
    """The teacher's logits as an ordinary tensor (inference mode inside, usable by autograd),
    for a tensor, a tuple or a dict batch (called as `teacher(**inputs)`), whatever the
    teacher returns (a tensor, a tuple, a ModelOutput)."""
    with torch.inference_mode():
        if isinstance(inputs, Mapping):
            out = teacher(**inputs)
        elif isinstance(inputs, (tuple, list)):
            out = teacher(*inputs)
        else:
            out = teacher(inputs)
        logits, _ = read_output(out)
    if logits is None:
        raise LeantrainError("the teacher returned no logits to distil from")
    return logits.clone()  # an inference tensor cannot be saved for the student's backward


class DistillationLoss:
    """A trainer loss: cached teacher logits when the batch carries them, else the live teacher;
    plus the feature-matching term when `features` pairs hidden states (`losses.features`).

    Called inside the trainer's autocast, so the live teacher runs in the plan's precision.
    The student's own auxiliary terms (a MoE's router balancing loss) stay in its objective:
    `keeps_auxiliary` has the step add them (`run.step.Step.auxiliary`).
    """

    keeps_auxiliary = True

    def __init__(self, teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.9,
                 task: str = "classification", features=None):
        check_kd_args(temperature, alpha)
        if task not in tasks.CLASS_TASKS:
            raise LeantrainError(f"distillation needs class scores (tasks "
                                 f"{', '.join(tasks.CLASS_TASKS)}); this task is {task}")
        self.teacher = freeze_teacher(teacher)
        self.temperature, self.alpha, self.task = temperature, alpha, task
        self.features = features  # a losses.features.FeatureMatch, or None

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor, inputs: Any,
                 *extras: torch.Tensor) -> torch.Tensor:
        # hidden states are never cached: with feature pairs the teacher runs every step
        live = self.features is not None or not extras
        logits = teacher_outputs(self.teacher, inputs) if live else extras[0]
        loss = kd_loss(outputs, logits, targets, self.temperature, self.alpha, self.task)
        return loss if self.features is None else loss + self.features.loss()


CACHE_LIMIT_BYTES = 2 * 2**30  # teacher logits held in memory at most (per-token ones grow fast)


def cache_teacher_logits(teacher: nn.Module, dataset: Dataset, batch_size: int = 512,
                         device: torch.device | str = "cpu", channels_last: bool = False,
                         limit_bytes: int = CACHE_LIMIT_BYTES) -> TensorDataset | None:
    """(inputs, labels, teacher logits) for a tensor-backed dataset, computed once in fp32;
    None when the logits would pass `limit_bytes` (a language model's per-token logits: the
    live teacher is used instead).

    Only valid for data without random augmentation: the cache holds one view per sample.
    """
    tensors = tensors_of(dataset)
    if tensors is None or isinstance(tensors, dict):
        raise LeantrainError("teacher logits can be cached only for datasets of (input, label) "
                             "tensors; use the live teacher for other data")
    x, y = tensors[0], tensors[1]
    teacher = freeze_teacher(teacher)
    chunks = []
    for i in range(0, len(x), batch_size):
        batch = x[i:i + batch_size].to(device)
        if channels_last and batch.dim() == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        chunks.append(teacher_outputs(teacher, batch).float().cpu())
        if i == 0 and chunks[0].element_size() * chunks[0][0].numel() * len(x) > limit_bytes:
            return None
    return TensorDataset(x, y, torch.cat(chunks))
