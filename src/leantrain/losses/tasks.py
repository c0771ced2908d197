"""What a model is trained to do, inferred from its first batch: the task's loss and metric.

- classification: int labels (batch,), outputs (batch, classes); cross-entropy; accuracy.
- token-classification: int labels (batch, ...), outputs (batch, ..., classes); cross-entropy
  and accuracy per position.
- causal-lm: the input_ids (or labels) are the targets, outputs (batch, T, vocab); next-token
  cross-entropy and accuracy (position t predicts token t + 1).
- seq2seq: an encoder-decoder (`config.is_encoder_decoder`); labels (batch, T_target), outputs
  (batch, T_target, vocab), the decoder fed from the labels; cross-entropy and accuracy per
  target token (position t scores label t: the model shifted its decoder inputs itself).
- regression: float labels, one per output value; MSE; MAE.
- multi-label: float 0/1 labels (batch, labels), outputs (batch, labels); BCE with logits;
  per-label accuracy (reported as such: `METRIC_NAME`).
- model-loss: no labels; the `loss` the model returns; no metric.

Positions labelled -100 (`IGNORE_INDEX`, the Hugging Face convention) count in neither loss nor
metric. `train.task` overrides the inference. Sums stay on the device: no host sync per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LeantrainError

IGNORE_INDEX = -100
CLASS_TASKS = ("classification", "token-classification", "causal-lm", "seq2seq")
PER_TOKEN = ("causal-lm", "seq2seq")  # scored per token: a perplexity means something
TASKS = (*CLASS_TASKS, "regression", "multi-label", "model-loss")
METRIC = {"classification": "accuracy", "token-classification": "accuracy",
          "causal-lm": "accuracy", "seq2seq": "accuracy", "multi-label": "accuracy",
          "regression": "mae"}
# what the metric is, in words: the reports say so beside the figure
METRIC_NAME = {"classification": "accuracy", "token-classification": "accuracy per token",
               "causal-lm": "next-token accuracy", "seq2seq": "accuracy per target token",
               "multi-label": "per-label accuracy (share of sample-label pairs right)",
               "regression": "mean absolute error"}
LOSS_NAME = {"classification": "cross-entropy", "token-classification": "cross-entropy per token",
             "causal-lm": "next-token cross-entropy", "seq2seq": "cross-entropy per target token",
             "multi-label": "binary cross-entropy", "regression": "mean squared error"}


def is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face causal LM (its labels are its inputs, shifted inside the model)."""
    name = type(model).__name__
    return "CausalLM" in name or "LMHead" in name


def _shape(t) -> tuple:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else ()


def infer(logits: torch.Tensor | None, labels: torch.Tensor | None, model: nn.Module,
          has_input_ids: bool, own_loss: bool, encoder_decoder: bool = False) -> str:
    """The task for these outputs and labels (see the table above), or a one-line error."""
    if encoder_decoder:
        return _seq2seq(logits, labels)
    if logits is None:
        if own_loss:
            return "model-loss"
        raise LeantrainError("the model's output has neither logits nor a loss: return a "
                             "tensor, a tuple, or a dict/ModelOutput with 'logits' or 'loss'")
    if labels is None:
        if has_input_ids and logits.dim() == 3:
            return "causal-lm"
        if own_loss:
            return "model-loss"
        raise LeantrainError("the batch has no labels (no 'labels' key, no second element) and "
                             "the model returned no loss: nothing to train on")
    if not labels.is_floating_point():
        if is_causal_lm(model) and labels.shape == logits.shape[:-1] and labels.dim() == 2:
            return "causal-lm"
        if labels.dim() == 1 and logits.dim() == 2 and len(labels) == len(logits):
            return "classification"
        if logits.dim() >= 2 and labels.shape == logits.shape[:-1]:
            return "token-classification"
        raise LeantrainError(
            f"the model must return class scores of shape (batch, classes), or (batch, ..., "
            f"classes) for labels of shape (batch, ...); for labels of shape "
            f"{_shape(labels)} it returned {_shape(logits)}")
    binary = bool(((labels == 0) | (labels == 1)).all())
    if labels.shape == logits.shape and labels.dim() == 2 and labels.shape[1] > 1 and binary:
        return "multi-label"
    if labels.numel() == logits.numel():
        return "regression"
    raise LeantrainError(f"float labels of shape {_shape(labels)} need one output each (a "
                         f"regression) or one per label (multi-label); the model returned "
                         f"{_shape(logits)}")


def _seq2seq(logits: torch.Tensor | None, labels: torch.Tensor | None) -> str:
    if labels is None:
        raise LeantrainError("an encoder-decoder model needs labels in its batch (the target "
                             "token ids): its decoder inputs are built from them")
    if labels.is_floating_point() or logits is None or logits.dim() != 3 \
            or labels.shape != logits.shape[:-1]:
        raise LeantrainError(f"an encoder-decoder must return logits (batch, target length, "
                             f"vocab) for labels (batch, target length); for labels of shape "
                             f"{_shape(labels)} it returned {_shape(logits)}")
    return "seq2seq"


def zeros(task: str, device: torch.device) -> list[torch.Tensor]:
    """Running (loss sum, metric sum, count) on the device: exact integer counts, float error."""
    metric = torch.float32 if task == "regression" else torch.long
    return [torch.zeros((), device=device), torch.zeros((), device=device, dtype=metric),
            torch.zeros((), device=device, dtype=torch.long)]


def class_pairs(task: str, logits: torch.Tensor, labels: torch.Tensor):
    """(rows of class scores, one label per row): a row per sample, or per token (causal-lm:
    position t is scored against token t + 1)."""
    if task == "causal-lm":  # position t predicts token t + 1
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    return logits.flatten(0, -2), labels.flatten()


def best_class(scores: torch.Tensor) -> torch.Tensor:
    """argmax over the last dimension. Scores split over the classes across ranks (a
    DTensor: tensor parallel's logits under loss_parallel) are compared where they lie: each
    rank's best, then the best of those (the lowest class on a tie, as argmax), without
    gathering the vocabulary."""
    placements = getattr(scores, "placements", None)
    if placements is None:
        return scores.argmax(-1)
    if len(placements) != 1 or not placements[0].is_shard(scores.dim() - 1) and \
            not placements[0].is_shard(-1):
        return scores.full_tensor().argmax(-1)
    import torch.distributed as dist

    mesh = scores.device_mesh
    local = scores.to_local()
    width = -(-scores.shape[-1] // mesh.size())  # (torch.chunk's: the last share may be short)
    best, where = local.max(-1) if local.shape[-1] else (
        torch.full(local.shape[:-1], -torch.inf, dtype=local.dtype, device=local.device),
        torch.zeros(local.shape[:-1], dtype=torch.long, device=local.device))
    where = where + mesh.get_local_rank() * width
    bests = [torch.empty_like(best) for _ in range(mesh.size())]
    wheres = [torch.empty_like(where) for _ in range(mesh.size())]
    dist.all_gather(bests, best.contiguous(), group=mesh.get_group())
    dist.all_gather(wheres, where.contiguous(), group=mesh.get_group())
    rank = torch.stack(bests).argmax(0)  # (the first rank on a tie: the lower classes)
    return torch.stack(wheres).gather(0, rank.unsqueeze(0)).squeeze(0)


def loss(task: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The task's mean training loss."""
    if task in CLASS_TASKS:
        return F.cross_entropy(*class_pairs(task, logits, labels), ignore_index=IGNORE_INDEX)
    if task == "regression":
        return F.mse_loss(logits.reshape(labels.shape).float(), labels.float())
    if task == "multi-label":
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    raise LeantrainError(f"task {task!r} has no loss of its own: the model must return one")


def tally(task: str, logits: torch.Tensor | None, labels: torch.Tensor | None,
          batch_size: int) -> tuple[torch.Tensor | int, torch.Tensor | int]:
    """(metric sum, count) of a batch: correct predictions or absolute error, over the counted
    targets. Device tensors where there are labels (no sync)."""
    if task == "model-loss" or logits is None or labels is None:
        return 0, batch_size
    logits = logits.detach()
    if task in CLASS_TASKS:
        flat, target = class_pairs(task, logits, labels)
        kept = target != IGNORE_INDEX
        return ((best_class(flat) == target) & kept).sum(), kept.sum()
    if task == "regression":
        return (logits.reshape(labels.shape).float() - labels).abs().sum(), labels.numel()
    return ((logits > 0) == (labels > 0.5)).sum(), labels.numel()


def loss_sum(task: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The task's loss summed over the counted targets (evaluation: exact means over a set)."""
    logits = logits.detach().float()
    if task in CLASS_TASKS:
        return F.cross_entropy(*class_pairs(task, logits, labels), ignore_index=IGNORE_INDEX,
                               reduction="sum")
    if task == "regression":
        return F.mse_loss(logits.reshape(labels.shape), labels.float(), reduction="sum")
    return F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="sum")
