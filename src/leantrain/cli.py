"""Command line: argument parsing only; every decision lives in the layers below.

A `LeantrainError` (bad input) is printed as one line and exits with status 2; `--debug`
shows its traceback too. Any other exception keeps its traceback: it is a bug.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .bench import find_batch_size, find_lr, run_bench
from .bench.report import (
    BENCH_JSON,
    BENCH_PNG,
    PLAN_YAML,
    format_batch_sizes,
    format_bench,
    format_lr,
    write_batch_sizes,
    write_bench,
    write_lr,
)
from .bench.search import LOSSY_TOL
from .checkpoint import CHECKPOINT_NAME, atomic_write_text, load_checkpoint
from .compress.distill import check_kd_args
from .compression import (
    PRUNE_METHODS,
    CompressArgs,
    format_compression,
    load_trained,
    run_compression,
)
from .config import TrainConfig, load_config, merge, read_plan_file, read_yaml
from .data import load_data
from .data.text import VOCAB
from .distillation import format_report, load_teacher, run_distillation
from .distributed import DistContext, die_with_launcher, teardown
from .doctor import format_doctor, run_doctor
from .errors import LeantrainError
from .imports import import_object
from .launch import launch
from .measure.report import format_summary
from .recipes import RECIPES, get_recipe
from .recipes.gpt import generate
from .recipes.models import default_model
from .trainer import CONFIG_NAME, MODEL_NAME, fit

log = logging.getLogger("leantrain")

EXAMPLES = """examples:
  leantrain train                                   # digits-cnn with this machine's default plan
  leantrain train --target-acc 0.97                 # stop at 97%% validation accuracy
  leantrain train --config run.yaml --set optim.lr=0.05 --set plan.precision=fp32
  leantrain train --model mypkg.nets:build --data mypkg.data:load --out runs/mine
  leantrain train --data features.csv --set data.label_column=target
  leantrain train --resume runs/mine                # continue a killed run
"""


def _add_source_args(p: argparse.ArgumentParser) -> None:
    """What to train on: shared by every command that builds a model and data."""
    p.add_argument("--recipe", default="digits-cnn", choices=sorted(RECIPES),
                   help="named setup to start from (default: digits-cnn)")
    p.add_argument("--config", metavar="FILE",
                   help="YAML config; keys as in `config.yaml` of a run")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, repeatable, e.g. --set optim.lr=0.05")
    p.add_argument("--model", metavar="MOD:FN",
                   help="your model: a function returning an nn.Module, e.g. mypkg.nets:build")
    p.add_argument("--data", metavar="SOURCE",
                   help="digits | a .npz (x, y) | a .csv (label column) | an image folder "
                        "(class subfolders) | MOD:FN returning (train_dataset, val_dataset)")
    p.add_argument("--epochs", type=int, metavar="N", help="number of epochs")
    p.add_argument("--device", metavar="DEV", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--out", metavar="DIR", help="output folder (default: runs/<timestamp>)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_plan_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", metavar="FILE",
                   help="a plan file written by `leantrain bench` (or a finder's --apply)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    _add_source_args(p)
    _add_plan_arg(p)
    p.add_argument("--target-acc", type=float, metavar="X",
                   help="stop as soon as validation accuracy reaches X (e.g. 0.97)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="mixed precision mode (default: auto = bf16 where native)")
    p.add_argument("--compile", action="store_true", help="use torch.compile (opt-in)")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR from its last checkpoint (its own config)")


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    _add_source_args(p)
    p.add_argument("--budget-s", type=float, default=180.0, metavar="S",
                   help="cap on the whole bench in seconds (default 180)")
    p.add_argument("--apply", metavar="FILE",
                   help="also write the winning plan to FILE (use it: train --plan FILE)")
    p.add_argument("--loss-tol", type=float, default=LOSSY_TOL, metavar="X",
                   help=f"relative loss divergence allowed for lossy techniques over the "
                        f"checked steps (default {LOSSY_TOL})")
    p.add_argument("--keep-batch-size", action="store_true",
                   help="do not run the batch-size finder; keep data.batch_size")


def _add_finder_args(p: argparse.ArgumentParser, what: str) -> None:
    _add_source_args(p)
    _add_plan_arg(p)
    p.add_argument("--apply", metavar="FILE",
                   help=f"write the suggested {what} into the plan file FILE (created or updated)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leantrain", description="Faster, smaller, cheaper PyTorch training, measured.")
    parser.add_argument("--version", action="version", version=f"leantrain {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train", help="train a model with this machine's fastest safe plan",
        description="Train a model (default: recipe digits-cnn) and print a summary table.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_train_args(train)
    distill = sub.add_parser(
        "distill", help="train a small student from a trained teacher (knowledge distillation)",
        description="Train the student alone and with KD from the teacher; report accuracy, "
                    "parameters and CPU latency of all three.",
        epilog="example:\n  leantrain train --out runs/teacher\n  leantrain distill --teacher "
               "runs/teacher/model.pt --student-model leantrain.recipes.models:digits_student",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_train_args(distill)
    distill.add_argument("--teacher", required=True, metavar="CKPT",
                         help="teacher weights: a model.pt state_dict or its run folder")
    distill.add_argument("--teacher-model", metavar="MOD:FN",
                         help="teacher architecture (default: the recipe's model)")
    distill.add_argument("--student-model", required=True, metavar="MOD:FN",
                         help="student architecture, e.g. leantrain.recipes.models:digits_student")
    distill.add_argument("--temperature", type=float, default=4.0, help="T (default 4)")
    distill.add_argument("--alpha", type=float, default=0.9,
                         help="weight of the soft (KD) term, in [0, 1] (default 0.9)")
    distill.add_argument("--no-cache", action="store_true",
                         help="run the teacher live every step instead of caching its logits")
    bench = sub.add_parser(
        "bench", help="measure every technique on your model and pick the fastest safe plan",
        description="Time the baseline (plain fp32 eager loop, per-sample DataLoader), each "
                    "technique alone and combinations, check their losses against the "
                    "baseline, then tune the batch size under the winner. Writes bench.json, "
                    "bench.png, plan.yaml and baseline.yaml to --out.",
        epilog="example:\n  leantrain bench --budget-s 180 --out runs/bench\n"
               "  leantrain train --plan runs/bench/plan.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_bench_args(bench)
    find_bs = sub.add_parser(
        "find-batch-size", help="the fastest batch size that fits, from sizes it really ran",
        description="Double the batch size until it no longer fits (out of memory or over the "
                    "memory limit less a 10%% margin), bisect, time every size, and recommend "
                    "the fastest; the learning rate is scaled by a stated rule.")
    _add_finder_args(find_bs, "batch size and learning rate")
    find_bs.add_argument("--memory-limit-gib", type=float, metavar="G",
                         help="memory the process may use (default: what the device or "
                              "machine has)")
    find_bs.add_argument("--max-size", type=int, metavar="N", help="largest size to try")
    find_lr_cmd = sub.add_parser(
        "find-lr", help="learning-rate range test with a suggested LR and its curve (PNG)",
        description="Raise the LR exponentially from --lr-min to --lr-max, stop early when the "
                    "loss diverges, suggest an LR and save the curve.")
    _add_finder_args(find_lr_cmd, "learning rate")
    find_lr_cmd.add_argument("--lr-min", type=float, default=1e-5)
    find_lr_cmd.add_argument("--lr-max", type=float, default=10.0)
    find_lr_cmd.add_argument("--steps", type=int, default=100, help="sweep length (default 100)")
    doctor = sub.add_parser(
        "doctor", help="what this machine has, where your step time goes, what to try",
        description="Report this machine (versions, GPUs, bf16/TF32, CPU and SIMD, whether "
                    "torch.compile works, distributed backends), then train the model a few "
                    "steps: samples/s, step-time breakdown, MFU, the top operators and a Chrome "
                    "trace, and ranked recommendations marked measured or unmeasured.",
        epilog="examples:\n  leantrain doctor\n  leantrain doctor --model mypkg.nets:build "
               "--data mypkg.data:load --out runs/doctor",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_source_args(doctor)
    _add_plan_arg(doctor)
    doctor.add_argument("--steps", type=int, default=20, metavar="N",
                        help="timed steps, and as many profiled ones (default 20)")
    doctor.add_argument("--no-profile", action="store_true", help="skip the profiler and trace")
    doctor.add_argument("--no-compile-check", action="store_true",
                        help="do not compile a test function to check torch.compile")
    launch_cmd = sub.add_parser(
        "launch", help="run `train` on several processes (torchrun: DDP or FSDP2)",
        description="Start N processes per node with torchrun, each running the leantrain "
                    "command after `--`. The plan picks DDP (default) or FSDP2 "
                    "(--set plan.distributed=fsdp). If any rank fails, the job stops and "
                    "exits non-zero, naming the rank.",
        epilog="examples:\n  leantrain launch --nproc 2 -- train --epochs 3\n"
               "  # two nodes, run on each with its --node-rank:\n"
               "  leantrain launch --nproc 8 --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 "
               "--master-port 29500 -- train --out runs/big",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    launch_cmd.add_argument("--nproc", type=int, required=True, metavar="N",
                            help="processes per node (one per GPU on GPU machines)")
    launch_cmd.add_argument("--nnodes", type=int, default=1, metavar="M")
    launch_cmd.add_argument("--node-rank", type=int, default=0, metavar="R")
    launch_cmd.add_argument("--master-addr", metavar="A", help="address of node 0")
    launch_cmd.add_argument("--master-port", type=int, metavar="P")
    launch_cmd.add_argument("launched", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                            help="-- then the leantrain command to run, e.g. -- train --epochs 3")
    compress = sub.add_parser(
        "compress", help="separable convs, pruning, int8: a smaller model and a before/after "
                         "report",
        description="Load trained weights, apply the steps asked for (fine-tuning with the "
                    "trainer where a step needs it) and report parameters, multiply-adds, file "
                    "size, CPU latency (batch 1 and 64) and accuracy after each stage.",
        epilog="example:\n  leantrain train --out runs/base\n  leantrain compress --checkpoint "
               "runs/base/model.pt --prune 0.5 --out runs/small",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_source_args(compress)
    compress.add_argument("--checkpoint", required=True, metavar="MODEL_PT",
                          help="trained weights: a model.pt state_dict or its run folder")
    compress.add_argument("--separable", action="store_true",
                          help="convert eligible 3x3 convs to depthwise-separable, retrain")
    compress.add_argument("--prune", type=float, metavar="RATIO",
                          help="share of channels (structured) or weights (unstructured)")
    compress.add_argument("--prune-method", default="structured", choices=PRUNE_METHODS)
    compress.add_argument("--quantize", choices=["int8"], help="torchao int8 on Linear layers")
    compress.add_argument("--finetune-epochs", type=int, default=4, metavar="N")
    compress.add_argument("--finetune-lr", type=float, default=0.05, metavar="LR")
    gen = sub.add_parser(
        "generate", help="sample text from a trained byte-level language model (text-gpt)",
        description="Load a text run's model and continue the prompt byte by byte.",
        epilog="example:\n  leantrain train --recipe text-gpt --out runs/gpt\n"
               "  leantrain generate --checkpoint runs/gpt --prompt 'def main('",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    gen.add_argument("--checkpoint", required=True, metavar="DIR", help="the run folder")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--tokens", type=int, default=200, metavar="N", help="bytes to add")
    gen.add_argument("--temperature", type=float, default=0.8, metavar="T",
                     help="0 = greedy (default 0.8)")
    gen.add_argument("--top-k", type=int, default=40, metavar="K")
    gen.add_argument("--seed", type=int, default=0)
    for sub_parser in (train, distill, bench, find_bs, find_lr_cmd, doctor, launch_cmd,
                       compress, gen):
        sub_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                help="show tracebacks and debug logs")
    return parser


def _shortcut_overrides(args: argparse.Namespace) -> dict:
    """The convenience flags, as config values (they win over --config and --set)."""
    values: dict = {}
    flag = vars(args).get
    pairs = [
        ("model", None, flag("model")), ("data", "source", flag("data")),
        ("train", "target_acc", flag("target_acc")), ("train", "epochs", flag("epochs")),
        ("plan", "device", flag("device")), ("plan", "precision", flag("precision")),
        ("plan", "compile", True if flag("compile") else None),
    ]
    for section, key, value in pairs:
        if value is None:
            continue
        if key is None:
            values[section] = value
        else:
            values.setdefault(section, {})[key] = value
    return values


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """recipe < --config < --plan < --set < shortcut flags; --resume: the run's own config."""
    if vars(args).get("resume"):
        given = [flag for flag, value in [("--config", args.config), ("--set", args.overrides),
                                          ("--model", args.model), ("--data", args.data),
                                          ("--plan", args.plan), ("--out", args.out)] if value]
        if given:
            raise LeantrainError(f"--resume continues with the run's own config; drop {given}")
        return load_config(Path(args.resume) / CONFIG_NAME)
    recipe = get_recipe(args.recipe)
    base = merge({"recipe": recipe.name}, recipe.config)
    if args.config:
        base = merge(base, read_yaml(args.config))
    if vars(args).get("plan"):
        base = merge(base, read_plan_file(args.plan))
    cfg = load_config(None, args.overrides, base)
    return load_config(None, (), merge(cfg.to_dict(), _shortcut_overrides(args)))


def build_model(cfg: TrainConfig, bundle) -> nn.Module:
    """The user's model if named, the recipe's on the recipe's data, else a default for the data."""
    if cfg.model:
        return _build_from(cfg.model, "--model", cfg.train.seed)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every run and resume
    recipe = get_recipe(cfg.recipe)
    text = cfg.data.context is not None
    if (recipe.text and text) or cfg.data.source == recipe.config.get("data", {}).get("source"):
        return recipe.build_model(bundle.num_classes, cfg)
    if text:
        raise LeantrainError("text data (data.context set) needs a language model: "
                             "--recipe text-gpt, or --model MOD:FN")
    sample = bundle.train[0][0]
    if bundle.num_classes is None:
        raise LeantrainError("with --data MOD:FN, also pass --model MOD:FN (the number of "
                             "classes cannot be known from the datasets alone)")
    log.info("no --model given: using a default model for samples of shape %s",
             tuple(sample.shape))
    return default_model(torch.as_tensor(sample), bundle.num_classes)


def _out_dir(args: argparse.Namespace) -> Path:
    if args.resume:
        folder = Path(args.resume)
        if not (folder / CHECKPOINT_NAME).is_file():
            raise LeantrainError(f"--resume {folder}: no {CHECKPOINT_NAME} in that folder")
        return folder
    folder = Path(args.out) if args.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if (folder / CHECKPOINT_NAME).exists():
        raise LeantrainError(f"{folder} already holds a run; continue it with --resume {folder} "
                             "or choose another --out")
    return folder


def cmd_train(args: argparse.Namespace) -> int:
    out = _out_dir(args)
    cfg = config_from_args(args)
    bundle = load_data(cfg.data)
    log.info("data: %s", bundle.description)
    model = build_model(cfg, bundle)
    summary = fit(model, bundle.train, bundle.val, cfg, out, resume=bool(args.resume),
                  progress_bar=not args.no_progress)
    if DistContext.from_env().is_main:
        print(format_summary(summary))
        print(f"\nrun folder: {out}")
    return 0


def _build_from(spec: str, what: str, seed: int) -> nn.Module:
    """Call the user's MOD:FN after seeding: every run and resume starts from the same weights."""
    torch.manual_seed(seed)
    model = import_object(spec, what)()
    if not isinstance(model, nn.Module):
        raise LeantrainError(f"{what} {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def cmd_distill(args: argparse.Namespace) -> int:
    if args.resume:
        raise LeantrainError("distill does not support --resume yet; start it again")
    check_kd_args(args.temperature, args.alpha)
    cfg = config_from_args(args)
    out = Path(args.out) if args.out else Path("runs") / time.strftime("distill-%Y%m%d-%H%M%S")
    bundle = load_data(cfg.data)
    teacher = _build_from(args.teacher_model, "--teacher-model", cfg.train.seed) \
        if args.teacher_model else build_model(cfg, bundle)
    teacher = load_teacher(teacher, args.teacher)
    _build_from(args.student_model, "--student-model", cfg.train.seed)  # fail fast, write nothing
    report = run_distillation(
        teacher, lambda: _build_from(args.student_model, "--student-model", cfg.train.seed),
        bundle, cfg, out, args.temperature, args.alpha, cache=not args.no_cache,
        progress_bar=not args.no_progress)
    print(format_report(report))
    print(f"\nreport: {out / 'report.json'}")
    return 0


def _bench_inputs(args: argparse.Namespace, prefix: str):
    cfg = config_from_args(args)
    out = Path(args.out) if args.out else Path("runs") / time.strftime(f"{prefix}-%Y%m%d-%H%M%S")
    bundle = load_data(cfg.data)
    log.info("data: %s", bundle.description)
    build_model(cfg, bundle)  # fail fast on a bad model, before any trial
    return cfg, out, bundle, lambda: build_model(cfg, bundle)


def cmd_bench(args: argparse.Namespace) -> int:
    cfg, out, bundle, builder = _bench_inputs(args, "bench")
    result = run_bench(builder, bundle, cfg, args.budget_s, args.loss_tol,
                       tune_batch_size=not args.keep_batch_size)
    apply_to = Path(args.apply) if args.apply else None
    write_bench(result, out, apply_to)
    print(format_bench(result))
    print(f"\nresults: {out / BENCH_JSON}, {out / BENCH_PNG}\nwinning plan: {out / PLAN_YAML}"
          + (f" and {apply_to}" if apply_to else "")
          + f"\ntrain with it: leantrain train --plan {apply_to or out / PLAN_YAML}")
    return 0


def cmd_find_batch_size(args: argparse.Namespace) -> int:
    cfg, out, bundle, builder = _bench_inputs(args, "batch-size")
    limit = int(args.memory_limit_gib * 2**30) if args.memory_limit_gib else None
    sizes = find_batch_size(builder, bundle, cfg, memory_limit=limit, max_size=args.max_size)
    write_batch_sizes(sizes, out, Path(args.apply) if args.apply else None)
    print(format_batch_sizes(sizes))
    print(f"\nresults: {out / 'batch_size.json'}")
    return 0


def cmd_find_lr(args: argparse.Namespace) -> int:
    cfg, out, bundle, builder = _bench_inputs(args, "lr")
    result = find_lr(builder, bundle, cfg, lr_min=args.lr_min, lr_max=args.lr_max,
                     steps=args.steps)
    write_lr(result, out, Path(args.apply) if args.apply else None)
    print(format_lr(result))
    print(f"\nresults: {out / 'lr_finder.json'}, curve: {out / 'lr_finder.png'}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise LeantrainError(f"--steps must be >= 1, got {args.steps}")
    cfg, out, bundle, builder = _bench_inputs(args, "doctor")
    report = run_doctor(builder, bundle, cfg, out, steps=args.steps,
                        profile=not args.no_profile, check_compile=not args.no_compile_check)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "doctor.json", json.dumps(report, indent=2, default=str))
    print(format_doctor(report))
    print(f"\nreport: {out / 'doctor.json'}")
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    command = args.launched[1:] if args.launched[:1] == ["--"] else args.launched
    return launch(args.nproc, args.nnodes, args.node_rank, args.master_addr, args.master_port,
                  command)


def cmd_compress(args: argparse.Namespace) -> int:
    options = CompressArgs(args.separable, args.prune, args.prune_method, args.quantize,
                           args.finetune_epochs, args.finetune_lr)
    options.check()
    cfg = config_from_args(args)
    out = Path(args.out) if args.out else Path("runs") / time.strftime("compress-%Y%m%d-%H%M%S")
    if out.exists() and any(out.iterdir()):
        raise LeantrainError(f"{out} is not empty; choose another --out")
    bundle = load_data(cfg.data)
    model = load_trained(build_model(cfg, bundle), args.checkpoint)
    report = run_compression(model, bundle, cfg, options, out, progress_bar=not args.no_progress)
    print(format_compression(report))
    print(f"\nreport: {out / 'report.json'}, {out / 'report.png'}; model: {out / 'model.pt'}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    run = Path(args.checkpoint)
    for name in (CONFIG_NAME, MODEL_NAME):
        if not (run / name).is_file():
            raise LeantrainError(f"--checkpoint {run}: no {name} there (pass a run folder of "
                                 "`leantrain train`)")
    if args.tokens < 1 or args.top_k < 1:
        raise LeantrainError("--tokens and --top-k must be >= 1")
    cfg = load_config(run / CONFIG_NAME)
    if cfg.data.context is None:
        raise LeantrainError(f"{run} is not a text run (data.context is not set): generate "
                             "needs a byte-level language model, e.g. --recipe text-gpt")
    recipe = get_recipe(cfg.recipe)
    model = _build_from(cfg.model, "--model", cfg.train.seed) if cfg.model \
        else recipe.build_model(VOCAB, cfg)
    model.load_state_dict(load_checkpoint(run / MODEL_NAME))
    prompt = torch.tensor(list(args.prompt.encode()), dtype=torch.long)
    out = generate(model, prompt, args.tokens, cfg.data.context, args.temperature, args.top_k,
                   torch.Generator().manual_seed(args.seed))
    print(bytes(out.tolist()).decode("utf-8", errors="replace"))
    return 0


COMMANDS = {"train": cmd_train, "distill": cmd_distill, "bench": cmd_bench,
            "find-batch-size": cmd_find_batch_size, "find-lr": cmd_find_lr, "doctor": cmd_doctor,
            "launch": cmd_launch, "compress": cmd_compress, "generate": cmd_generate}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ctx = DistContext.from_env()
    main_rank = ctx.is_main  # under launch, only rank 0 reports progress
    logging.basicConfig(level=logging.DEBUG if args.debug else
                        logging.INFO if main_rank else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if ctx.active:
        die_with_launcher()
    rc = 1
    try:
        rc = COMMANDS[args.command](args)
        return rc
    except LeantrainError as exc:
        if args.debug:
            raise
        print(f"leantrain: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leantrain: interrupted; a run with a checkpoint continues with --resume DIR",
              file=sys.stderr)
        return 130
    finally:
        teardown(ctx, succeeded=rc == 0)


if __name__ == "__main__":
    sys.exit(main())
