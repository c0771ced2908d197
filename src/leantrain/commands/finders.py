"""`leantrain find-batch-size` and `leantrain find-lr`: the two finders, each a short measured
sweep through the trainer's real step, with `--apply` to write the answer into a plan file."""

from __future__ import annotations

import argparse
import math

from ..errors import LeantrainError
from . import common


def _add_finder_args(p: argparse.ArgumentParser, what: str) -> None:
    common.add_source_args(p)
    common.add_plan_arg(p)
    p.add_argument("--apply", metavar="FILE",
                   help=f"write the suggested {what} into the plan file FILE (created or updated)")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "find-batch-size", help="the fastest batch size that fits, from sizes it really ran",
        description="Double the batch size until it no longer fits (out of memory or over the "
                    "memory limit less a 10%% margin), bisect, time every size, and recommend "
                    "the fastest; the learning rate is scaled by a stated rule.")
    _add_finder_args(p, "batch size and learning rate")
    p.add_argument("--memory-limit-gib", type=float, metavar="G",
                   help="memory the process may use (default: what the device or machine has)")
    p.add_argument("--max-size", type=int, metavar="N", help="largest size to try")
    p = sub.add_parser(
        "find-lr", help="learning-rate range test with a suggested LR and its curve (PNG)",
        description="Raise the LR exponentially from --lr-min to --lr-max, stop early when the "
                    "loss diverges, suggest an LR and save the curve.")
    _add_finder_args(p, "learning rate")
    p.add_argument("--lr-min", type=float, default=1e-5)
    p.add_argument("--lr-max", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=100, help="sweep length (default 100)")


def _find_batch_size(args: argparse.Namespace) -> None:
    from ..bench.batch_size import find_batch_size
    from ..bench.memory_estimate import estimate
    from ..bench.report import format_batch_sizes, write_batch_sizes
    from ..measure.load import LoadWatch

    if args.max_size is not None and args.max_size < 1:
        raise LeantrainError(f"--max-size must be >= 1, got {args.max_size}")
    gib = args.memory_limit_gib
    if gib is not None and not 0 < gib < math.inf:  # (NaN fails this too)
        raise LeantrainError(f"--memory-limit-gib must be a finite number > 0, got {gib}")
    apply_to = common.check_apply(args.apply)
    cfg, out, bundle, builder = common.load_inputs(args, "batch-size")
    limit = int(gib * 2**30) if gib is not None else None
    with LoadWatch() as load:
        sizes = find_batch_size(builder, bundle, cfg, memory_limit=limit, max_size=args.max_size)
    sizes.load = load.reading.to_dict()
    sizes.memory = estimate(builder, bundle, cfg, room=limit)
    write_batch_sizes(sizes, out, apply_to)
    common.mark_out(out, args.command)
    print(format_batch_sizes(sizes))
    print(f"\nresults: {out / 'batch_size.json'}")


def _find_lr(args: argparse.Namespace) -> None:
    from ..bench.lr_finder import find_lr
    from ..bench.report import format_lr, write_lr

    apply_to = common.check_apply(args.apply)
    cfg, out, bundle, builder = common.load_inputs(args, "lr")
    result = find_lr(builder, bundle, cfg, lr_min=args.lr_min, lr_max=args.lr_max,
                     steps=args.steps)
    write_lr(result, out, apply_to)
    common.mark_out(out, args.command)
    print(format_lr(result))
    print(f"\nresults: {out / 'lr_finder.json'}, curve: {out / 'lr_finder.png'}")


def run(args: argparse.Namespace, dist) -> int:
    (_find_batch_size if args.command == "find-batch-size" else _find_lr)(args)
    return 0
