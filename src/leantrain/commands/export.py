"""`leantrain export`: one plain model file from a run's sharded checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import LeantrainError
from . import common


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="write one model file from a distributed run's sharded checkpoint",
        description="Consolidate the model weights of a run's last sharded checkpoint "
                    "(torch.distributed.checkpoint, written by a run on several processes) "
                    "into one plain state_dict file, in one process: the optimizer's state "
                    "is never read. Load it with torch.load(..., weights_only=True) or pass "
                    "it to compress, distill and generate. A finished run already has its "
                    "model.pt; this exports any checkpoint, a killed run's too.",
        epilog="example:\n  leantrain export runs/big       # runs/big/export-step-NNNNNNNN.pt\n"
               "  leantrain export runs/big --out big.pt --step 1200",
        formatter_class=common.RAW)
    p.add_argument("run", metavar="RUN", help="the run folder")
    p.add_argument("--out", metavar="FILE",
                   help="the file to write (default RUN/export-step-N.pt: a file the run "
                        "never reads)")
    p.add_argument("--step", type=int, metavar="N",
                   help="the checkpoint of this step (default: the last one)")


def run(args: argparse.Namespace, dist) -> int:
    from ..checkpoint import atomic_save
    from ..run import sharded

    folder = Path(args.run)
    shards = _checkpoint(folder, args.step)
    out = Path(args.out) if args.out else folder / f"export-{shards.name}.pt"
    common.fits_file_system(out, "--out")
    if out.is_dir():
        raise LeantrainError(f"--out {out} is a folder; give a file name")
    sharded.verify(shards, sharded.load_state(shards).get("shards"), dist)
    weights = sharded.model_weights(shards)
    atomic_save(weights, out)
    print(f"{out}: {len(weights)} tensors, {sum(w.numel() for w in weights.values()):,} values "
          f"from {shards}")
    return 0


def _checkpoint(folder: Path, step: int | None) -> Path:
    from ..run import sharded

    if not folder.is_dir():
        raise LeantrainError(f"{folder} is not a run folder")
    if step is None:
        found = sharded.latest(folder)
        if found is None:
            raise LeantrainError(f"{folder} holds no sharded checkpoint ({sharded.FOLDER}/"
                                 f"{sharded.LATEST}); a one-process run's model.pt is already "
                                 "one file")
        return found
    found = folder / sharded.FOLDER / f"step-{step:08d}"
    if not (found / sharded.STATE).is_file():
        kept = sorted(p.name for p in (folder / sharded.FOLDER).glob("step-*"))
        raise LeantrainError(f"{folder}: no checkpoint of step {step} (kept: "
                             f"{', '.join(kept) or 'none'})")
    return found
