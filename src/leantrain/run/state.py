"""What a training run carries from step to step, and what its checkpoint holds.

`TrainState` is the mutable part of a run (optimizer, schedule, loss scaler, progress and the
epoch's running sums); `checkpoint` and `restore` turn it into a weights-only-loadable dict and
back, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import distributed
from ..checkpoint import (
    CHECKPOINT_NAME,
    atomic_save,
    capture_rng,
    restore_rng,
    seed_everything,
)
from ..config import TrainConfig
from ..errors import LeantrainError, one_line
from ..losses import tasks
from ..techniques import precision
from ..techniques.optimizer import build_optimizer
from ..techniques.schedules import build_scheduler
from . import saved as saved_checkpoint
from . import sharded
from .progress import Progress

if TYPE_CHECKING:  # (a type only: plan builds the run and imports the step, which imports
    from .plan import Run  # recovery, which imports this module)

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    epoch_sums: list[torch.Tensor]
    progress: Progress = field(default_factory=Progress)


def new_state(run: Run, lr_at: Callable[[int], float] | None = None) -> TrainState:
    """A fresh optimizer, schedule and scaler for the run's model.

    `lr_at(step)` replaces the schedule by absolute learning rates (the LR finder's sweep).
    """
    plan, cfg = run.plan, run.cfg
    optimizer = build_optimizer(run.model.parameters(), cfg.optim, plan.optimizer_impl,
                                plan.optimizer_states, plan.optimizer_offload)
    if lr_at is None:
        scheduler = build_scheduler(optimizer, cfg.schedule, run.total_steps,
                                    run.steps_per_epoch)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_at(step) / cfg.optim.resolved().lr)
    return TrainState(optimizer, scheduler, precision.make_grad_scaler(plan.device,
                                                                       plan.precision),
                      tasks.zeros(run.step.task, plan.device))


def tally(state: TrainState, loss: torch.Tensor, metric, count) -> None:
    """Adds a micro-batch's loss, metric and counted targets to the epoch's sums (on the
    device: no sync)."""
    loss_sum, metric_sum, counted = state.epoch_sums
    loss_sum += loss.detach().float() * count
    metric_sum += metric
    counted += count


def epoch_totals(state: TrainState, run: Run) -> tuple[float, float, int]:
    """(loss sum, metric sum, count) of the epoch so far, summed over ranks (a host sync)."""
    loss_sum, metric, count = distributed.all_reduce_sum(state.epoch_sums, run.dist)
    return loss_sum.item(), metric.item(), int(count.item())


def checkpoint(state: TrainState, run: Run) -> dict[str, Any]:
    """Full (unsharded) state; RNG and partial epoch sums per rank. Every rank calls it."""
    model_state, optimizer_state = distributed.full_state(run.model, state.optimizer,
                                                          run.plan.distributed)
    return {"model": model_state, "optimizer": optimizer_state, **small_state(state, run)}


def small_state(state: TrainState, run: Run) -> dict[str, Any]:
    """All but the model and optimizer: what rank 0 writes beside a sharded checkpoint."""
    return {
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler else None,
        "rng": distributed.gather_objects(capture_rng(), run.dist),
        "progress": {**state.progress.to_dict(),  # (its position in data.batch_size units)
                     "batch": state.progress.batch * run.plan.microbatches},
        "epoch_sums": distributed.gather_objects([t.cpu() for t in state.epoch_sums], run.dist),
    }


# config keys a resume may change: when and how often the run stops, logs, evaluates and
# saves, and how batches reach the model; every other key shapes the computation
RESUMABLE_KEYS = frozenset({
    "train.epochs", "train.target_acc", "train.target", "train.max_steps", "train.log_every",
    "train.checkpoint_every", "train.eval_every_steps", "train.eval_every_epochs",
    "train.monitor_interval_s", "train.dist_timeout_s", "data.num_workers", "data.pin_memory",
    "data.prefetch_factor", "data.persistent_workers", "data.eval_batch_size", "plan.cache",
    # DDP or FSDP2, hybrid or not: a checkpoint holds tensors by name either way
    "plan.distributed", "plan.parallel.dp_replicate", "plan.parallel.dp_shard",
    "plan.parallel.tp", "plan.parallel.tp_plan", "plan.parallel.sp", "plan.parallel.pp",
    "plan.parallel.pp_schedule",
    "train.async_checkpoint", "train.keep_checkpoints",
})
_REQUIRED = {"model": dict, "optimizer": dict, "scheduler": dict, "rng": (dict, list),
             "progress": dict, "epoch_sums": list}


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def fingerprint(run: Run) -> dict[str, Any]:
    """What a resume must find unchanged: the config (all but RESUMABLE_KEYS) and the
    model's parameter names and shapes."""
    shapes = {name: list(p.shape) for name, p in run.model.state_dict().items()
              if isinstance(p, torch.Tensor)}
    if run.pipeline is not None:  # each process holds its stages': the whole model's
        shapes = {k: v for part in distributed.gather_objects(shapes, run.dist)
                  for k, v in part.items()}
    return {"config": _flat(run.cfg.to_dict()), "parameters": shapes,
            "data": run.data_fingerprint, "world_size": run.dist.world_size,
            "data_world": run.dist.data_world}


def check_fingerprint(saved: dict[str, Any], run: Run, path: Path,
                      data_changed: bool = False) -> None:
    """One line naming what changed since the checkpoint; the changes a resume may make are
    logged and honoured. Changed data is refused unless `data_changed` (the user says so)."""
    now = fingerprint(run)
    _check_data(saved.get("data"), now["data"], path, data_changed)
    before = saved.get("config", {})
    defaults = _flat(TrainConfig().to_dict())  # a key newer than the checkpoint is no
    changed = sorted(k for k in set(before) | set(now["config"])  # change at its default
                     if before.get(k) != now["config"].get(k)
                     and not (k not in before and now["config"].get(k) == defaults.get(k)))
    _check_global_batch(before, saved.get("data_world", saved.get("world_size")), run, path)
    refused = [k for k in changed if k not in RESUMABLE_KEYS and k != "data.batch_size"]
    if refused:
        shown = ", ".join(f"{k} ({before.get(k)!r} -> {now['config'].get(k)!r})"
                          for k in refused[:4])
        raise LeantrainError(f"resume {path.parent}: the config changed since the checkpoint: "
                             f"{shown}; a resumed run keeps its training settings (start a new "
                             "run to change them)")
    for key in changed:
        log.info("resume: %s changed %r -> %r (allowed on resume)", key, before.get(key),
                 now["config"].get(key))
    had, has = saved.get("parameters", {}), now["parameters"]
    for name in list(had) + [n for n in has if n not in had]:
        if had.get(name) != has.get(name):
            raise LeantrainError(
                f"resume {path.parent}: the model differs from the checkpoint's at {name} "
                f"(checkpoint {had.get(name) or 'absent'}, model {has.get(name) or 'absent'}); "
                "resume with the model the run was started with")


def _check_global_batch(before: dict[str, Any], world: int | None, run: Run,
                        path: Path) -> None:
    """A resume on another number of processes keeps the global batch (data-parallel
    processes x data.batch_size): the schedule, the data position and what a step learns
    follow it."""
    here = run.dist.data_world
    world = world or here
    had = before.get("data.batch_size")
    if not isinstance(had, int) or not isinstance(world, int):
        return
    now = run.cfg.data.batch_size * here
    if had * world != now:
        fits = "" if (had * world) % here else \
            f"; on {here} data-parallel process(es) pass --set data.batch_size=" \
            f"{had * world // here}"
        raise LeantrainError(f"resume {path.parent}: the global batch changed: {world} x "
                             f"{had} = {had * world} at the checkpoint, {here} x "
                             f"{run.cfg.data.batch_size} = {now} now{fits}")


def _check_data(before: dict[str, Any] | None, now: dict[str, Any], path: Path,
                allowed: bool) -> None:
    """The training and validation sets the run started with (lengths and sample digests)."""
    if not before or not now or before == now:
        return
    split = next(s for s in ("train", "val") if before.get(s) != now.get(s))
    had, has = before.get(split, {}), now.get(split, {})
    how = (f"{had.get('samples', 0):,} -> {has.get('samples', 0):,} samples"
           if had.get("samples") != has.get("samples") else "the same length, other samples")
    if allowed:
        log.warning("resume %s: the %s data changed since the checkpoint (%s); continuing on "
                    "it, as --data-changed asks", path.parent, split, how)
        return
    raise LeantrainError(f"resume {path.parent}: the {split} data changed since the checkpoint "
                         f"({how}); resume on the data the run started with, or pass "
                         "--data-changed to continue on this")


def save(state: TrainState, run: Run, out_dir: Path, extra: dict[str, Any] | None = None,
         background: bool = False) -> sharded.Pending | None:
    """The checkpoint: in shards on several processes (`run.sharded`; with `background`, a
    Pending to commit), else one file."""
    if sharded.wanted(run.dist):
        written = sharded.save(run.model, state.optimizer, {
            **small_state(state, run), "fingerprint": fingerprint(run), **(extra or {})},
            out_dir, run.dist, state.progress.step, asynchronous=background,
            keep=run.cfg.train.keep_checkpoints)
        return written if isinstance(written, sharded.Pending) else None
    saved = checkpoint(state, run)
    if run.dist.is_main:
        atomic_save({**saved, "fingerprint": fingerprint(run), **(extra or {})},
                    out_dir / CHECKPOINT_NAME)


def _check_structure(saved: Any, path: Path, weights: bool = True) -> None:
    if not isinstance(saved, dict):
        raise LeantrainError(f"{path} is not a leantrain training checkpoint (it holds a "
                             f"{type(saved).__name__}, not the run's state)")
    for key, kind in _REQUIRED.items():
        if not weights and key in ("model", "optimizer"):
            continue  # (in the shards beside it)
        if not isinstance(saved.get(key), kind):
            what = "missing" if key not in saved else f"a {type(saved[key]).__name__}"
            raise LeantrainError(f"{path} is not a leantrain training checkpoint: its "
                                 f"{key!r} entry is {what}")


def restore(state: TrainState, run: Run, saved: dict[str, Any], path: Path,
            data_changed: bool = False, shards: Path | None = None) -> None:
    """Load a checkpoint into `state` and the run's model, and this rank's RNG, after checking
    that it is one, that the run has not changed since (`check_fingerprint`) and that every
    entry is what this run would have written (`run.saved`): nothing is applied before.
    `shards`: the folder of a sharded checkpoint (`run.sharded`), whose model and optimizer
    are read into this run's layout, whatever the layout that wrote them."""
    _check_structure(saved, path, weights=shards is None)
    saved = {**saved, "progress": _in_loader_batches(saved["progress"], run, path)}
    if shards is None and run.pipeline is not None:  # (its optimizer state is by position)
        raise LeantrainError(f"{path} is one process's checkpoint: pipeline stages resume "
                             "from sharded checkpoints only (a run under leantrain launch "
                             "writes them); resume it on one process")
    if "fingerprint" in saved:
        check_fingerprint(saved["fingerprint"], run, path, data_changed)
    else:
        log.warning("resume %s: the checkpoint predates fingerprints; changes to the config "
                    "cannot be detected", path.parent)
    saved_checkpoint.check(saved, state, run, path, weights=shards is None)
    if shards is not None:
        sharded.verify(shards, saved.get("shards"), run.dist)
    try:
        if shards is None:
            distributed.load_full_state(run.model, state.optimizer, run.plan.distributed,
                                        saved["model"], saved["optimizer"])
        else:
            sharded.load(run.model, state.optimizer, shards)
        state.scheduler.load_state_dict(saved["scheduler"])
        # the learning rate the schedule last set, whatever the optimizer's groups came back
        # with (a sharded load can return a group without its numbers: `sharded.load`)
        for group, lr in zip(state.optimizer.param_groups, state.scheduler.get_last_lr(),
                             strict=True):
            group["lr"] = lr
        if state.scaler and saved["scaler"]:
            state.scaler.load_state_dict(saved["scaler"])
        state.progress = Progress(**saved["progress"])
        _restore_streams(state, run, saved, path)
    except LeantrainError:
        raise
    except Exception as exc:  # (what the checks above do not foresee: still one line)
        raise LeantrainError(f"{path} cannot be resumed: {one_line(exc)}") from exc


def _in_loader_batches(progress: Any, run: Run, path: Path) -> Any:
    """A checkpoint's place in its epoch counts batches of data.batch_size, whatever the
    layout; a pipeline's loader batch holds `microbatches` of them (it resumes a run of one
    process at a step boundary, and one process resumes it)."""
    unit = run.plan.microbatches
    if unit == 1 or not isinstance(progress, dict) or type(progress.get("batch")) is not int:
        return progress  # (a malformed entry is named by the checks that follow)
    if progress["batch"] % unit:
        raise LeantrainError(f"resume {path.parent}: its checkpoint is {progress['batch']} "
                             f"batches into the epoch, not a whole pipeline step of {unit}")
    return {**progress, "batch": progress["batch"] // unit}


def _restore_streams(state: TrainState, run: Run, saved: dict[str, Any], path: Path) -> None:
    """This rank's RNG and partial epoch sums. On another number of processes than wrote the
    checkpoint, the streams are seeded afresh per rank and the epoch's sums are carried by
    rank 0: the model and optimizer continue exactly, the random draws do not."""
    rng = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]
    sums = saved["epoch_sums"]
    sums = sums if isinstance(sums[0], list) else [sums]
    rank, world = run.dist.rank, run.dist.world_size
    device = run.plan.device
    written, data = len(rng), (saved.get("fingerprint") or {}).get("data_world", len(rng))
    if written == world and data == run.dist.data_world:  # the same layout: exactly
        restore_rng(rng[rank])
        state.epoch_sums = [t.to(device) for t in sums[rank]]
        return
    seed_everything(run.cfg.train.seed * 1_000_003 + state.progress.step * 101 +
                    run.dist.data_rank)  # (one stream per tensor-parallel group)
    copies = max(written // max(data, 1), 1)  # (a tensor-parallel group's sums are alike)
    totals = [sum(part[i] for part in sums) for i in range(len(sums[0]))]
    totals = [t / copies if copies > 1 else t for t in totals]
    # carried by one rank of each group the sums are reduced over
    state.epoch_sums = [(t if run.dist.data_rank == 0 else torch.zeros_like(t)).to(device)
                        for t in totals]
    if run.dist.is_main:
        log.warning("resume %s: written by %d process(es), resumed on %d: the model and "
                    "optimizer are resharded exactly and the data continues at the same "
                    "sample, but the random streams are seeded afresh, so the run is no longer "
                    "bit-identical to one never interrupted", path.parent, len(rng), world)
