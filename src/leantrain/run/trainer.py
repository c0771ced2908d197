"""The training loop over a decided `Run`: micro-steps, epochs, evaluation, checkpoints, logs.

`fit` is deliberately plain: decide the run (`plan.build`), then run forward / backward / step.
Metrics are accumulated on the device and read back only every `log_every` steps and at epoch
ends, so the hot path never waits on the host. `Trainer.steps()` is the same step without
evaluation, checkpoints or logs: the one loop the bench, the finders and doctor time.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from .. import distributed
from ..checkpoint import CHECKPOINT_NAME, atomic_write_text, load_checkpoint, remove_partial_writes
from ..config import CONFIG_NAME, TrainConfig
from ..errors import LeantrainError
from ..losses import cross_entropy_loss
from ..measure.memory import reset_peak
from ..measure.monitor import ResourceMonitor
from ..measure.timing import DATA_WAIT_WARNING, StepTimer
from ..techniques import accumulation, clipping
from ..techniques.compile import apply_compile
from ..techniques.init import init_weights
from . import state as run_state
from . import step, summary
from .logs import NullLog, RunLog, start_monitor, truncate_after
from .plan import Run, build
from .state import TrainState

log = logging.getLogger(__name__)


class Trainer:
    """One training run over a decided `Run`; `fit()` below is the function most callers want."""

    def __init__(self, run: Run, out_dir: Path | None = None, progress_bar: bool = True):
        self.run, self.out_dir, self.progress_bar = run, out_dir, progress_bar
        self.step_model = run.wrapped  # compiled when training starts (see `_begin`)
        self.state: TrainState | None = None
        self.timer = StepTimer(run.plan.device)
        self.log_file: RunLog | NullLog = NullLog()
        self.monitor: ResourceMonitor | None = None
        self.data_wait_warned, self.first_step_pending, self.loop_start = False, True, 0.0

    def restart_timer(self) -> StepTimer:
        """A fresh step timer from now on (after warm-up steps that should not count)."""
        self.timer = StepTimer(self.run.plan.device)
        return self.timer

    def _begin(self, lr_at: Callable[[int], float] | None = None) -> None:
        """Fresh training state; the compiled step model is made here, not when the trainer
        is built, so a trial that never trains pays nothing for torch.compile's import."""
        self.state = run_state.new_state(self.run, lr_at)
        # evaluation uses the eager module: compiling a second (eval) graph would not pay off
        if self.run.plan.compile and self.step_model is self.run.wrapped:
            self.step_model = apply_compile(self.run.wrapped)

    def _start_fresh(self) -> None:
        run = self.run
        if run.plan.distributed != "fsdp":  # FSDP2 models were initialised before sharding
            init_weights(run.model, run.cfg.train.init)
        torch.manual_seed(run.cfg.train.seed + run.dist.rank)  # dropout differs per rank

    def micro_step(self, batch: step.Batch, micro: int, last: bool) -> tuple[bool, torch.Tensor]:
        """Forward and backward one micro-batch; step the optimizer at a boundary.

        Returns (stepped, the micro-batch's loss as a device tensor).
        """
        run, state, timer = self.run, self.state, self.timer
        accum = run.plan.grad_accum
        timer.mark("data")
        x, y, extras = step.to_device(batch, run.plan)
        timer.mark("copy")
        out, loss = step.forward_loss(self.step_model, x, y, extras, run.plan, run.loss_fn)
        loss_sum, correct, count = state.epoch_sums
        loss_sum += loss.detach().float() * y.numel()
        correct += step.correct(out, y)
        count += y.numel()
        timer.mark("forward")
        scaled = accumulation.scale_loss(loss, accum)
        boundary = accumulation.is_step_boundary(micro, accum, last)
        with distributed.gradient_sync(run.wrapped, run.plan.distributed, boundary):
            (state.scaler.scale(scaled) if state.scaler else scaled).backward()
        timer.mark("backward")
        if boundary:
            self._optimizer_step()
        timer.mark("optimizer")
        return boundary, loss

    def _optimizer_step(self) -> None:
        state, clip_norm = self.state, self.run.cfg.train.clip_norm
        if clip_norm is not None:
            clipping.clip_gradients(self.run.model, state.optimizer, clip_norm, state.scaler)
        if state.scaler:
            state.scaler.step(state.optimizer)
            state.scaler.update()
        else:
            state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.scheduler.step()

    def steps(self, lr_at: Callable[[int], float] | None = None
              ) -> Iterator[tuple[int, torch.Tensor]]:
        """Train from the initial weights and yield (samples, loss) after every optimizer step.

        This is exactly the step `fit` takes, without evaluation, checkpoints or logs, for as
        long as the caller iterates (epochs follow one another): short measured trials (bench,
        the finders, doctor) time it, so they time what training will really run. The loss is a
        device tensor (no host sync). `lr_at(step)` replaces the schedule by absolute learning
        rates. Close the generator when done: that restores the backend flags and threads.
        """
        run = self.run
        self._begin(lr_at)
        self._start_fresh()
        self.restart_timer()
        run.model.train()
        samples, n_batches = 0, len(run.train_loader)
        with run.settings():
            for epoch in itertools.count():
                for micro, batch in enumerate(run.train_loader.batches(epoch)):
                    stepped, loss = self.micro_step(batch, micro, last=micro == n_batches - 1)
                    samples += len(batch[1])
                    if stepped:
                        yield samples, loss
                        samples = 0

    def _log_train(self, bar) -> None:
        loss_sum, correct, n = run_state.epoch_totals(self.state, self.run)  # the only sync
        p, lr = self.state.progress, self.state.optimizer.param_groups[0]["lr"]
        if n:
            self.log_file.log("train", p.step, epoch=p.epoch, loss=loss_sum / n,
                              accuracy=correct / n, lr=lr)
            bar.set_postfix(loss=f"{loss_sum / n:.4f}", lr=f"{lr:.3g}")

    def _after_step(self, bar, tick: float) -> float:
        """Logs and mid-epoch checkpoints after an optimizer step; returns the step clock."""
        p, train = self.state.progress, self.run.cfg.train
        p.step += 1
        if self.first_step_pending:  # the first step after (re)start carries compilation
            self.first_step_pending = False  # and one-off warm-ups: not a step
            self.restart_timer().restart()
            if self.run.plan.compile:
                p.compile_seconds += time.perf_counter() - tick
                tick = time.perf_counter()
        if p.step % train.log_every == 0:
            self._log_train(bar)
            self.timer.collect()
            self.timer.restart()
        if train.checkpoint_every and p.step % train.checkpoint_every == 0:
            p.step_seconds += time.perf_counter() - tick
            self._save_checkpoint()
            tick = time.perf_counter()
            self.timer.restart()
        return tick

    def _run_epoch(self, epoch: int) -> None:
        run, p = self.run, self.state.progress
        n_batches = len(run.train_loader)
        bar = tqdm(total=n_batches, initial=p.batch,
                   desc=f"epoch {epoch + 1}/{run.cfg.train.epochs}",
                   disable=None if self.progress_bar and run.dist.is_main else True,
                   leave=False, unit="batch")
        tick = time.perf_counter()
        self.timer.restart()
        for micro, batch in enumerate(run.train_loader.batches(epoch, p.batch), start=p.batch):
            stepped, _ = self.micro_step(batch, micro, last=micro == n_batches - 1)
            p.batch, p.samples = micro + 1, p.samples + len(batch[1])
            bar.update(1)
            if stepped:
                tick = self._after_step(bar, tick)
        if run.plan.device.type == "cuda":
            torch.cuda.synchronize(run.plan.device)
        p.step_seconds += time.perf_counter() - tick
        bar.close()

    def _end_epoch(self, epoch: int) -> bool:
        """Evaluate, log, checkpoint; True when the run should stop (target reached)."""
        run, p = self.run, self.state.progress
        train = run.cfg.train
        loss_sum, correct, count = run_state.epoch_totals(self.state, run)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / max(count, 1),
                  "train_accuracy": correct / max(count, 1)}
        stop = False
        if (epoch + 1) % train.eval_every_epochs == 0 or epoch + 1 == train.epochs:
            p.val_accuracy, p.val_loss = step.evaluate(run.model, run.val_loader, run.plan)
            record.update(val_accuracy=p.val_accuracy, val_loss=p.val_loss)
            target = train.target_acc
            if target is not None and p.val_accuracy >= target and p.time_to_target is None:
                p.time_to_target = p.train_seconds + (time.perf_counter() - self.loop_start)
                stop = True
        if epoch == 0:
            self._warn_data_wait()  # after the first epoch, not only at the end of a long run
        self.log_file.log("epoch", p.step, **record)
        log.info("epoch %d: %s", epoch + 1,
                 ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "epoch"))
        p.epoch, p.batch = epoch + 1, 0
        self.state.epoch_sums = run_state.new_epoch_sums(run.plan.device)
        return stop

    def _warn_data_wait(self) -> None:
        breakdown = summary.step_breakdown(self.timer, self.run)
        if breakdown and "advice" in breakdown and not self.data_wait_warned:
            self.data_wait_warned = True
            log.warning("waiting for data takes %.0f%% of each step (over %.0f%%); try: %s",
                        100 * breakdown["fractions"]["data"], 100 * DATA_WAIT_WARNING,
                        breakdown["advice"])

    def _loop(self) -> None:
        p, epochs = self.state.progress, self.run.cfg.train.epochs
        self.loop_start = time.perf_counter()
        for epoch in range(p.epoch, epochs):
            self._run_epoch(epoch)
            stop = self._end_epoch(epoch)
            p.train_seconds += time.perf_counter() - self.loop_start
            self.loop_start = time.perf_counter()
            if stop or epoch + 1 == epochs:
                p.finished = True
            self._save_checkpoint()
            if stop:
                break

    def _save_checkpoint(self) -> None:
        if self.out_dir is not None:
            run_state.save(self.state, self.run, self.out_dir)

    def _resume(self) -> None:
        out = self.out_dir
        remove_partial_writes(out)  # a run killed while writing leaves its temp file
        run_state.restore(self.state, self.run,
                          load_checkpoint(out / CHECKPOINT_NAME, self.run.plan.device))
        p = self.state.progress
        truncate_after(out, p.step)
        if p.finished:
            raise LeantrainError(f"the run in {out} has already finished; nothing to resume")
        log.info("resuming at epoch %d, batch %d (step %d)", p.epoch + 1, p.batch, p.step)

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train to the end (or the target); returns the summary, written to the run folder."""
        run, out = self.run, self.out_dir
        flops = summary.training_flops(run)  # before seeding: it draws no numbers after
        self._begin()
        if resume:
            self._resume()
        else:
            self._start_fresh()
        writes = out is not None and run.dist.is_main  # files and logs: rank 0 only
        if writes:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / CONFIG_NAME,
                              yaml.safe_dump(run.cfg.to_dict(), sort_keys=False))
            self.log_file = RunLog(out)
        reset_peak(run.plan.device)
        self.first_step_pending = True
        self.restart_timer()
        self.monitor = start_monitor(run, lambda sample: self.log_file.log(
            "monitor", self.state.progress.step, **sample))
        run.model.train()
        try:
            with run.settings():
                self._loop()
        finally:
            if self.monitor:
                self.monitor.stop()
            self.log_file.close()
        result = summary.build(run, self.state, self.timer, flops,
                               self.monitor.summary() if self.monitor else None)
        if out is not None:
            summary.write(run, self.state, result, out)
        return result


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
    return Trainer(build(cfg, model, train_data, val_data, loss_fn), out, progress_bar) \
        .fit(resume=resume)
