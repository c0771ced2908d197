"""The training loop over a decided `Run`: micro-steps, epochs, evaluation, checkpoints, logs.

Metrics are summed on the device and read back only every `log_every` steps and at epoch
ends, so the hot path never waits on the host. `Trainer.steps()` is the same step without
evaluation, checkpoints or logs: the one loop the bench, the finders and doctor time. What the
loop calls has a module each: out-of-memory recovery (`recovery`), signals (`signals`),
records and validation (`records`), checkpoints (`checkpoints`), the compile hand-over
(`compiling`), pipeline stages (`pipelined`), choices decided on the first steps (`deciding`)."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..data.batching import marking_last
from ..data.loaders import batch_size, split_batch
from ..losses import tasks
from ..measure import clock
from ..measure.load import LoadWatch
from ..measure.memory import reset_peak
from ..measure.timing import StepTimer
from ..techniques import accumulation, clipping, precision
from ..techniques.init import init_weights
from . import pipelined, recovery, signals, step, summary
from . import state as run_state
from .checkpoints import Checkpoints
from .compiling import EAGER_STEPS, CompiledStep
from .deciding import PlanTrial
from .heartbeat import Heartbeat
from .plan import Run
from .records import Records, Watcher
from .state import TrainState


class Trainer:
    """One training run over a decided `Run`; `fit()` below is the function most callers want."""

    def __init__(self, run: Run, out_dir: Path | None = None, progress_bar: bool = True,
                 watcher: Watcher | None = None, deciding: PlanTrial | None = None):
        self.run, self.out_dir, self.progress_bar = run, out_dir, progress_bar
        self.deciding = deciding  # its first steps decide "auto" choices (`run.deciding`)
        self.compiling: CompiledStep | None = None  # made when training starts (`_begin`)
        self.state: TrainState | None = None
        self.timer = StepTimer(run.plan.device)
        self.stop, self.first_step_pending, self.loop_start = signals.StopRequest(), True, 0.0
        self.heartbeat = Heartbeat(run.dist.rank) if run.dist.active else None
        self.checkpoints = Checkpoints(run, out_dir)
        self.records = Records(run, self.checkpoints.last_good, watcher,
                               deciding.evaluating if deciding else None)

    def restart_timer(self) -> StepTimer:  # (after warm-up steps that should not count)
        self.timer = StepTimer(self.run.plan.device)
        return self.timer

    def _begin(self, lr_at: Callable[[int], float] | None = None, eager_steps: int = 0) -> None:
        """Fresh training state; the compiled step is made here (a trial that never trains
        pays nothing for it), its first `eager_steps` steps eager (`run.compiling`)."""
        self.state = run_state.new_state(self.run, lr_at)
        self._compile_if_planned(eager_steps)

    def _compile_if_planned(self, eager_steps: int) -> None:
        # evaluation uses the eager module: compiling a second (eval) graph would not pay off
        if self.run.plan.compile and self.compiling is None:
            plan = self.run.plan
            self.compiling = CompiledStep(self.run.wrapped, plan.device, eager_steps,
                                          plan.compile_mode, plan.distributed == "fsdp")

    def _close_compiling(self) -> None:
        self.compiling is not None and self.compiling.close()

    def _start_fresh(self) -> None:
        cfg, plan, rank = self.run.cfg, self.run.plan, self.run.dist.data_rank
        if plan.distributed not in ("fsdp", "pp"):  # (those were initialised whole)
            init_weights(self.run.model, cfg.train.init)
        torch.manual_seed(cfg.train.seed + rank)  # dropout differs per batch shard

    def micro_step(self, batch: step.Batch, micro: int, last: bool) -> tuple[bool, torch.Tensor]:
        """Forward and backward one loader batch (as `progress.micro_split` micro-batches
        after an out-of-memory recovery), the optimizer stepped at a boundary; returns
        (stepped, the batch's loss as a device tensor)."""
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
        self._beat("forward")
        if run.pipeline is not None:  # the schedule runs every micro-batch's both passes
            return pipelined.forward_backward(run, state, timer, batch, share)
        sb = run.step.unpack(batch)
        timer.mark("copy")
        if self.compiling is not None:
            self.compiling.before_forward()
        with step.naming_label_errors(f"training batch {micro} of epoch "
                                      f"{state.progress.epoch + 1}"):
            model = run.wrapped if self.compiling is None else self.compiling.model
            logits, loss, _ = run.step.forward(model, sb)
        run_state.tally(state, loss, *tasks.tally(run.step.task, logits, sb.labels, sb.size))
        timer.mark("forward")
        scaled = accumulation.scale_loss(loss if share == 1.0 else loss * share,
                                         run.plan.grad_accum)
        self._beat("backward")
        with distributed.gradient_sync(run.wrapped, run.plan.distributed, sync):
            (state.scaler.scale(scaled) if state.scaler else scaled).backward()
        timer.mark("backward")
        return loss if self.compiling is None else self.compiling.kept(loss)

    def _recover(self, window: recovery.StepWindow, failure: str, ends_epoch: bool) -> bool:
        """The step of `window` ran out of memory: replay it as smaller micro-batches
        (`run.recovery`). Returns whether the replayed step ended at a boundary."""
        def before_replay() -> None:
            recovery.discard_step(self.state, window, self.run.plan.device)
            self.timer.restart()  # the failed step's partial marks are dropped
            if self.compiling is not None:
                self.compiling.shape_changed()
        return recovery.replay_split(window, self.state.progress, failure, self.run.dist,
                                     ends_epoch, before_replay, self.micro_step)

    def _beat(self, phase: str) -> None:  # under launch: for a report that names a stuck rank
        if self.heartbeat is not None:
            self.heartbeat.beat(self.state.progress.step + 1, phase)

    def _optimizer_step(self) -> None:
        state, clip_norm = self.state, self.run.cfg.train.clip_norm
        if clip_norm is not None:
            clipping.clip_gradients(self.run.model, state.optimizer, clip_norm, state.scaler,
                                    self.run.pipeline)
        precision.optimizer_step(state.optimizer, state.scaler)
        state.scheduler.step()

    def steps(self, lr_at: Callable[[int], float] | None = None
              ) -> Iterator[tuple[int, torch.Tensor]]:
        """Train from the initial weights and yield (samples, loss) after every optimizer step:
        exactly `fit`'s step, without evaluation, checkpoints or logs, for as long as the
        caller iterates (the bench, the finders and doctor time what training will run). The
        loss is a device tensor (no host sync); `lr_at(step)`: absolute learning rates instead
        of the schedule. Close the generator: that restores the backend flags and threads."""
        run = self.run
        self._begin(lr_at)
        self._start_fresh()
        self.restart_timer()
        run.model.train()
        samples = 0
        try:
            with run.settings():
                for epoch in itertools.count():
                    for micro, (batch, last) in enumerate(marking_last(run.train_loader, epoch)):
                        stepped, loss = self.micro_step(batch, micro, last)
                        samples += batch_size(batch)
                        if stepped:
                            yield samples, loss
                            samples = 0
        finally:
            self._close_compiling()

    def _seconds(self) -> float:  # training time so far: evaluation and checkpoints included
        return self.state.progress.train_seconds + (clock.now() - self.loop_start)

    def _after_step(self, bar, tick: float) -> float:
        """Logs and mid-epoch checkpoints after an optimizer step; returns the step clock."""
        p, train = self.state.progress, self.run.cfg.train
        p.step += 1
        if self.deciding is not None:  # its first steps may choose compile (`run.deciding`)
            tick = self.deciding.after_step(self.state, tick)
            self._compile_if_planned(eager_steps=1)  # (this step: the eager one it times)
        if self.first_step_pending:  # the first step after (re)start carries one-off
            self.first_step_pending = False  # warm-ups: not in the step breakdown
            self.restart_timer().restart()
        if self.compiling is not None:
            moved = self.compiling.after_step(p, tick)
            if moved != tick:  # eager steps ended, or a step compiled: a fresh breakdown
                tick = moved
                self.restart_timer().restart()
        if p.step % train.log_every == 0:
            self.records.log_train(self.state, bar)
            self.timer.collect()
            self.timer.restart()
        if self.stop.agreed(p.step, self.run.dist, train.log_every, self.run.plan.device):
            self.stop.stop(p.step, self.out_dir and self.checkpoints.resume_command(),
                           lambda: self.checkpoints.save(self.state))
        p.stop_reason = p.stop_reason or self.records.stop_reason(p.step)
        eval_now = train.eval_every_steps and p.step % train.eval_every_steps == 0
        checkpoint = train.checkpoint_every and p.step % train.checkpoint_every == 0
        if (eval_now or checkpoint) and not p.stop_reason:
            p.step_seconds += clock.now() - tick
            if eval_now:
                found = self.records.evaluate(self.state, self._seconds)
                self.records.log_file.log("eval", p.step, epoch=p.epoch, **found)
            if checkpoint:
                self.checkpoints.save_periodic(self.state)
            tick = clock.now()
            self.timer.restart()
        return tick

    def _run_epoch(self, epoch: int) -> None:
        run, p = self.run, self.state.progress
        bar = self.records.bar(epoch, p.batch, self.progress_bar)
        tick = clock.now()
        self.timer.restart()
        window = recovery.StepWindow()  # what a replay after an out-of-memory error needs
        batches = marking_last(run.train_loader, epoch, p.batch)
        for micro, (batch, last) in enumerate(batches, start=p.batch):
            window.add(batch, micro, self.state.epoch_sums)
            done, failure = recovery.attempt(
                functools.partial(self.micro_step, batch, micro, last))
            stepped = done[0] if failure is None else self._recover(window, failure, last)
            if stepped:
                window.close()
            p.batch, p.samples = micro + 1, p.samples + batch_size(batch)
            bar.update(1)
            if stepped:
                tick = self._after_step(bar, tick)
                if p.stop_reason:
                    break
        if run.plan.device.type == "cuda":
            torch.cuda.synchronize(run.plan.device)
        p.step_seconds += clock.now() - tick
        bar.close()

    def _end_epoch(self, epoch: int) -> bool:
        """Evaluate, log, checkpoint; True when the run should stop (target reached)."""
        p = self.state.progress
        self.records.end_epoch(self.state, epoch, self._seconds, self.timer)
        p.epoch, p.batch = epoch + 1, 0
        self.state.epoch_sums = tasks.zeros(self.run.step.task, self.run.plan.device)
        return p.stop_reason is not None

    def _loop(self) -> None:
        p, epochs = self.state.progress, self.run.cfg.train.epochs
        self.loop_start = clock.now()
        for epoch in range(p.epoch, epochs):
            self._run_epoch(epoch)
            stop = self._end_epoch(epoch)
            p.train_seconds += clock.now() - self.loop_start
            self.loop_start = clock.now()
            if stop or epoch + 1 == epochs:
                return  # the finished checkpoint follows the run's artefacts (see `fit`)
            self.checkpoints.save_periodic(self.state)

    def fit(self, resume: bool = False, plan_measurement: dict[str, Any] | None = None
            ) -> dict[str, Any]:
        """Train to the end (or the target); returns the summary, also written to the run
        folder. `plan_measurement`: how the plan's "auto" choices were measured before it."""
        run, out = self.run, self.out_dir
        flops = summary.training_flops(run)  # before seeding: it draws no numbers after
        self._begin(eager_steps=EAGER_STEPS)
        if resume:
            finished = self.checkpoints.resume(self.state)
            if finished is not None:
                self._close_compiling()
                return finished
        else:
            self._start_fresh()
        self.records.open(out, lambda: self.state.progress.step)
        reset_peak(run.plan.device)
        self.first_step_pending = True
        self.restart_timer()
        run.model.train()
        try:
            with run.settings(), self.stop, LoadWatch() as load:
                self._loop()
        finally:
            monitored = self.records.close()
            self._close_compiling()
            if self.heartbeat is not None:
                self.heartbeat.close()
        measured = self.deciding.close() if self.deciding else plan_measurement  # (the plan)
        result = summary.build(run, self.state, self.timer, flops, monitored)
        if self.compiling is not None:
            result["compile"] = self.compiling.report(self.state.progress)
        result["plan_measurement"] = measured
        result["load"] = load.reading.to_dict()  # samples/s on a busy machine says so
        self.checkpoints.finish(self.state, result)
        return result
