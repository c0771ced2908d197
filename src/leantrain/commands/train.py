"""`leantrain train`: train a model with this machine's plan and print the run summary."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import LeantrainError
from . import common

EXAMPLES = """examples:
  leantrain train                                   # digits-cnn with this machine's default plan
  leantrain train --target-acc 0.97                 # stop at 97%% validation accuracy
  leantrain train --config run.yaml --set optim.lr=0.05 --set plan.precision=fp32
  leantrain train --model mypkg.nets:build --data mypkg.data:load --out runs/mine
  leantrain train --data features.csv --set data.label_column=target
  leantrain train --resume runs/mine                # continue a killed run
  leantrain train --out runs/mine --resume auto     # continue it if it has a checkpoint
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train a model with this machine's fastest safe plan",
        description="Train a model (default: recipe digits-cnn) and print a summary table.",
        epilog=EXAMPLES, formatter_class=common.RAW)
    common.add_train_args(p)


def run_folder(args: argparse.Namespace) -> Path:
    """The run's folder: the one to resume, or a new one that holds no run yet (`fit` checks
    and locks it: `run.folder`)."""
    return Path(args.resume) if args.resume else common.default_out(args)


def _auto_resume(args: argparse.Namespace) -> bool:
    """`--resume auto --out DIR`: the command that started the run continues it when DIR holds
    a checkpoint (the config from its flags, which a resume may not change), else starts it.
    A job torchrun restarts (`launch --max-restarts`) runs exactly this."""
    from ..run import folder

    if not args.out:
        raise LeantrainError("--resume auto needs --out DIR: the folder whose run to continue "
                             "or start")
    args.resume = None
    found = folder.checkpoint_of(Path(args.out)) if Path(args.out).is_dir() else None
    restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restarts != "0":
        common.log.warning("restart %s of the job (torchrun): %s", restarts,
                           f"continuing from {found}" if found else "no checkpoint yet: "
                           "starting the run afresh")
    return found is not None


def run(args: argparse.Namespace, dist) -> int:
    from ..checkpoint import require_recorded_hash
    from ..data import load_data
    from ..measure.report import format_summary
    from ..run import folder
    from ..run.fit import fit

    resume = _auto_resume(args) if args.resume == "auto" else bool(args.resume)
    out = run_folder(args)
    if dist.is_main:  # before the data loads: a wrong folder fails at once (rank 0 writes)
        folder.check(out, resume, verify=False)
    cfg = common.config_from_args(args)  # flags and folder code refused before the hash
    if resume and not args.no_verify:
        require_recorded_hash(folder.checkpoint_of(out) or out)  # before the data load
    bundle = load_data(cfg.data)
    common.log.info("data: %s", bundle.description)
    model = common.build_model(cfg, bundle)
    summary = fit(model, bundle.train, bundle.val, cfg, out, resume=resume,
                  progress_bar=not args.no_progress, collate_fn=bundle.collate_fn,
                  verify=not args.no_verify, data_changed=args.data_changed)
    if dist.is_main:
        print(format_summary(summary))
        print(f"\nrun folder: {out}")
    return 0
