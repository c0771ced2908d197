"""The step contract: how any batch reaches any model, and how any output becomes a loss.

A batch is a tensor, a tuple/list, a dict, or nested ones; it moves to the device recursively
(4-D floating-point tensors into the plan's memory format). The model is called the way the
batch says:

- `(inputs, labels, *extras)`: `model(inputs)`, `model(*inputs)` for a tuple, `model(**inputs)`
  for a dict (with `labels=` when `forward` takes it);
- a dict: `model(**batch)`, its `labels` (or `label`) key passed as `labels=` when `forward`
  takes it, and every other key checked against `forward`'s parameters;
- a tensor: `model(batch)` (the model must then return its own loss).

A causal LM's batch without labels learns its `input_ids`, every position its
`attention_mask` excludes (or, with no mask, the config's pad token) set to -100: padding is
never a target. An encoder-decoder (`config.is_encoder_decoder`) is always called with its
labels, in training, evaluation and under a custom loss alike: it builds its decoder inputs
from them (task `seq2seq`, scored per target token).

The output may be a tensor, a tuple, a dict or a `ModelOutput`: its `logits` are what a custom
loss and the metrics see, its `loss` is used unless the user gives one, else the task's loss
(`losses.tasks`, inferred from the first batch by `check_first_batch`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..data.batching import first_batch
from ..data.loaders import LABEL_KEYS, batch_size, labels_of
from ..errors import LeantrainError, bounded_repr, first_line, one_line, shorten
from ..losses import tasks
from ..losses.outputs import loss_terms, read_output
from ..losses.tasks import IGNORE_INDEX
from ..measure.probe import EVAL_SEED, random_states, seeded, untouched
from ..techniques.memory_format import to_channels_last
from . import recovery

log = logging.getLogger(__name__)


def to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    """The batch with every tensor on `device` (non-blocking: overlaps from pinned memory)."""
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        return to_channels_last(batch) if channels_last and batch.is_floating_point() else batch
    if isinstance(batch, Mapping):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device, channels_last) for v in batch)
    return batch


def plain_module(model: nn.Module) -> nn.Module:
    """The user's module under the run's wrappers: DDP's, then torch.compile's."""
    module = getattr(model, "module", model)  # DDP
    return getattr(module, "_orig_mod", module)  # torch.compile


def _unwrapped(model: nn.Module) -> nn.Module:
    module = plain_module(model)
    base = getattr(module, "get_base_model", None)  # PEFT: forward(*args, **kwargs) passes
    return base() if callable(base) else module  # every keyword to the model it adapts


def forward_keys(model: nn.Module) -> tuple[frozenset[str] | None, bool]:
    """(the keyword names `forward` takes, or None if it takes anything; whether it takes
    `labels`). A **kwargs catch-all does not count: a key it would swallow is an error."""
    module = _unwrapped(model)
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return None, False
    names = frozenset(p.name for p in params
                      if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return names, "labels" in names


@dataclass
class StepBatch:
    """One batch as the model is called with it."""

    args: tuple
    kwargs: dict[str, Any]
    labels: torch.Tensor | None
    extras: list[torch.Tensor]
    inputs: Any  # what a custom loss receives as `inputs`
    size: int


@dataclass(frozen=True)
class Step:
    """How this run's batches reach its model and become a loss; built once by `run.plan`."""

    device: torch.device
    channels_last: bool
    autocast: Callable[[], Any]
    task: str = "auto"
    loss_fn: Callable[..., torch.Tensor] | None = None
    keys: frozenset[str] | None = None
    takes_labels: bool = False
    pass_labels: bool = True  # False when a custom loss makes the model's moot
    encoder_decoder: bool = False  # called with its labels always: its decoder reads them
    pad_token_id: int | None = None  # the config's, when it is no end-of-text token too
    own_loss: bool = False  # the model returned a loss of its own on the first batch
    loss_terms: tuple[str, ...] = ()  # ... as named terms, no `loss`: trained on their sum
    # terms the model returns beside its `loss` (a MoE's router `aux_loss`): that loss holds
    # them, so validation also reports the task's loss alone, and perplexity comes from it
    aux_terms: tuple[str, ...] = ()
    keeps_auxiliary: bool = False  # a custom loss (KD) that adds the model's auxiliary part
    draws_random: bool = False  # the forward draws random numbers in eval mode: seeded

    @property
    def loss_source(self) -> str:
        """What the training and validation losses measure, in words (the summary says it)."""
        task_loss = f"the task's {tasks.LOSS_NAME.get(self.task, 'loss')}"
        if self.loss_fn is not None:
            kept = f" plus the model's auxiliary {', '.join(self.aux_terms)}" \
                if self.keeps_auxiliary and self.aux_terms else ""
            return f"your loss_fn{kept} in training; validation: {task_loss}"
        if self.loss_terms:
            return (f"the sum of the model's loss terms ({', '.join(self.loss_terms)}; it "
                    "returns no 'loss'), in training and validation")
        if self.own_loss or self.task == "model-loss":
            aux = (f" (with its auxiliary {', '.join(self.aux_terms)}; validation also reports "
                   f"{task_loss} alone)") if self.aux_terms else ""
            return f"the model's own loss{aux}, in training and validation"
        return f"{task_loss}, in training and validation"

    def unpack(self, raw: Any) -> StepBatch:
        batch = to_device(raw, self.device, self.channels_last)
        if isinstance(batch, Mapping):
            labels = labels_of(batch)
            inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
            return self._keyword(inputs, labels, [], batch_size(raw))
        if isinstance(batch, torch.Tensor):
            return StepBatch((batch,), {}, None, [], batch, len(batch) if batch.dim() else 1)
        x, labels, extras = batch[0], batch[1] if len(batch) > 1 else None, list(batch[2:])
        if isinstance(x, Mapping):
            return self._keyword(dict(x), labels, extras, batch_size(raw))
        args = tuple(x) if isinstance(x, Sequence) and not isinstance(x, torch.Tensor) else (x,)
        return StepBatch(args, {}, labels, extras, x, batch_size(raw))

    def _keyword(self, inputs: dict, labels, extras: list, size: int) -> StepBatch:
        if self.keys is not None:
            unknown = sorted(set(inputs) - self.keys)
            if unknown:
                raise LeantrainError(
                    f"batch key {unknown[0]!r} is not a parameter of the model's forward; it "
                    f"takes: {', '.join(sorted(self.keys))} (drop the key in the dataset or "
                    f"collate_fn)")
        if labels is None and self.task == "causal-lm" and "input_ids" in inputs:
            labels = lm_targets(inputs, self.pad_token_id)
        kwargs = dict(inputs)
        if labels is not None and self.takes_labels and (self.pass_labels
                                                         or self.encoder_decoder):
            kwargs["labels"] = labels
        # a custom loss (distillation's teacher) sees what the model was called with: an
        # encoder-decoder's labels too, or its decoder would be built from another input
        shown = kwargs if self.encoder_decoder else inputs
        return StepBatch((), kwargs, labels, extras, shown, size)

    def forward(self, model: nn.Module, sb: StepBatch
                ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(logits, the loss to train on, the model's own loss) under the plan's autocast."""
        with self.autocast():
            return self.loss_of(model(*sb.args, **sb.kwargs), sb)

    def loss_of(self, out: Any, sb: StepBatch
                ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(logits, the loss to train on, the model's own loss) of the model's output `out`:
        the custom loss, else the model's own, else the task's."""
        logits, own = read_output(out)
        if self.loss_fn is not None:  # the logits, or what the model returned when it has none
            shown = logits if logits is not None else out
            loss = self.loss_fn(shown, sb.labels, sb.inputs, *sb.extras)
            if self.keeps_auxiliary and self.aux_terms and own is not None:
                loss = loss + self.auxiliary(own, logits, sb)  # (KD keeps the router's balance)
            return logits, loss, own
        if own is not None:
            return logits, own, own
        return logits, tasks.loss(self.task, logits, sb.labels), None

    def auxiliary(self, own: torch.Tensor, logits: torch.Tensor, sb: StepBatch) -> torch.Tensor:
        """The part of the model's own loss that is not the task's: its auxiliary terms as the
        model weighs them (Mixtral: router_aux_loss_coef x aux_loss)."""
        return own - tasks.loss(self.task, logits, sb.labels)

    def probe(self, model: nn.Module, raw: Any) -> None:
        """Forward and backward without a step: what measuring the loader and FLOPs runs."""
        self.forward(model, self.unpack(raw))[1].backward()


def lm_targets(inputs: Mapping[str, Any], pad_token_id: int | None) -> torch.Tensor:
    """A causal LM's targets when its batch has none: its `input_ids`, with every position
    the `attention_mask` excludes (or, without a mask, each `pad_token_id`) set to -100, so no
    loss or metric counts padding."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape == ids.shape:
        return ids.masked_fill(mask == 0, IGNORE_INDEX)
    if pad_token_id is not None:
        return ids.masked_fill(ids == pad_token_id, IGNORE_INDEX)
    return ids


def step_for(model: nn.Module, plan, task: str = "auto", loss_fn=None) -> Step:
    keys, takes_labels = forward_keys(model)
    config = getattr(_unwrapped(model), "config", None)
    pad = getattr(config, "pad_token_id", None)
    ends = getattr(config, "eos_token_id", None)
    if pad is not None and (pad == ends or (isinstance(ends, list) and pad in ends)):
        pad = None  # a pad token that is also end-of-text: the mask must say which is which
    return Step(plan.device, plan.channels_last, plan.autocast, task, loss_fn, keys,
                takes_labels, pass_labels=loss_fn is None,
                keeps_auxiliary=bool(getattr(loss_fn, "keeps_auxiliary", False)),
                encoder_decoder=bool(getattr(config, "is_encoder_decoder", False)),
                pad_token_id=pad if isinstance(pad, int) else None)


@torch.no_grad()
def metrics(model: nn.Module, loader, step: Step) -> dict[str, float | None]:
    """Loss and the task's metric over the loader, with one host sync at the end.

    The loss is the one training reports: the model's own when it returns one (averaged over
    the counted targets, as training averages it), else the task's (cross-entropy, MSE, BCE).
    Under a custom loss (distillation) it is the task's, so such runs are scored alike. A model
    whose own loss holds auxiliary terms (`Step.aux_terms`) also gets the task's loss alone
    (`val_task_loss`) and the rest (`val_aux_loss`); a per-token task's perplexity comes from
    the task's loss alone. Every evaluation draws the same random numbers (`seeded`).
    """
    was_training = model.training
    model.eval()
    totals = zero_sums(step)
    with seeded(step.device):
        for number, raw in enumerate(loader.batches()):
            sb = step.unpack(raw)
            with step.autocast():
                logits, own = read_output(model(*sb.args, **sb.kwargs))
            with naming_label_errors(f"validation batch {number}"):
                totals = add_sums(totals, batch_sums(step, logits, own, sb))
    model.train(was_training)
    return found_metrics(step, *totals)


def zero_sums(step: Step) -> list[torch.Tensor]:
    """[loss sum, metric sum, counted targets, task-loss sum] before any batch: the counts
    exact integers, as training's (`tasks.zeros`)."""
    return [*tasks.zeros(step.task, step.device), torch.zeros((), device=step.device)]


def add_sums(totals: list[torch.Tensor], sums) -> list[torch.Tensor]:
    """`totals` plus one batch's `sums` (tensors or numbers), each total keeping its dtype
    (exact integer counts; a float64 regression label does not promote the metric)."""
    return [t + torch.as_tensor(s, device=t.device).to(t.dtype)
            for t, s in zip(totals, sums, strict=True)]


def _apart(step: Step) -> bool:
    """Whether the model's own loss holds auxiliary terms to report apart from the task's."""
    return bool(step.aux_terms) and step.loss_fn is None and step.task in tasks.CLASS_TASKS


def batch_sums(step: Step, logits: torch.Tensor | None, own: torch.Tensor | None,
               sb: StepBatch) -> list[torch.Tensor]:
    """One validation batch's [loss sum, metric sum, counted targets, task-loss sum] (device
    tensors: no sync)."""
    metric, n = tasks.tally(step.task, logits, sb.labels, sb.size)
    task_sum = torch.zeros((), device=step.device)
    if step.task == "model-loss" or (own is not None and step.loss_fn is None):
        loss_sum = own.detach().float() * n
        if _apart(step):
            task_sum = tasks.loss_sum(step.task, logits, sb.labels)
    else:
        loss_sum = tasks.loss_sum(step.task, logits, sb.labels)
    return [torch.as_tensor(v, device=step.device) for v in (loss_sum, metric, n, task_sum)]


def found_metrics(step: Step, loss_sum: torch.Tensor, hits: torch.Tensor, count: torch.Tensor,
                  task_sum: torch.Tensor) -> dict[str, float | None]:
    """The validation metrics from the sums over every batch (one host sync)."""
    n, name = max(count.item(), 1), tasks.METRIC.get(step.task)
    found = {"val_loss": loss_sum.item() / n,
             "val_accuracy": hits.item() / n if name == "accuracy" else None,
             "val_mae": hits.item() / n if name == "mae" else None}
    if _apart(step):
        found["val_task_loss"] = task_sum.item() / n
        found["val_aux_loss"] = found["val_loss"] - found["val_task_loss"]
    if step.task in tasks.PER_TOKEN:
        found["val_perplexity"] = math.exp(min(found.get("val_task_loss", found["val_loss"]),
                                               700.0))
    return found


def check_evaluation(model: nn.Module, loader, step: Step) -> None:
    """Evaluate the loader's first batch as `metrics` will (nothing learnt), before anything
    is written: validation samples of another shape, or that the model cannot take, fail here
    in one line and not at the first evaluation, after the first epoch."""
    raw = first_batch(loader, "validation")
    _checked_call(model, lambda: metrics(model, OneBatch(raw), step), step.unpack(raw), step,
                  where="the validation set's first batch")


@dataclass
class OneBatch:
    """A loader of one batch (what `metrics` evaluates to check or to probe one batch)."""

    raw: Any

    def batches(self) -> list[Any]:
        return [self.raw]


def evaluate(model: nn.Module, loader, plan, step: Step | None = None
             ) -> tuple[float | None, float]:
    """(accuracy, mean loss) over the loader; the task is inferred from its first batch."""
    if step is None:
        step = check_first_batch(model, loader, step_for(model, plan))[0]
    found = metrics(model, loader, step)
    return found["val_accuracy"], found["val_loss"]


def check_first_batch(model: nn.Module, loader, step: Step,
                      all_labels: torch.Tensor | None = None) -> tuple[Step, int | None]:
    """Run one batch (no gradients, weights, statistics and random state untouched) before
    anything is written, so bad shapes, keys, labels or outputs fail fast with one line:
    in eval mode as evaluation sees it, then in train mode as training does (a BatchNorm
    given one sample, a model whose training forward returns other outputs). Returns the
    step with its task (inferred unless set) and whether the model has a loss of its own,
    and the width of the logits (the number of classes).

    `all_labels`: every training label, when the dataset holds them as one tensor (their
    range is checked, not only the first batch's)."""
    raw = first_batch(loader)
    sb = step.unpack(raw)
    # labels are checked before a model computes a loss on them; an encoder-decoder needs
    # them to run at all (its decoder inputs are built from them)
    call = sb.kwargs if step.encoder_decoder else \
        {k: v for k, v in sb.kwargs.items() if k != "labels"}
    drew = []

    def first_call() -> Any:  # (and whether evaluation draws random numbers: it is seeded)
        before = random_states(step.device)
        out = model(*sb.args, **call)
        drew.append(any(not torch.equal(a, b) for a, b in
                        zip(before, random_states(step.device), strict=True)))
        return out

    logits, own = read_output(_checked_call(model, first_call, sb, step))
    if step.loss_fn is None and own is None:
        _check_label_type(sb.labels)
    task = step.task if step.task != "auto" else tasks.infer(
        logits, sb.labels, model, "input_ids" in sb.kwargs, own is not None or (
            step.takes_labels and sb.labels is not None), step.encoder_decoder)
    if task in tasks.CLASS_TASKS and logits is not None and sb.labels is not None:
        labels = all_labels if all_labels is not None and task != "causal-lm" else sb.labels
        _check_class_labels(task, logits, labels)
        if task == "classification" and all_labels is not None:
            _check_classes_vary(all_labels)
    # a custom loss that keeps the model's auxiliary terms needs the model's own loss
    checked = replace(step, task=task, draws_random=drew[0],
                      pass_labels=step.pass_labels or step.keeps_auxiliary)
    found = check_loss(model, raw, checked)
    _, out_of_memory = recovery.attempt(lambda: check_loss(model, raw, checked, training=True))
    if out_of_memory:  # not the data's fault: the loop replays such a step in smaller parts
        recovery.release(step.device)
    terms = tuple(loss_terms(found[0])) if isinstance(found[0], Mapping) \
        and found[0].get("loss") is None else ()
    aux = tuple(loss_terms(found[0])) if task in tasks.CLASS_TASKS and isinstance(
        found[0], Mapping) and found[0].get("loss") is not None else ()
    checked = replace(checked, own_loss=found[1][2] is not None, loss_terms=terms,
                      aux_terms=aux, pass_labels=checked.pass_labels and (
                          step.pass_labels or bool(aux)))
    if terms and step.loss_fn is None:
        log.warning("the model returns no 'loss' but %s: training on their sum",
                    " + ".join(terms))
    if checked.draws_random:
        log.info("the model's forward draws random numbers in eval mode: every evaluation "
                 "draws the same ones (seed %d), so compared models see the same noise",
                 EVAL_SEED)
    return checked, logits.shape[-1] if logits is not None and logits.dim() else None


def check_loss(model: nn.Module, raw: Any, step: Step, training: bool = False
               ) -> tuple[Any, tuple]:
    """(output, loss_of(output)) for one batch with its labels, in eval or train mode, with
    nothing learnt (no gradients; statistics and random state restored); a failure is one
    line naming the batch."""
    sb = step.unpack(raw)
    out = _checked_call(model, lambda: model(*sb.args, **sb.kwargs), sb, step, training=training)
    return out, _checked_call(model, lambda: step.loss_of(out, sb), sb, step, "the loss",
                              training)


def _check_label_type(labels: Any) -> None:
    """Labels that leantrain's own losses take: a tensor (a list of class names is not)."""
    if labels is None or isinstance(labels, torch.Tensor):
        return
    items = labels if isinstance(labels, (list, tuple)) else [labels]
    kind = type(items[0]).__name__ if items else "nothing"
    raise LeantrainError(
        f"the first batch's labels are a {type(labels).__name__} of {kind} (e.g. "
        f"{bounded_repr(items[0] if items else labels, 40)}); labels must be numbers: map "
        "class names to 0..classes-1 in the dataset, or give a loss that takes them")


def _checked_call(model: nn.Module, call: Callable[[], Any], sb: StepBatch, step: Step,
                  what: str = "the model", training: bool = False, where: str = "") -> Any:
    """`call()` without gradients, in eval mode (or train mode), with the weights, buffers
    (BatchNorm statistics) and random state as they were; any failure becomes one line
    naming the batch."""
    try:
        with untouched(model), torch.no_grad(), step.autocast():
            model.train(training)
            return call()
    except LeantrainError:
        raise
    except Exception as exc:
        if training and isinstance(exc, torch.OutOfMemoryError):
            raise
        if sb.kwargs:
            shown = "input batch with " + ", ".join(f"{k} {_shape(v)}" for k, v in
                                                    sb.kwargs.items())
        else:
            shown = "input batch of shape " + ", ".join(str(_shape(a)) for a in sb.args)
        verb = "cannot run on the data" if what == "the model" else "has a loss that fails"
        mode = " in training mode" if training else ""
        prefix = f"{where}: " if where else ""
        hint = "; lower data.batch_size or data.eval_batch_size" \
            if isinstance(exc, torch.OutOfMemoryError) else ""
        raise LeantrainError(f"{prefix}the model {verb}{mode}: {shown} failed with "
                             f"{shorten(one_line(exc), 160)}{hint}") from exc


@contextlib.contextmanager
def naming_label_errors(where: str):
    """A loss's failure on a label outside the model's classes (a later batch than the one
    checked, a streamed dataset) becomes one line naming the batch (`where`); any other
    failure passes through unchanged."""
    try:
        yield
    except (IndexError, RuntimeError) as exc:
        text = first_line(exc)
        if "out of bounds" not in text:
            raise
        raise LeantrainError(f"{where}: a label is out of range ({text}); labels must be "
                             "class indices in 0..classes-1, or -100 to ignore a position"
                             ) from exc


def _shape(t: Any) -> tuple | str:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_classes_vary(labels: torch.Tensor) -> None:
    """Every label one class: answering it always scores 100%, and a run would report that
    as a result."""
    kept = labels[labels != tasks.IGNORE_INDEX]
    if kept.numel() > 1 and bool((kept == kept[0]).all()):
        raise LeantrainError(f"every label is {int(kept[0])} (training and validation, "
                             f"{kept.numel()} samples): one class; a classifier needs at least "
                             "2, or it scores 100% by always answering the one")


def _check_class_labels(task: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
    if labels.is_floating_point():
        raise LeantrainError(f"labels must be an integer tensor with one label per output "
                             f"row, got {labels.dtype} of shape {tuple(labels.shape)}")
    classes = logits.shape[-1]
    kept = labels[labels != tasks.IGNORE_INDEX]
    if kept.numel() == 0:
        return
    low, high = int(kept.min()), int(kept.max())
    if low < 0 or high >= classes:
        raise LeantrainError(f"labels out of range: found {low}..{high}, but the model outputs "
                             f"{classes} classes (labels must be in 0..{classes - 1}, or -100 "
                             f"to ignore a position)")
