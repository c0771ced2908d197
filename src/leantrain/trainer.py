"""The training loop: a thin composition of the techniques, with checkpoints, logs and a summary.

`fit` is deliberately plain: resolve the plan, apply each technique to ordinary objects, and run
forward / backward / step. Metrics are accumulated on the device and read back only every
`log_every` steps and at epoch ends, so the hot path never waits on the host.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from . import distributed
from .checkpoint import (
    CHECKPOINT_NAME,
    atomic_save,
    atomic_write_text,
    capture_rng,
    load_checkpoint,
    remove_partial_writes,
    restore_rng,
)
from .config import TrainConfig
from .data.loaders import (
    LoaderOptions,
    batch_count,
    compute_threads,
    data_wait_advice,
    make_loader,
    tensors_of,
)
from .data.tuning import auto_fields, fixed_options, tune_loader, worth_measuring
from .distributed import DistContext
from .errors import LeantrainError
from .measure.flops import count_flops, device_peak, mfu
from .measure.memory import peak_bytes, reset_peak
from .measure.monitor import ResourceMonitor
from .measure.probe import untouched
from .measure.timing import DATA_WAIT_WARNING, StepTimer
from .plan import ResolvedPlan, resolve_plan
from .run_logs import RunLog, truncate_after
from .techniques import accumulation, clipping, precision
from .techniques.backend_flags import backend_flags
from .techniques.checkpointing import apply_activation_checkpointing, recompute_paused
from .techniques.compile import apply_compile
from .techniques.init import init_weights
from .techniques.memory_format import apply_channels_last, to_channels_last
from .techniques.optimizer import build_optimizer
from .techniques.schedules import build_scheduler

log = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"
SUMMARY_NAME = "summary.json"
MODEL_NAME = "model.pt"


@dataclass
class _Progress:
    """Everything besides weights and optimizer state that a resume must restore."""

    epoch: int = 0
    batch: int = 0  # next micro-batch of `epoch` to run
    step: int = 0  # optimizer steps taken
    samples: int = 0
    step_seconds: float = 0.0  # time inside training steps (compile warm-up excluded)
    train_seconds: float = 0.0  # wall time of the loop: steps, evaluation, checkpoints
    compile_seconds: float = 0.0
    time_to_target: float | None = None
    val_accuracy: float | None = None
    val_loss: float | None = None
    finished: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _prepare_batch(x: torch.Tensor, y: torch.Tensor, plan: ResolvedPlan):
    x = x.to(plan.device, non_blocking=True)
    y = y.to(plan.device, non_blocking=True)
    return (to_channels_last(x) if plan.channels_last else x), y


def cross_entropy_loss(outputs: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor,
                       *extras: torch.Tensor) -> torch.Tensor:
    """The default training loss. A custom loss gets the same arguments (e.g. distillation).

    Outputs are (batch, ..., classes) with targets (batch, ...): one class per sample, or
    one per position of a sequence (a language model's next token).
    """
    return F.cross_entropy(outputs.flatten(0, -2), targets.flatten())


def _correct(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Correct predictions of a batch (one per sample or per sequence position), on the device."""
    return (out.detach().flatten(0, -2).argmax(-1) == y.flatten()).sum()


def _score(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(summed cross-entropy, correct predictions, targets) of a batch, on the device."""
    loss = F.cross_entropy(out.detach().float().flatten(0, -2), y.flatten(), reduction="sum")
    return loss, _correct(out, y), y.numel()


@torch.no_grad()
def evaluate(model: nn.Module, loader, plan: ResolvedPlan) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over the loader, with one host sync at the end."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=plan.device)
    correct = torch.zeros((), device=plan.device, dtype=torch.long)
    count = 0
    for x, y, *_ in loader.batches():
        x, y = _prepare_batch(x, y, plan)
        with precision.autocast(plan.device, plan.precision):
            out = model(x)
        batch_loss, batch_correct, batch_count = _score(out, y)
        loss_sum += batch_loss
        correct += batch_correct
        count += batch_count
    model.train(was_training)
    return correct.item() / count, loss_sum.item() / count


def check_model_fits_data(model: nn.Module, train_data: Dataset, loader, plan: ResolvedPlan
                          ) -> int:
    """Run one batch before anything is written, so bad shapes or labels fail fast and clean.

    Returns the number of classes (the model's output width).
    """
    x, y, *_ = next(iter(loader.batches()))
    x, y = _prepare_batch(x, y, plan)
    was_training = model.training
    model.eval()  # eval + no_grad: BatchNorm statistics and weights stay untouched
    try:
        with torch.no_grad(), precision.autocast(plan.device, plan.precision):
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


class Trainer:
    """One training run; `fit()` below is the function most callers want."""

    def __init__(self, model: nn.Module, train_data: Dataset, val_data: Dataset,
                 cfg: TrainConfig, out_dir: Path | None, progress_bar: bool = True,
                 loss_fn=cross_entropy_loss, measure_loader: bool = True):
        """`measure_loader=False` resolves "auto" loader settings to defaults without measuring
        (short trials that measure something else pass it)."""
        self.cfg, self.out_dir, self.progress_bar = cfg, out_dir, progress_bar
        self.loss_fn = loss_fn
        tokens = cfg.data.batch_size * cfg.data.context if cfg.data.context else None
        self.plan = resolve_plan(cfg.plan, model, tokens, cfg.optim.name)
        self.dist = DistContext.from_env()
        distributed.setup(self.dist, self.plan.device, cfg.train.dist_timeout_s)
        self.model = model.to(self.plan.device)
        if self.plan.channels_last:  # before any measuring, so it measures the run's layout
            apply_channels_last(self.model)
        if self.plan.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        data, on_cuda = cfg.data, self.plan.device.type == "cuda"
        values = dataclasses.asdict(data)
        options = fixed_options(values, on_cuda, cfg.train.epochs)
        self.train_loader = self._loader(train_data, data.batch_size, True, options)
        if len(self.train_loader) == 0:
            raise LeantrainError(
                f"{len(train_data)} training samples make no full batch of "
                f"{data.batch_size} x {self.dist.world_size} processes; lower data.batch_size")
        self.num_classes = check_model_fits_data(model, train_data, self.train_loader, self.plan)
        self.loader_tuning = None
        auto = auto_fields(values)
        # ranks measuring apart could choose apart: under launch, "auto" keeps the defaults
        if (measure_loader and not self.dist.active
                and self.train_loader.kind.startswith("DataLoader")
                and worth_measuring(auto, options, on_cuda)):
            with untouched(self.model):
                self.loader_tuning = tune_loader(train_data, data.batch_size, self.probe_step,
                                                 options, auto, on_cuda, cfg.train.epochs,
                                                 cfg.train.seed)
            log.info("data loader: %s", self.loader_tuning.describe())
            options = self.loader_tuning.choice
            self.train_loader = self._loader(train_data, data.batch_size, True, options)
        self.loader_options = options
        self.val_loader = self._loader(val_data, data.eval_batch_size, False,
                                       dataclasses.replace(options, persistent_workers=False))
        self.tensor_backed = tensors_of(train_data) is not None
        if self.plan.distributed == "fsdp":  # sharded parameters are initialised whole, first
            init_weights(self.model, cfg.train.init)
        self.wrapped = distributed.wrap(self.model, self.plan.distributed, self.plan.device)
        # the LR schedule follows a run that keeps every batch, so a compiled or autotuned run
        # (which drops the short last one) takes the same learning rate at each step as a
        # plain run: the bench compares their first losses step by step
        kept = batch_count(len(train_data), data.batch_size, (self.dist.rank, self.dist.world_size))
        self.steps_per_epoch = math.ceil(kept / self.plan.grad_accum)
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        self.progress = _Progress()
        self.log_file: RunLog | None = None
        self.monitor: ResourceMonitor | None = None

    # ------------------------------------------------------------------ set-up

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, options: LoaderOptions):
        """Training batches are sharded across ranks; every rank evaluates the whole val set.

        A compiled or cuDNN-autotuned model trains on full batches only (when there is one):
        the epoch's short last batch is a new shape to compile or tune for. On an H100 the
        recompile cost 21 s of a 35 s text-gpt run, and autotuning it put doctor's 20 timed
        digits steps at 938 samples/s against 5,132 over 200.
        """
        shard = (self.dist.rank, self.dist.world_size) if shuffle else (0, 1)
        drop = shuffle and (self.plan.compile or self.plan.cudnn_benchmark) \
            and len(dataset) >= batch_size * shard[1]
        return make_loader(dataset, batch_size, shuffle, self.cfg.train.seed, self.plan.device,
                           options, self.cfg.data.loader, shard, drop_last=drop)

    def _to_device(self, batch: tuple[torch.Tensor, ...]):
        x, y = _prepare_batch(batch[0], batch[1], self.plan)
        return x, y, [t.to(self.plan.device, non_blocking=True) for t in batch[2:]]

    def _forward_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      extras: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with precision.autocast(self.plan.device, self.plan.precision):
            out = model(x)
            return out, self.loss_fn(out, y, x, *extras)

    def probe_step(self, batch: tuple[torch.Tensor, ...]) -> None:
        """Forward and backward without a step: what measuring the loader and FLOPs runs."""
        x, y, extras = self._to_device(batch)
        self._forward_loss(self.model, x, y, extras)[1].backward()

    def count_flops(self) -> float | None:
        """Training FLOPs per sample, counted on one batch; None if the counter fails.

        Model FLOPs: activation checkpointing's recomputation is not counted (MFU, not HFU).
        """
        batch = next(iter(self.train_loader.batches()))
        try:
            with untouched(self.model), recompute_paused(self.model):
                flops = count_flops(lambda: self.probe_step(batch))
        except Exception as exc:  # a model the counter cannot trace still trains
            log.warning("FLOPs not counted (%s: %s); no MFU for this run", type(exc).__name__, exc)
            return None
        return flops / len(batch[1]) if flops else None

    def _build(self) -> None:
        cfg, plan = self.cfg, self.plan
        self.epoch_sums = self._new_epoch_sums()
        self.optimizer = build_optimizer(self.model.parameters(), cfg.optim, plan.optimizer_impl)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, self.total_steps,
                                         self.steps_per_epoch)
        self.scaler = precision.make_grad_scaler(plan.device, plan.precision)
        # evaluation uses the eager module: compiling a second (eval) graph would not pay off
        self.step_model = apply_compile(self.wrapped) if plan.compile else self.wrapped

    def _state(self) -> dict[str, Any]:
        """Full (unsharded) state; RNG and partial epoch sums per rank. Every rank calls it."""
        model_state, optimizer_state = distributed.full_state(self.model, self.optimizer,
                                                              self.plan.distributed)
        return {
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": distributed.gather_objects(capture_rng(), self.dist),
            "progress": self.progress.to_dict(),
            "epoch_sums": distributed.gather_objects([t.cpu() for t in self.epoch_sums],
                                                     self.dist),
        }

    def _save_checkpoint(self) -> None:
        if self.out_dir is not None:
            state = self._state()
            if self.dist.is_main:
                atomic_save(state, self.out_dir / CHECKPOINT_NAME)

    def _restore(self, state: dict[str, Any]) -> None:
        ranks = len(state["rng"]) if isinstance(state["rng"], list) else 1
        if ranks != self.dist.world_size:
            raise LeantrainError(f"the checkpoint was written by {ranks} process(es); resume it "
                                 f"with as many (now {self.dist.world_size})")
        distributed.load_full_state(self.model, self.optimizer, self.plan.distributed,
                                    state["model"], state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        rank = self.dist.rank
        restore_rng(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])
        self.progress = _Progress(**state["progress"])
        sums = state["epoch_sums"]
        sums = sums[rank] if isinstance(sums[0], list) else sums
        self.epoch_sums = [t.to(self.plan.device) for t in sums]

    def _epoch_totals(self) -> tuple[float, int, int]:
        """(loss sum, correct, count) of the epoch so far, summed over ranks."""
        loss_sum, correct, count = distributed.all_reduce_sum(self.epoch_sums, self.dist)
        return loss_sum.item(), int(correct.item()), int(count.item())

    def _new_epoch_sums(self) -> list[torch.Tensor]:
        device = self.plan.device
        return [torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long),
                torch.zeros((), device=device, dtype=torch.long)]  # loss sum, correct, count

    # ------------------------------------------------------------------ the loop

    def _train_step(self, batch: tuple[torch.Tensor, ...], micro: int, last: bool
                    ) -> tuple[bool, torch.Tensor]:
        """Forward and backward one micro-batch; step the optimizer at a boundary.

        Returns (stepped, the micro-batch's loss as a device tensor).
        """
        accum, timer = self.plan.grad_accum, self.timer
        timer.mark("data")
        x, y, extras = self._to_device(batch)
        timer.mark("copy")
        out, loss = self._forward_loss(self.step_model, x, y, extras)
        loss_sum, correct, count = self.epoch_sums
        loss_sum += loss.detach().float() * y.numel()
        correct += _correct(out, y)
        count += y.numel()
        timer.mark("forward")
        scaled = accumulation.scale_loss(loss, accum)
        boundary = accumulation.is_step_boundary(micro, accum, last)
        with distributed.gradient_sync(self.wrapped, self.plan.distributed, boundary):
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        timer.mark("backward")
        if not boundary:
            timer.mark("optimizer")
            return False, loss
        if self.cfg.train.clip_norm is not None:
            clipping.clip_gradients(self.model, self.optimizer, self.cfg.train.clip_norm,
                                    self.scaler)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        timer.mark("optimizer")
        return True, loss

    def _log_train(self, bar) -> None:
        loss_sum, correct, count = self._epoch_totals()  # the only sync: here
        p = self.progress
        lr = self.optimizer.param_groups[0]["lr"]
        if count:
            self.log_file.log("train", p.step, epoch=p.epoch, loss=loss_sum / count,
                              accuracy=correct / count, lr=lr)
            bar.set_postfix(loss=f"{loss_sum / count:.4f}", lr=f"{lr:.3g}")

    def _run_epoch(self, epoch: int) -> None:
        p, cfg = self.progress, self.cfg
        n_batches = len(self.train_loader)
        bar = tqdm(total=n_batches, initial=p.batch, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                   disable=None if self.progress_bar and self.dist.is_main else True,
                   leave=False, unit="batch")
        tick = time.perf_counter()
        self.timer.restart()
        for micro, batch in enumerate(self.train_loader.batches(epoch, p.batch), start=p.batch):
            stepped, _ = self._train_step(batch, micro, last=micro == n_batches - 1)
            p.batch, p.samples = micro + 1, p.samples + len(batch[1])
            bar.update(1)
            if not stepped:
                continue
            p.step += 1
            if self.first_step_pending:  # the first step after (re)start carries compilation
                self.first_step_pending = False
                self.timer = StepTimer(self.plan.device)  # and one-off warm-ups: not a step
                self.timer.restart()
                if self.plan.compile:
                    p.compile_seconds += time.perf_counter() - tick
                    tick = time.perf_counter()
            if p.step % cfg.train.log_every == 0:
                self._log_train(bar)
                self.timer.collect()
                self.timer.restart()
            if cfg.train.checkpoint_every and p.step % cfg.train.checkpoint_every == 0:
                p.step_seconds += time.perf_counter() - tick
                self._save_checkpoint()
                tick = time.perf_counter()
                self.timer.restart()
        if self.plan.device.type == "cuda":
            torch.cuda.synchronize(self.plan.device)
        p.step_seconds += time.perf_counter() - tick
        bar.close()

    def _end_epoch(self, epoch: int) -> bool:
        """Evaluate, log, checkpoint; True when the run should stop (target reached)."""
        p, cfg = self.progress, self.cfg
        loss_sum, correct, count = self._epoch_totals()
        record = {"epoch": epoch + 1, "train_loss": loss_sum / max(count, 1),
                  "train_accuracy": correct / max(count, 1)}
        stop = False
        if (epoch + 1) % cfg.train.eval_every_epochs == 0 or epoch + 1 == cfg.train.epochs:
            p.val_accuracy, p.val_loss = evaluate(self.model, self.val_loader, self.plan)
            record.update(val_accuracy=p.val_accuracy, val_loss=p.val_loss)
            target = cfg.train.target_acc
            if target is not None and p.val_accuracy >= target and p.time_to_target is None:
                p.time_to_target = p.train_seconds + (time.perf_counter() - self.loop_start)
                stop = True
        if epoch == 0:
            self._data_wait()  # warn after the first epoch, not only at the end of a long run
        self.log_file.log("epoch", p.step, **record)
        log.info("epoch %d: %s", epoch + 1,
                 ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "epoch"))
        p.epoch, p.batch = epoch + 1, 0
        self.epoch_sums = self._new_epoch_sums()
        return stop

    def run(self, resume: bool = False) -> dict[str, Any]:
        cfg, plan = self.cfg, self.plan
        out = self.out_dir
        self.flops_per_sample = self.count_flops()  # before seeding: it draws no numbers after
        self._build()
        if resume:
            remove_partial_writes(out)  # a run killed while writing leaves its temp file
            self._restore(load_checkpoint(out / CHECKPOINT_NAME, plan.device))
            truncate_after(out, self.progress.step)
            if self.progress.finished:
                raise LeantrainError(f"the run in {out} has already finished; nothing to resume")
            log.info("resuming at epoch %d, batch %d (step %d)", self.progress.epoch + 1,
                     self.progress.batch, self.progress.step)
        else:
            self._start_fresh()
        writes = out is not None and self.dist.is_main  # files and logs: rank 0 only
        if writes:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / CONFIG_NAME, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.log_file = RunLog(out) if writes else _NullLog()
        reset_peak(plan.device)
        self.first_step_pending = True
        self.timer = StepTimer(plan.device)
        self.data_wait_warned = False
        self.monitor = self._start_monitor() if self.dist.is_main else None
        self.model.train()
        try:
            with self._run_settings():
                self._loop()
        finally:
            if self.monitor:
                self.monitor.stop()
            self.log_file.close()
        return self._finish()

    def _start_monitor(self) -> ResourceMonitor | None:
        interval = self.cfg.train.monitor_interval_s
        if not interval:
            return None
        monitor = ResourceMonitor(
            interval, self.plan.device,
            sink=lambda sample: self.log_file.log("monitor", self.progress.step, **sample))
        if monitor.gpu.error and self.plan.device.type == "cuda":
            log.info("GPU monitoring off: %s", monitor.gpu.error)
        return monitor.start()

    def _start_fresh(self) -> None:
        if self.plan.distributed != "fsdp":  # FSDP2 models were initialised before sharding
            init_weights(self.model, self.cfg.train.init)
        torch.manual_seed(self.cfg.train.seed + self.dist.rank)  # dropout differs per rank

    @contextmanager
    def _run_settings(self):
        """Process-wide settings the run needs, restored afterwards: backend flags, threads."""
        plan = self.plan
        flags = backend_flags(plan.cudnn_benchmark, plan.tf32) if plan.device.type == "cuda" \
            else nullcontext()
        with flags, compute_threads(self.loader_options):
            yield

    def steps(self, lr_at: Callable[[int], float] | None = None
              ) -> Iterator[tuple[int, torch.Tensor]]:
        """Train from the initial weights and yield (samples, loss) after every optimizer step.

        This is exactly the step `run` takes, without evaluation, checkpoints or logs, for as
        long as the caller iterates (epochs follow one another): short measured trials (bench,
        the finders) use it so they time what training will really run. The loss is a device
        tensor (no host sync). `lr_at(step)` replaces the schedule by absolute learning rates.
        Close the generator when done: that restores the backend flags and thread count.
        """
        self._build()
        self._start_fresh()
        self.timer = StepTimer(self.plan.device)
        if lr_at is not None:
            base = self.cfg.optim.lr
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lambda step: lr_at(step) / base)
        self.model.train()
        samples, n_batches = 0, len(self.train_loader)
        with self._run_settings():
            for epoch in itertools.count():
                for micro, batch in enumerate(self.train_loader.batches(epoch)):
                    stepped, loss = self._train_step(batch, micro, last=micro == n_batches - 1)
                    samples += len(batch[1])
                    if stepped:
                        yield samples, loss
                        samples = 0

    def _loop(self) -> None:
        p = self.progress
        self.loop_start = time.perf_counter()
        for epoch in range(p.epoch, self.cfg.train.epochs):
            self._run_epoch(epoch)
            stop = self._end_epoch(epoch)
            p.train_seconds += time.perf_counter() - self.loop_start
            self.loop_start = time.perf_counter()
            if stop or epoch + 1 == self.cfg.train.epochs:
                p.finished = True
            self._save_checkpoint()
            if stop:
                break

    def _data_wait(self) -> dict[str, Any] | None:
        """The step-time breakdown so far; warns (once) when data wait passes the threshold."""
        self.timer.collect()
        breakdown = self.timer.breakdown()
        if breakdown is None:
            return None
        share = breakdown["fractions"]["data"]
        if share > DATA_WAIT_WARNING:
            breakdown["advice"] = data_wait_advice(self.train_loader, self.plan.device,
                                                   self.tensor_backed)
            if not self.data_wait_warned:
                self.data_wait_warned = True
                log.warning("waiting for data takes %.0f%% of each step (over %.0f%%); try: %s",
                            100 * share, 100 * DATA_WAIT_WARNING, breakdown["advice"])
        return breakdown

    def utilization(self, samples_per_second: float | None) -> dict[str, Any]:
        """Training FLOPs per sample, achieved FLOP/s and MFU against the device's peak."""
        plan, fps = self.plan, self.flops_per_sample
        peak, why_none = device_peak(plan.device, plan.precision, plan.tf32)
        achieved = fps * samples_per_second if fps and samples_per_second else None
        return {
            "flops_per_sample": fps,
            "achieved_flops_per_second": achieved,
            "peak_flops_per_second": peak.flops_per_second if peak else None,
            "peak_source": peak.label if peak else why_none,
            "mfu": mfu(fps, samples_per_second, peak.flops_per_second)
            if achieved and peak else None,
        }

    def _finish(self) -> dict[str, Any]:
        p, plan = self.progress, self.plan
        peak, peak_kind = peak_bytes(plan.device)
        self.timer.finish()
        samples_per_second = p.samples / p.step_seconds if p.step_seconds else None
        summary = {
            "val_accuracy": p.val_accuracy,
            "val_loss": p.val_loss,
            "epochs": p.epoch,
            "steps": p.step,
            "train_seconds": p.train_seconds,
            "step_seconds": p.step_seconds,
            "compile_seconds": p.compile_seconds if plan.compile else None,
            "samples_per_second": samples_per_second,  # per process
            "world_size": self.dist.world_size,
            "global_samples_per_second": samples_per_second * self.dist.world_size
            if samples_per_second else None,
            "step_breakdown": self._data_wait(),
            **self.utilization(samples_per_second),
            "peak_memory_bytes": peak,
            "peak_memory_kind": peak_kind,
            "target_acc": self.cfg.train.target_acc,
            "time_to_target_seconds": p.time_to_target,
            "train_loader": self.train_loader.kind,
            "loader_tuning": self.loader_tuning.to_dict() if self.loader_tuning else None,
            "monitor": self.monitor.summary() if self.monitor else None,
            "num_classes": self.num_classes,
            "parameters": sum(t.numel() for t in self.model.parameters()),
            "plan": plan.to_dict(),
        }
        context = self.cfg.data.context
        if context is not None:  # a byte-level language model: per-token figures
            summary["tokens_per_second"] = samples_per_second * context \
                if samples_per_second else None
            summary["val_bits_per_byte"] = p.val_loss / math.log(2) \
                if p.val_loss is not None else None
        if self.out_dir is not None:
            state, _ = distributed.full_state(self.model, self.optimizer, plan.distributed)
            if self.dist.is_main:
                plain = {k: v.detach().cpu().contiguous() for k, v in state.items()}
                atomic_save(plain, self.out_dir / MODEL_NAME)
                atomic_write_text(self.out_dir / SUMMARY_NAME, json.dumps(summary, indent=2))
        return summary


class _NullLog:
    def log(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def fit(model: nn.Module, train_data: Dataset, val_data: Dataset, cfg: TrainConfig | None = None,
        out_dir: str | Path | None = None, resume: bool = False, progress_bar: bool = True,
        loss_fn=cross_entropy_loss) -> dict[str, Any]:
    """Train `model` with the plan in `cfg`; returns the run summary.

    With `out_dir`, the run folder gets config.yaml, checkpoint.pt, metrics.jsonl, tensorboard/,
    model.pt (plain state_dict) and summary.json; `resume=True` continues from its checkpoint.
    """
    cfg = cfg or TrainConfig()
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise LeantrainError("resume needs the run folder (out_dir) that holds the checkpoint")
    trainer = Trainer(model, train_data, val_data, cfg, out, progress_bar, loss_fn)
    return trainer.run(resume=resume)
