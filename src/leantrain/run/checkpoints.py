"""A run's checkpoints: each written only with finite weights, the last good one named when a
run stops on NaN, and the resume from them.

A run killed while writing leaves a temporary file (removed on resume); one killed after its
artefacts but before its final checkpoint resumes from the previous checkpoint and writes
them again; one that finished writes only what it lacks.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..checkpoint import CHECKPOINT_NAME, load_checkpoint, remove_partial_writes
from ..data.sources import code_named_by
from ..distributed import DistContext
from ..errors import LeantrainError
from . import finite, sharded, summary
from . import state as run_state
from .logs import logged_lines, truncate_after
from .plan import Run
from .state import TrainState

log = logging.getLogger(__name__)


class Checkpoints:
    """The checkpoints of one run in `out_dir` (None: a run without a folder saves none)."""

    def __init__(self, run: Run, out_dir: Path | None):
        self.run, self.out_dir = run, out_dir
        self.saved_step: int | None = None  # the step of the last checkpoint written
        self.data_changed = False  # a resume may continue on changed data (--data-changed)
        self.pending: sharded.Pending | None = None  # a save still writing in the background

    def last_good(self) -> str:
        """Where the last finite state is, for a message that stops the run."""
        if self.out_dir is None:
            return "no run folder, so no checkpoint"
        if self.saved_step is None:
            return f"no checkpoint was written in {self.out_dir} before it"
        return f"the last finite checkpoint (step {self.saved_step}) is kept in {self.out_dir}"

    def resume_command(self) -> str:
        """The command that continues this run; it names the model and data functions the
        run imports again, since a folder's config alone never makes leantrain import code."""
        cfg = self.run.cfg
        vouch = [f"{flag}={spec}" if flag.startswith("--set ") else f"{flag} {spec}"
                 for flag, spec in code_named_by(cfg.model, cfg.data.source,
                                                 cfg.plan.parallel.tp_plan).items()]
        train = " ".join(["train --resume", str(self.out_dir), *vouch])
        return f"leantrain {launch_prefix(self.run.dist)}{train}"

    def check_finite(self, step: int) -> None:
        """Before anything holding the weights is written: NaN or inf stops the run."""
        finite.check_parameters(self.run.model, self.run.dist, step, self.last_good())

    def save(self, state: TrainState, extra: dict[str, Any] | None = None,
             background: bool = False) -> None:
        """A checkpoint now; `background`: its shards written while training goes on (a
        stop's and the last one are written at once, after the one still writing)."""
        if self.out_dir is None:
            return
        self.commit_pending()
        self.check_finite(state.progress.step)
        state.progress.logged = logged_lines(self.out_dir)
        self.pending = run_state.save(state, self.run, self.out_dir, extra, background)
        if self.pending is None:
            self.saved_step = state.progress.step

    def save_periodic(self, state: TrainState) -> None:
        """The checkpoint every epoch or train.checkpoint_every steps."""
        self.save(state, background=self.run.cfg.train.async_checkpoint)

    def commit_pending(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.commit()
            self.saved_step = pending.step

    def finish(self, state: TrainState, result: dict[str, Any]) -> None:
        """model.pt and summary.json first, then the checkpoint that says "finished": a run
        killed in between resumes from the previous checkpoint and writes them again."""
        if self.out_dir is None:
            return
        self.check_finite(state.progress.step)
        summary.write(self.run, state, result, self.out_dir)
        state.progress.finished = True
        self.save(state, {"summary": result})

    def resume(self, state: TrainState) -> dict[str, Any] | None:
        """Restore the checkpoint into `state` and the run's model. Returns a finished run's
        summary once the artefacts it lacked are written, or None: training continues."""
        run, out = self.run, self.out_dir
        if run.dist.is_main:  # (rank 0 writes the folder's files: another rank clearing or
            remove_partial_writes(out)  # truncating them raced rank 0's own writes)
            if (out / sharded.FOLDER).is_dir():
                remove_partial_writes(out / sharded.FOLDER)  # a sharded save killed midway
        shards = newest_shards(out)
        if shards is not None:
            path = shards / sharded.STATE
            saved = sharded.load_state(shards)
        else:
            path = out / CHECKPOINT_NAME
            saved = load_checkpoint(path, run.plan.device)
        run_state.restore(state, run, saved, path, self.data_changed, shards)
        p = state.progress
        self.saved_step = p.step
        if p.finished:
            written = summary.write_missing(run, state, saved.get("summary"), out)
            if not written:
                raise LeantrainError(f"the run in {out} has already finished; nothing to resume")
            log.info("the run in %s had finished; wrote what it lacked: %s", out,
                     ", ".join(written))
            return saved["summary"]
        if run.dist.is_main:  # what was logged after it is logged again. Rank 0 alone: a
            truncate_after(out, p.step, p.logged)  # slower rank replacing the file once
            # left rank 0 appending to the replaced one, and the resumed records were lost
        log.info("resuming at epoch %d, batch %d (step %d)", p.epoch + 1, p.batch, p.step)
        return None


def newest_shards(out: Path) -> Path | None:
    """The sharded checkpoint to resume from, or None for the single file: whichever was
    written last (a run on 1 process resumed on 2 writes shards after its file, and back)."""
    shards = sharded.latest(out)
    single = out / CHECKPOINT_NAME
    if shards is None or not single.is_file():
        return shards
    pointer = out / sharded.FOLDER / sharded.LATEST
    return shards if pointer.stat().st_mtime_ns >= single.stat().st_mtime_ns else None


def written_by_several(out: Path) -> bool:
    """The checkpoint a resume of `out` continues was written by several data-parallel
    processes: their epochs dropped the short last batch, so a resume on one process drops it
    too (the same steps per epoch, the same schedule, the same samples in each step). A
    tensor-parallel group reads batches as one process does."""
    shards = newest_shards(out)
    if shards is None:
        return False
    state = sharded.load_state(shards)
    data = (state.get("fingerprint") or {}).get("data_world", state.get("world_size", 1))
    return data > 1


def launch_prefix(dist: DistContext) -> str:
    """Under `leantrain launch`, the launch that starts the same ranks again ("" otherwise): a
    rank's own `train --resume` would continue in one process."""
    if not dist.active:
        return ""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size))
    nodes = max(1, dist.world_size // max(per_node, 1))
    several = f" --nnodes {nodes} --node-rank R --master-addr A --master-port P" \
        if nodes > 1 else ""
    return f"launch --nproc {per_node}{several} -- "
