"""`leantrain doctor`: this machine's facts, a short profile of the model, ranked advice."""

from __future__ import annotations

import argparse
import json

from ..errors import LeantrainError
from . import common


def add_parser(sub) -> None:
    p = sub.add_parser(
        "doctor", help="what this machine has, where your step time goes, what to try",
        description="Report this machine (versions, GPUs, bf16/TF32, CPU and SIMD, whether "
                    "torch.compile works, distributed backends), then train the model a few "
                    "steps: samples/s, step-time breakdown, MFU, the top operators and a Chrome "
                    "trace, and ranked recommendations marked measured or unmeasured.",
        epilog="examples:\n  leantrain doctor\n  leantrain doctor --model mypkg.nets:build "
               "--data mypkg.data:load --out runs/doctor",
        formatter_class=common.RAW)
    common.add_source_args(p)
    common.add_plan_arg(p)
    p.add_argument("--steps", type=int, default=20, metavar="N",
                   help="timed steps, and as many profiled ones (default 20)")
    p.add_argument("--no-profile", action="store_true", help="skip the profiler and trace")
    p.add_argument("--no-compile-check", action="store_true",
                   help="do not compile a test function to check torch.compile")
    p.add_argument("--ranks", type=int, metavar="N",
                   help="price memory per rank for a launch of N processes in all (nodes x "
                        "--nproc), under the plan's plan.distributed and plan.parallel")


def run(args: argparse.Namespace, dist) -> int:
    from ..bench.doctor import format_doctor, run_doctor
    from ..checkpoint import atomic_write_text
    from ..measure.load import LoadWatch

    if args.steps < 1:
        raise LeantrainError(f"--steps must be >= 1, got {args.steps}")
    cfg, out, bundle, builder = common.load_inputs(args, "doctor")
    cfg, layout = launch_layout(cfg, args.ranks, builder)
    with LoadWatch() as load:
        report = run_doctor(builder, bundle, cfg, out, steps=args.steps,
                            profile=not args.no_profile, check_compile=not args.no_compile_check,
                            layout=layout)
    report["load"] = load.reading.to_dict()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "doctor.json", json.dumps(report, indent=2, default=str))
    common.mark_out(out, args.command)
    print(format_doctor(report))
    print(f"\nreport: {out / 'doctor.json'}")
    return 0


MAX_RANKS = 1 << 20  # a launch priced per rank may span a cluster, not this machine


def launch_layout(cfg, ranks: int | None, build_model):
    """(the config doctor runs in this one process, the launch of `ranks` processes to price
    per rank): the plan's distributed settings describe the launch, so the probe runs
    without them. A tensor-parallel layout is checked against the model's plan here."""
    from dataclasses import replace

    from ..bench.memory_estimate import Layout
    from ..config import ParallelConfig
    from ..distributed import replica_groups
    from ..tensor_parallel import split_share

    if ranks is None:
        return cfg, None
    if not 2 <= ranks <= MAX_RANKS:
        raise LeantrainError(f"--ranks prices a launch of several processes: 2..{MAX_RANKS}, "
                             f"got {ranks}")
    parallel = cfg.plan.parallel
    plan = replace(cfg.plan, distributed="auto", parallel=ParallelConfig())
    # (a user's own plan splits layers doctor cannot know: they are priced whole)
    def split() -> float:
        return split_share(build_model(), parallel.tp) \
            if parallel.tp > 1 and parallel.tp_plan is None else 0.0

    if parallel.pp > 1:
        return replace(cfg, plan=plan), _pipeline_layout(cfg, ranks, split)
    requested = cfg.plan.distributed  # (as a launch resolves it: auto is FSDP2 under tp)
    strategy = "fsdp" if requested == "fsdp" or (requested == "auto" and parallel.tp > 1) \
        else "ddp"
    replicas = replica_groups(parallel.dp_replicate, parallel.dp_shard, strategy, ranks,
                              parallel.tp)
    layout = Layout(ranks, strategy, replicas, cfg.train.async_checkpoint, parallel.tp, split())
    return replace(cfg, plan=plan), layout


def _pipeline_layout(cfg, ranks: int, split):
    """Pipeline stages over `ranks` processes, each stage's layers split over tp of them
    (the model's plan splits `split()` of its weights): processes / (pp x tp) pipelines, each
    stage FSDP2-sharded over them; the micro-batches are plan.grad_accum. The refusals a
    launch would give come first."""
    from ..bench.memory_estimate import Layout

    parallel = cfg.plan.parallel
    if ranks % (parallel.pp * parallel.tp) or parallel.dp_replicate > 1:
        raise LeantrainError(f"--ranks {ranks} with plan.parallel.pp={parallel.pp}: the "
                             f"processes must be a multiple of pp x tp "
                             f"({parallel.pp * parallel.tp}), without dp_replicate (pipeline "
                             "stages with hybrid sharding are not built yet)")
    pipelines = ranks // parallel.pp // parallel.tp
    return Layout(ranks, "fsdp" if pipelines > 1 else "pp", async_save=cfg.train.async_checkpoint,
                  tp=parallel.tp, split=split(), pp=parallel.pp, schedule=parallel.pp_schedule,
                  microbatches=cfg.plan.grad_accum)
