"""The training loop over a decided `Run`: micro-steps, epochs, evaluation, checkpoints, logs.

Metrics are summed on the device and read back only every `log_every` steps and at epoch
ends, so the hot path never waits on the host. `Trainer.steps()` is the same step without
evaluation, checkpoints or logs: the one loop the bench, the finders and doctor time.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from tqdm import tqdm

from .. import distributed
from ..checkpoint import CHECKPOINT_NAME, atomic_write_text, load_checkpoint, remove_partial_writes
from ..config import CONFIG_NAME, target_met, target_of
from ..data.loaders import batch_size, split_batch
from ..errors import LeantrainError, first_line
from ..losses import tasks
from ..measure.memory import reset_peak
from ..measure.monitor import ResourceMonitor
from ..measure.timing import DATA_WAIT_WARNING, StepTimer
from ..techniques import accumulation, clipping, precision
from ..techniques.init import init_weights
from . import finite, signals, step, summary
from . import state as run_state
from .compiling import EAGER_STEPS, CompiledStep
from .heartbeat import Heartbeat
from .logs import NullLog, RunLog, start_monitor, truncate_after
from .plan import Run
from .state import TrainState

log = logging.getLogger(__name__)


class Watcher(Protocol):
    """What a caller driving many runs (a tuning study) sees of one, and how it ends it."""

    def evaluated(self, step: int, metrics: dict[str, float]) -> None:
        """After each validation; may raise to abandon the run (a pruned trial)."""

    def stop_reason(self) -> str | None:
        """After each optimizer step: a reason to end the run now (its summary is still
        written), or None."""


class Trainer:
    """One training run over a decided `Run`; `fit()` below is the function most callers want."""

    def __init__(self, run: Run, out_dir: Path | None = None, progress_bar: bool = True,
                 watcher: Watcher | None = None):
        self.run, self.out_dir, self.progress_bar = run, out_dir, progress_bar
        self.watcher = watcher
        self.step_model = run.wrapped  # compiled when training starts (see `_begin`)
        self.compiling: CompiledStep | None = None
        self.state: TrainState | None = None
        self.timer = StepTimer(run.plan.device)
        self.log_file: RunLog | NullLog = NullLog()
        self.monitor: ResourceMonitor | None = None
        self.data_wait_warned, self.first_step_pending, self.loop_start = False, True, 0.0
        self.target, self.evaluated_at = target_of(run.cfg), -1
        self.stop = signals.StopRequest()
        self.heartbeat = Heartbeat(run.dist.rank) if run.dist.active else None
        self.saved_step: int | None = None  # the step of the last checkpoint written

    def restart_timer(self) -> StepTimer:
        """A fresh step timer from now on (after warm-up steps that should not count)."""
        self.timer = StepTimer(self.run.plan.device)
        return self.timer

    def _begin(self, lr_at: Callable[[int], float] | None = None, eager_steps: int = 0) -> None:
        """Fresh training state; the compiled step model is made here, not when the trainer
        is built, so a trial that never trains pays nothing for torch.compile's import.
        A compiled run takes its first `eager_steps` steps eagerly (`run.compiling`)."""
        self.state = run_state.new_state(self.run, lr_at)
        # evaluation uses the eager module: compiling a second (eval) graph would not pay off
        if self.run.plan.compile and self.compiling is None:
            self.compiling = CompiledStep(self.run.wrapped, self.run.plan.device, eager_steps,
                                          self.run.plan.compile_mode)
            self.step_model = self.compiling.model

    def _close_compiling(self) -> None:
        if self.compiling is not None:
            self.compiling.close()

    def _start_fresh(self) -> None:
        run = self.run
        if run.plan.distributed != "fsdp":  # FSDP2 models were initialised before sharding
            init_weights(run.model, run.cfg.train.init)
        torch.manual_seed(run.cfg.train.seed + run.dist.rank)  # dropout differs per rank

    def micro_step(self, batch: step.Batch, micro: int, last: bool) -> tuple[bool, torch.Tensor]:
        """Forward and backward one loader batch (as `progress.micro_split` micro-batches
        after an out-of-memory recovery); step the optimizer at a boundary.

        Returns (stepped, the batch's loss as a device tensor).
        """
        run, state, timer = self.run, self.state, self.timer
        boundary = accumulation.is_step_boundary(micro, run.plan.grad_accum, last)
        parts = state.progress.micro_split
        chunks = [batch] if parts == 1 else split_batch(batch, parts)
        total = batch_size(batch) if parts > 1 else None  # (not counted on the common path)
        losses = []
        for i, chunk in enumerate(chunks):  # each a micro-batch for the step timer too
            final = i == len(chunks) - 1
            timer.mark("data")
            share = 1.0 if total is None else batch_size(chunk) / total
            losses.append(self._forward_backward(chunk, micro, share, boundary and final))
            if boundary and final:
                self._beat("optimizer")
                self._optimizer_step()
            timer.mark("optimizer")
        if parts == 1:
            return boundary, losses[0]
        return boundary, sum(loss.detach() * batch_size(chunk) / total
                             for loss, chunk in zip(losses, chunks, strict=True))

    def _forward_backward(self, batch: step.Batch, micro: int, share: float,
                          sync: bool) -> torch.Tensor:
        """Forward, tally and backward one micro-batch holding `share` of its loader batch's
        samples; gradients are synchronised across ranks only when `sync`."""
        run, state, timer = self.run, self.state, self.timer
        sb = run.step.unpack(batch)
        timer.mark("copy")
        self._beat("forward")
        if self.compiling is not None:
            self.compiling.before_forward()
        with step.naming_label_errors(f"training batch {micro} of epoch "
                                      f"{state.progress.epoch + 1}"):
            logits, loss, _ = run.step.forward(self.step_model, sb)
        metric, count = tasks.tally(run.step.task, logits, sb.labels, sb.size)
        loss_sum, metric_sum, counted = state.epoch_sums
        loss_sum += loss.detach().float() * count
        metric_sum += metric
        counted += count
        timer.mark("forward")
        scaled = accumulation.scale_loss(loss if share == 1.0 else loss * share,
                                         run.plan.grad_accum)
        self._beat("backward")
        with distributed.gradient_sync(run.wrapped, run.plan.distributed, sync):
            (state.scaler.scale(scaled) if state.scaler else scaled).backward()
        timer.mark("backward")
        return loss if self.compiling is None else self.compiling.kept(loss)

    def _recover(self, window: list[step.Batch], first: int, sums: list[torch.Tensor],
                 n_batches: int, error: torch.OutOfMemoryError) -> bool:
        """After an out-of-memory error in the optimizer step whose loader batches are
        `window` (from micro-batch `first`): drop its partial gradients and tallies, cut each
        batch into twice as many micro-batches (their gradients accumulated, so the global
        batch is kept) and run the step again; bounded at one sample per micro-batch.
        Returns whether the replayed step ended at a boundary."""
        state, p = self.state, self.state.progress
        while True:
            parts = p.micro_split * 2
            if parts > min(batch_size(b) for b in window):
                raise LeantrainError(
                    f"out of memory at step {p.step + 1} even with micro-batches of one sample "
                    f"({first_line(error)}); lower data.batch_size, or turn on "
                    "plan.activation_checkpointing") from error
            p.micro_split = parts
            log.warning("out of memory at step %d: each batch of %d now runs as %d "
                        "micro-batches, their gradients accumulated (the global batch is "
                        "unchanged); the checkpoint keeps this split", p.step + 1,
                        batch_size(window[0]), parts)
            state.optimizer.zero_grad(set_to_none=True)
            for now, before in zip(state.epoch_sums, sums, strict=True):
                now.copy_(before)
            del error
            if self.run.plan.device.type == "cuda":
                torch.cuda.empty_cache()
            self.timer.restart()  # the failed step's partial marks are dropped
            try:
                for offset, batch in enumerate(window):
                    micro = first + offset
                    stepped, _ = self.micro_step(batch, micro, last=micro == n_batches - 1)
                return stepped
            except torch.OutOfMemoryError as again:
                error = again

    def _beat(self, phase: str) -> None:
        """Under launch: where this rank is, for a report that names a stuck rank."""
        if self.heartbeat is not None:
            self.heartbeat.beat(self.state.progress.step + 1, phase)

    def _optimizer_step(self) -> None:
        state, clip_norm = self.state, self.run.cfg.train.clip_norm
        if clip_norm is not None:
            clipping.clip_gradients(self.run.model, state.optimizer, clip_norm, state.scaler)
        precision.optimizer_step(state.optimizer, state.scaler)
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
        try:
            with run.settings():
                for epoch in itertools.count():
                    for micro, batch in enumerate(run.train_loader.batches(epoch)):
                        stepped, loss = self.micro_step(batch, micro,
                                                        last=micro == n_batches - 1)
                        samples += batch_size(batch)
                        if stepped:
                            yield samples, loss
                            samples = 0
        finally:
            self._close_compiling()

    def _train_record(self) -> dict[str, float]:
        """The epoch's training loss and metric so far (a host sync: at log points only)."""
        loss_sum, metric_sum, n = run_state.epoch_totals(self.state, self.run)
        finite.check_loss(loss_sum, self.state.progress.step, self._last_good())
        record = {"loss": loss_sum / max(n, 1)}
        metric = tasks.METRIC.get(self.run.step.task)
        if metric:
            record[metric] = metric_sum / max(n, 1)
        return record

    def _log_train(self, bar) -> None:
        # float(): torchao's low-bit optimizers keep the LR as a tensor (no recompiles)
        p, lr = self.state.progress, float(self.state.optimizer.param_groups[0]["lr"])
        record = self._train_record()
        self.log_file.log("train", p.step, epoch=p.epoch, **record, lr=lr)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.3g}")

    def _evaluate(self) -> dict[str, float]:
        """Validation metrics now; records the time to the target when it is first met."""
        run, p = self.run, self.state.progress
        found = step.metrics(run.model, run.val_loader, run.step)
        p.val_accuracy, p.val_loss, p.val_mae = (found[k] for k in
                                                 ("val_accuracy", "val_loss", "val_mae"))
        self.evaluated_at = p.step
        if p.time_to_target is None and target_met(self.target, found):
            p.time_to_target = p.train_seconds + (time.perf_counter() - self.loop_start)
            p.stop_reason = f"target {self.target[0]}{self.target[1]}{self.target[2]:g} met"
        found = {k: v for k, v in found.items() if v is not None}
        if self.watcher is not None:
            self.watcher.evaluated(p.step, found)
        return found

    def _after_step(self, bar, tick: float) -> float:
        """Logs and mid-epoch checkpoints after an optimizer step; returns the step clock."""
        p, train = self.state.progress, self.run.cfg.train
        p.step += 1
        if self.first_step_pending:  # the first step after (re)start carries one-off
            self.first_step_pending = False  # warm-ups: not in the step breakdown
            self.restart_timer().restart()
        if self.compiling is not None:
            moved = self.compiling.after_step(p, tick)
            if moved != tick:  # eager steps ended, or a step compiled: a fresh breakdown
                tick = moved
                self.restart_timer().restart()
            self.step_model = self.compiling.model
        if p.step % train.log_every == 0:
            self._log_train(bar)
            self.timer.collect()
            self.timer.restart()
        if self._stop_requested(p.step):
            self._stop_on_signal()
        if train.max_steps is not None and p.step >= train.max_steps:
            p.stop_reason = f"train.max_steps ({train.max_steps}) reached"
        if self.watcher is not None and not p.stop_reason:
            p.stop_reason = self.watcher.stop_reason()
        eval_now = train.eval_every_steps and p.step % train.eval_every_steps == 0
        checkpoint = train.checkpoint_every and p.step % train.checkpoint_every == 0
        if (eval_now or checkpoint) and not p.stop_reason:
            p.step_seconds += time.perf_counter() - tick
            if eval_now:
                self.log_file.log("eval", p.step, epoch=p.epoch, **self._evaluate())
            if checkpoint:
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
        window, sums = [], []  # the current optimizer step's batches, the tallies before it
        for micro, batch in enumerate(run.train_loader.batches(epoch, p.batch), start=p.batch):
            if not window:
                sums = [t.clone() for t in self.state.epoch_sums]
            window.append(batch)
            try:
                stepped, _ = self.micro_step(batch, micro, last=micro == n_batches - 1)
            except torch.OutOfMemoryError as error:
                if run.dist.active:  # a rank that replays alone would leave the others
                    # waiting in their collective: the job fails, naming the rank
                    raise LeantrainError(
                        f"out of memory at step {p.step + 1} on rank {run.dist.rank}; recovery "
                        "splits batches in a single process only: lower data.batch_size or "
                        "turn on plan.activation_checkpointing") from error
                stepped = self._recover(window, micro - len(window) + 1, sums, n_batches, error)
            if stepped:
                window = []
            p.batch, p.samples = micro + 1, p.samples + batch_size(batch)
            bar.update(1)
            if stepped:
                tick = self._after_step(bar, tick)
                if p.stop_reason:
                    break
        if run.plan.device.type == "cuda":
            torch.cuda.synchronize(run.plan.device)
        p.step_seconds += time.perf_counter() - tick
        bar.close()

    def _end_epoch(self, epoch: int) -> bool:
        """Evaluate, log, checkpoint; True when the run should stop (target reached)."""
        run, p = self.run, self.state.progress
        train = run.cfg.train
        record = {"epoch": epoch + 1,
                  **{f"train_{k}": v for k, v in self._train_record().items()}}
        last = epoch + 1 == train.epochs or p.stop_reason is not None
        if ((epoch + 1) % train.eval_every_epochs == 0 or last) and self.evaluated_at != p.step:
            record.update(self._evaluate())
        if epoch == 0:
            self._warn_data_wait()  # after the first epoch, not only at the end of a long run
        self.log_file.log("epoch", p.step, **record)
        log.info("epoch %d: %s", epoch + 1,
                 ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "epoch"))
        p.epoch, p.batch = epoch + 1, 0
        self.state.epoch_sums = tasks.zeros(run.step.task, run.plan.device)
        return p.stop_reason is not None

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
                return  # the finished checkpoint follows the run's artefacts (see `fit`)
            self._save_checkpoint()

    def _last_good(self) -> str:
        if self.out_dir is None:
            return "no run folder, so no checkpoint"
        if self.saved_step is None:
            return f"no checkpoint was written in {self.out_dir} before it"
        return f"the last finite checkpoint (step {self.saved_step}) is kept in {self.out_dir}"

    def _save_checkpoint(self, extra: dict[str, Any] | None = None) -> None:
        if self.out_dir is None:
            return
        p = self.state.progress
        finite.check_parameters(self.run.model, self.run.dist, p.step, self._last_good())
        run_state.save(self.state, self.run, self.out_dir, extra)
        self.saved_step = p.step

    def _stop_requested(self, step: int) -> bool:
        """A signal was received here (or, under launch, on any rank: the ranks agree at log
        steps, so that all of them checkpoint the same step and none waits on another)."""
        if not self.run.dist.active:
            return self.stop.requested
        if step % self.run.cfg.train.log_every:
            return False
        flag = torch.tensor([float(self.stop.requested)], device=self.run.plan.device)
        return bool(distributed.all_reduce_sum([flag], self.run.dist)[0].item())

    def _stop_on_signal(self) -> None:
        name = signals.signal.Signals(self.stop.signum or signals.signal.SIGTERM)
        p = self.state.progress
        if self.out_dir is None:
            raise signals.Stopped(f"stopped by {name.name} at step {p.step} (no run folder: "
                                  "nothing saved)", name.value)
        self._save_checkpoint()
        raise signals.Stopped(f"stopped by {name.name} at step {p.step}; checkpoint written; "
                              f"continue with: leantrain train --resume {self.out_dir}",
                              name.value)

    def _resume(self) -> dict[str, Any] | None:
        """Restore the checkpoint; for a finished run, write the artefacts it lacks and return
        its summary (None: training continues)."""
        out = self.out_dir
        remove_partial_writes(out)  # a run killed while writing leaves its temp file
        saved = load_checkpoint(out / CHECKPOINT_NAME, self.run.plan.device)
        run_state.restore(self.state, self.run, saved, out / CHECKPOINT_NAME)
        p = self.state.progress
        self.saved_step = p.step
        if p.finished:
            written = summary.write_missing(self.run, self.state, saved.get("summary"), out)
            if not written:
                raise LeantrainError(f"the run in {out} has already finished; nothing to resume")
            log.info("the run in %s had finished; wrote what it lacked: %s", out,
                     ", ".join(written))
            return saved["summary"]
        truncate_after(out, p.step)
        log.info("resuming at epoch %d, batch %d (step %d)", p.epoch + 1, p.batch, p.step)
        return None

    def fit(self, resume: bool = False, plan_measurement: dict[str, Any] | None = None
            ) -> dict[str, Any]:
        """Train to the end (or the target); returns the summary, also written to the run
        folder. `plan_measurement`: how the plan's "auto" choices were measured."""
        run, out = self.run, self.out_dir
        flops = summary.training_flops(run)  # before seeding: it draws no numbers after
        self._begin(eager_steps=EAGER_STEPS)
        if resume:
            finished = self._resume()
            if finished is not None:
                self._close_compiling()
                return finished
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
            with run.settings(), self.stop:
                self._loop()
        finally:
            if self.monitor:
                self.monitor.stop()
            self.log_file.close()
            self._close_compiling()
            if self.heartbeat is not None:
                self.heartbeat.close()
        result = summary.build(run, self.state, self.timer, flops,
                               self.monitor.summary() if self.monitor else None)
        if self.compiling is not None:
            result["compile"] = self.compiling.report(self.state.progress)
        # 1, or how many micro-batches each batch became after an out-of-memory recovery
        result["micro_split"] = self.state.progress.micro_split
        result["plan_measurement"] = plan_measurement
        if out is not None:
            # model.pt and summary.json first, then the checkpoint that says "finished": a run
            # killed in between resumes from the previous checkpoint and writes them again
            finite.check_parameters(run.model, run.dist, self.state.progress.step,
                                    self._last_good())
            summary.write(run, self.state, result, out)
            self.state.progress.finished = True
            self._save_checkpoint({"summary": result})
        return result
