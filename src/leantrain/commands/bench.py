"""`leantrain bench`: measure every technique on the user's model and write the winning plan."""

from __future__ import annotations

import argparse

from ..bench.tolerances import LOSSY_TOL
from . import common


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="measure every technique on your model and pick the fastest safe plan",
        description="Time the baseline (plain fp32 eager loop, per-sample DataLoader), each "
                    "technique alone and combinations, check their losses against the "
                    "baseline, then tune the batch size under the winner. Writes bench.json, "
                    "bench.png, plan.yaml and baseline.yaml to --out.",
        epilog="example:\n  leantrain bench --budget-s 180 --out runs/bench\n"
               "  leantrain train --plan runs/bench/plan.yaml",
        formatter_class=common.RAW)
    common.add_source_args(p)
    p.add_argument("--budget-s", type=float, default=180.0, metavar="S",
                   help="cap on the whole bench in seconds (default 180)")
    p.add_argument("--apply", metavar="FILE",
                   help="also write the winning plan to FILE (use it: train --plan FILE)")
    p.add_argument("--loss-tol", type=float, default=LOSSY_TOL, metavar="X",
                   help=f"relative loss divergence allowed for lossy techniques over the "
                        f"checked steps (default {LOSSY_TOL})")
    p.add_argument("--keep-batch-size", action="store_true",
                   help="do not run the batch-size finder; keep data.batch_size")
    p.add_argument("--layouts", type=int, metavar="N",
                   help="instead of the techniques, time the parallel layouts of a launch of "
                        "N processes (DDP, FSDP2, tensor and pipeline parallel) that fit, "
                        "each as real `launch --nproc N` jobs; writes layouts.json")
    p.add_argument("--rounds", type=int, default=3, metavar="R",
                   help="with --layouts: interleaved rounds (default 3: the fewest that give "
                        "an interval)")
    p.add_argument("--steps", type=int, default=20, metavar="S",
                   help="with --layouts: training steps each job times (default 20)")


def run(args: argparse.Namespace, dist) -> int:
    from ..bench.report import BENCH_JSON, BENCH_PNG, PLAN_YAML, format_bench, write_bench
    from ..bench.search import check_arguments, run_bench

    check_arguments(args.budget_s, args.loss_tol)  # before the data and the model load
    if args.layouts is not None:
        return _layouts(args)
    apply_to = common.check_apply(args.apply)
    cfg, out, bundle, builder = common.load_inputs(args, "bench")
    result = run_bench(builder, bundle, cfg, args.budget_s, args.loss_tol,
                       tune_batch_size=not args.keep_batch_size, started=args.started)
    write_bench(result, out, apply_to)
    common.mark_out(out, args.command)
    print(format_bench(result))
    print(f"\nresults: {out / BENCH_JSON}, {out / BENCH_PNG}\nwinning plan: {out / PLAN_YAML}"
          + (f" and {apply_to}" if apply_to else "")
          + f"\ntrain with it: leantrain train --plan {apply_to or out / PLAN_YAML}")
    return 0


MAX_LAYOUT_PROCESSES = 64  # every job is launched on this machine


def _layouts(args: argparse.Namespace) -> int:
    """bench --layouts N: the parallel layouts of a launch of N processes, timed."""
    from ..bench.layouts import LAYOUTS_JSON, bench_layouts, format_layouts
    from ..errors import LeantrainError

    if not 2 <= args.layouts <= MAX_LAYOUT_PROCESSES:
        raise LeantrainError(f"--layouts times launches of several processes on this machine: "
                             f"2..{MAX_LAYOUT_PROCESSES}, got {args.layouts}")
    if args.rounds < 1 or args.steps < 1:
        raise LeantrainError(f"--rounds and --steps must be >= 1, got {args.rounds} and "
                             f"{args.steps}")
    if args.apply:
        raise LeantrainError("--apply writes a plan of techniques; --layouts names the "
                             "launch settings of its fastest layout instead")
    cfg, out, bundle, builder = common.load_inputs(args, "bench")
    result = bench_layouts(builder, bundle, cfg, args.layouts, out, args.rounds, args.steps,
                           args.budget_s)
    common.mark_out(out, args.command)
    print("\n".join(format_layouts(result)))
    print(f"\nresults: {out / LAYOUTS_JSON}")
    return 0
