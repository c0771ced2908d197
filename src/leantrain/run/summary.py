"""The end-of-run figures: throughput, step-time breakdown, MFU, memory, and the files holding them.

Everything here reads a finished (or running) `Run` and its state; nothing decides anything.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..checkpoint import atomic_save, atomic_write_text
from ..config import target_of
from ..data.batching import data_wait_advice, first_batch
from ..data.loaders import batch_size, split_batch
from ..losses import tasks
from ..measure.flops import count_flops, device_peak, mfu
from ..measure.memory import peak_bytes
from ..measure.probe import EVAL_SEED, untouched
from ..measure.timing import DATA_WAIT_WARNING, StepTimer
from ..techniques import schedules
from ..techniques.checkpointing import recompute_paused
from . import recovery
from .plan import ResolvedPlan, Run
from .pretrained import folder_name, write_pretrained
from .state import TrainState

log = logging.getLogger(__name__)

SUMMARY_NAME = "summary.json"
MODEL_NAME = "model.pt"
LR_ADVICE = ("optim.lr not set: torch's default ran; `leantrain find-lr` measures one for this "
             "model, `leantrain tune` searches it")


def training_flops(run: Run) -> float | None:
    """Training FLOPs per sample, counted on one micro-batch that fits; None if the counter
    fails.

    A first batch that runs out of memory is counted in halves, then quarters, ..., each
    attempt after the failed one's memory is back (`recovery.attempt`). Model FLOPs:
    activation checkpointing's recomputation is not counted (MFU, not HFU). It leaves the
    model as it was, so call it before the run seeds its random streams.
    """
    if run.pipeline is not None:  # (counted on the whole model before it was cut)
        return run.pipeline.flops_per_sample
    batch = first_batch(run.train_loader)
    parts = 1
    while True:
        chunk = batch if parts == 1 else split_batch(batch, parts)[0]
        flops, failure = recovery.attempt(functools.partial(_count, run, chunk))
        if failure is None:
            if parts > 1:
                log.info("FLOPs counted on a micro-batch of %d samples (a batch of %d ran out "
                         "of memory)", batch_size(chunk), batch_size(batch))
            return flops / batch_size(chunk) if flops else None
        recovery.release(run.plan.device)
        if batch_size(chunk) == 1:
            log.warning("FLOPs not counted (out of memory on one sample: %s); no MFU for this "
                        "run", failure)
            return None
        parts *= 2


def _count(run: Run, batch) -> int | None:
    try:
        with untouched(run.model), recompute_paused(run.model):
            return count_flops(lambda: run.step.probe(run.model, batch))
    except torch.OutOfMemoryError:
        raise  # counted again on a smaller micro-batch
    except Exception as exc:  # a model the counter cannot trace still trains
        log.warning("FLOPs not counted (%s: %s); no MFU for this run", type(exc).__name__, exc)
        return None


def utilization(plan: ResolvedPlan, flops_per_sample: float | None,
                samples_per_second: float | None) -> dict[str, Any]:
    """Training FLOPs per sample, achieved FLOP/s and MFU against the device's peak, per
    device: a tensor-parallel group's or a pipeline's samples (`samples_per_second`, this
    data-parallel rank's) are computed by its tp x pp devices together (their MFU was `tp`
    times too high)."""
    peak, why_none = device_peak(plan.device, plan.precision, plan.tf32)
    fps = flops_per_sample
    rate = samples_per_second / (plan.tp * plan.pp) if samples_per_second else None
    achieved = fps * rate if fps and rate else None
    return {
        "flops_per_sample": fps,
        "achieved_flops_per_second": achieved,
        "peak_flops_per_second": peak.flops_per_second if peak else None,
        "peak_source": peak.label if peak else why_none,
        "mfu": mfu(fps, rate, peak.flops_per_second) if achieved and peak else None,
    }


def step_breakdown(timer: StepTimer, run: Run) -> dict[str, Any] | None:
    """The step-time breakdown so far, with advice when waiting for data passes the threshold."""
    timer.collect()
    breakdown = timer.breakdown()
    if breakdown is not None and breakdown["fractions"]["data"] > DATA_WAIT_WARNING:
        breakdown["advice"] = data_wait_advice(run.train_loader, run.plan.device,
                                               run.tensor_backed)
    return breakdown


def describe_optimizer(optimizer) -> str:
    """The optimizer and the hyper-parameters it really ran with (optim.* set them all)."""
    group = optimizer.param_groups[0]
    parts = [f"lr {group.get('initial_lr', group['lr']):g}"]
    if group.get("momentum"):
        parts.append(f"momentum {group['momentum']:g}" + (", nesterov" if group.get("nesterov")
                                                           else ""))
    if "betas" in group:
        parts.append("betas " + "/".join(f"{b:g}" for b in group["betas"]))
    parts.append(f"weight decay {group.get('weight_decay', 0):g}")
    return f"{type(optimizer).__name__}: " + ", ".join(parts)


def build(run: Run, state: TrainState, timer: StepTimer, flops_per_sample: float | None,
          monitor_summary: dict[str, Any] | None) -> dict[str, Any]:
    p, plan, cfg = state.progress, run.plan, run.cfg
    peak, peak_kind = peak_bytes(plan.device)
    timer.finish()
    samples_per_second = p.samples / p.step_seconds if p.step_seconds else None
    target = target_of(cfg)
    summary = {
        "task": run.step.task,
        "loss": run.step.loss_source,
        "metric": tasks.METRIC_NAME.get(run.step.task),
        "val_accuracy": p.val_accuracy,
        "val_loss": p.val_loss,
        "val_mae": p.val_mae,
        "epochs": p.epoch,
        "steps": p.step,
        "train_seconds": p.train_seconds,
        "step_seconds": p.step_seconds,
        "compile_seconds": p.compile_seconds if plan.compile else None,
        "samples_per_second": samples_per_second,  # per process
        "world_size": run.dist.world_size,
        "global_samples_per_second": samples_per_second * run.dist.data_world
        if samples_per_second else None,
        "step_breakdown": step_breakdown(timer, run),
        **utilization(plan, flops_per_sample, samples_per_second),
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "target_acc": cfg.train.target_acc,
        "target": f"{target[0]}{target[1]}{target[2]:g}" if target else None,
        "time_to_target_seconds": p.time_to_target,
        "max_steps": cfg.train.max_steps,
        "stop_reason": p.stop_reason,
        "train_loader": run.train_loader.kind,
        "loader_tuning": run.loader_tuning.to_dict() if run.loader_tuning else None,
        "monitor": monitor_summary,
        "num_classes": run.num_classes,
        "parameters": _parameters(run),
        "optimizer": describe_optimizer(state.optimizer),
        "schedule": schedules.describe(cfg.schedule),
        # no lr of the user's: torch's default ran, which fits no model in particular
        "lr_advice": None if cfg.optim.lr is not None else LR_ADVICE,
        "plan": plan.to_dict(),
        # 1, or how many micro-batches each batch became after an out-of-memory recovery
        "micro_split": p.micro_split,
    }
    if run.step.aux_terms:  # the task's loss alone, and the model's auxiliary terms
        summary["val_task_loss"], summary["val_aux_loss"] = p.val_task_loss, p.val_aux_loss
    task_loss = p.val_task_loss if p.val_task_loss is not None else p.val_loss
    if run.step.task in tasks.PER_TOKEN and task_loss is not None:
        summary["val_perplexity"] = math.exp(min(task_loss, 700.0))
        summary["val_bits_per_token"] = task_loss / math.log(2)
    if run.step.draws_random:
        summary["evaluation"] = (f"seeded (seed {EVAL_SEED}): the model's forward draws random "
                                 "numbers, and every evaluation draws the same ones")
    if cfg.data.context is not None:  # a byte-level language model: per-token figures
        summary["tokens_per_second"] = samples_per_second * cfg.data.context \
            if samples_per_second else None
        summary["val_bits_per_byte"] = p.val_loss / math.log(2) \
            if p.val_loss is not None else None
    return summary


def _parameters(run: Run) -> int:
    """The model's parameter count; under pipeline parallel, over every stage (a tied one
    once, by name)."""
    if run.pipeline is None:
        return sum(t.numel() for t in run.model.parameters())
    held = {name: p.numel() for name, p in run.model.named_parameters()}  # (DTensors': whole)
    return sum({k: v for part in distributed.gather_objects(held, run.dist)
                for k, v in part.items()}.values())


def write(run: Run, state: TrainState, summary: dict[str, Any], out_dir: Path) -> None:
    """model.pt (a plain, unsharded state_dict) and summary.json; every rank calls it."""
    _write_weights(run, state, out_dir)
    if run.dist.is_main:
        atomic_write_text(out_dir / SUMMARY_NAME, json.dumps(summary, indent=2))


def _write_weights(run: Run, state: TrainState, out_dir: Path) -> None:
    """model.pt, and a Hugging Face model's `save_pretrained` folder (`run.pretrained`)."""
    weights = distributed.full_model_state(run.model, run.plan.distributed, run.dist)
    if run.dist.is_main:
        weights = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        atomic_save(weights, out_dir / MODEL_NAME)
        write_pretrained(run.model, weights, out_dir)


def write_missing(run: Run, state: TrainState, saved_summary: dict[str, Any] | None,
                  out_dir: Path) -> list[str]:
    """For a finished run (its final checkpoint restored into `run` and `state`): write
    model.pt and summary.json where they are missing; returns the names written."""
    written = []
    folder = folder_name(run.model)
    if not (out_dir / MODEL_NAME).is_file() or (folder and not (out_dir / folder).is_dir()):
        _write_weights(run, state, out_dir)
        written.append(MODEL_NAME)
    if not (out_dir / SUMMARY_NAME).is_file() and saved_summary is not None:
        if run.dist.is_main:
            atomic_write_text(out_dir / SUMMARY_NAME, json.dumps(saved_summary, indent=2))
        written.append(SUMMARY_NAME)
    return written
