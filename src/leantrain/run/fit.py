"""`fit`: decide the run (measuring the "auto" choices that can lose), then train it."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from .. import tensor_parallel
from ..config import TrainConfig
from ..data.hf import torch_formatted
from ..data.sources import check_datasets
from ..distributed import DistContext
from ..errors import LeantrainError
from . import deciding, defaults, folder
from .checkpoints import written_by_several
from .plan import build
from .trainer import Trainer


def fit(model: nn.Module, train_data: Dataset, val_data: Dataset, cfg: TrainConfig | None = None,
        out_dir: str | Path | None = None, resume: bool = False, progress_bar: bool = True,
        loss_fn=None, collate_fn=None, watcher=None, verify: bool = True,
        data_changed: bool = False) -> dict[str, Any]:
    """Train `model` with the plan in `cfg`; returns the run summary.

    Batches may be tensors, tuples, dicts or nested ones; the model's own loss is used when it
    returns one, else the task's (see `run.step`); `loss_fn(outputs, labels, inputs, *extras)`
    replaces both. `collate_fn` batches the samples (e.g. a padding collator). The "auto"
    choices that can lose (precision, channels_last, optimizer kernels, then torch.compile) are
    measured first on runs long enough to pay (`run.defaults`, `run.compile_choice`). With
    `out_dir`, the run folder gets config.yaml (with the measured choices explicit),
    checkpoint.pt, metrics.jsonl, tensorboard/, model.pt (plain state_dict) and summary.json;
    `resume=True` continues from its checkpoint.
    `watcher` (a `run.records.Watcher`) sees each validation and may end the run early.
    `verify=False` resumes from a checkpoint whose SHA-256 is not recorded beside it;
    `data_changed=True` resumes on data other than the run started with (refused otherwise).
    """
    cfg = cfg or TrainConfig()
    train_data, val_data = (torch_formatted(d, collate_fn) for d in (train_data, val_data))
    check_datasets(train_data, val_data)
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise LeantrainError("resume needs the run folder (out_dir) that holds the checkpoint")
    # the folder is checked and locked before anything is measured or written (rank 0 writes)
    is_main = DistContext.from_env().is_main
    locked = folder.claim(out, resume, verify) if out is not None and is_main \
        else contextlib.nullcontext()
    with locked:
        decided = defaults.Decided(cfg, {}, None)
        if not resume:  # a resumed run continues with the choices its config.yaml holds
            decided = defaults.decide(cfg, model, train_data, val_data, loss_fn, collate_fn)
        run = build(decided.cfg, model, train_data, val_data, loss_fn, collate_fn=collate_fn,
                    notes=decided.notes, drop_last=resume and written_by_several(out))
        if out is not None:  # (the process group is up: every rank checks it sees the folder)
            folder.check_shared(out, run.dist)
        trial = deciding.PlanTrial(decided.pending, run, out) if decided.pending else None
        trainer = Trainer(run, out, progress_bar, watcher, trial)
        trainer.checkpoints.data_changed = data_changed
        with tensor_parallel.loss_parallel(run.plan.sp):
            return trainer.fit(resume=resume, plan_measurement=decided.record)
