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


def run(args: argparse.Namespace, dist) -> int:
    from ..bench.report import BENCH_JSON, BENCH_PNG, PLAN_YAML, format_bench, write_bench
    from ..bench.search import check_arguments, run_bench

    check_arguments(args.budget_s, args.loss_tol)  # before the data and the model load
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
