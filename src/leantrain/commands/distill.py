"""`leantrain distill`: teacher vs student alone vs student with KD, trained by the same trainer.

It composes `fit` with the distillation loss (`losses.distillation`), so plans, checkpoints,
logs and resume apply to both student runs unchanged.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import LeantrainError
from . import common

REPORT_NAME = "report.json"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "distill", help="train a small student from a trained teacher (knowledge distillation)",
        description="Train the student alone and with KD from the teacher; report accuracy, "
                    "parameters and CPU latency of all three.",
        epilog="example:\n  leantrain train --out runs/teacher\n  leantrain distill --teacher "
               "runs/teacher/model.pt --student-model leantrain.recipes.models:digits_student",
        formatter_class=common.RAW)
    common.add_train_args(p)
    p.add_argument("--teacher", required=True, metavar="CKPT",
                   help="teacher weights: a model.pt state_dict or its run folder")
    p.add_argument("--teacher-model", metavar="MOD:FN",
                   help="teacher architecture (default: the recipe's model)")
    p.add_argument("--student-model", required=True, metavar="MOD:FN",
                   help="student architecture, e.g. leantrain.recipes.models:digits_student")
    p.add_argument("--temperature", type=float, metavar="T",
                   help="softening temperature, > 0 (default: 4 for one score per sample, 1 "
                        "for a score per token; each measured best, see the README)")
    p.add_argument("--alpha", type=float,
                   help="weight of the soft (KD) term, in [0, 1] (default: 0.9 per sample, "
                        "0.5 per token)")
    p.add_argument("--no-cache", action="store_true",
                   help="run the teacher live every step instead of caching its logits")
    p.add_argument("--feature-layers", metavar="S=T[,S=T]",
                   help="also match hidden states: student layer S to teacher layer T "
                        "(module names, e.g. blocks.1=blocks.3), through a learned projection")
    p.add_argument("--feature-weight", type=float, default=1.0, metavar="W",
                   help="weight of the feature-matching (MSE) term (default 1)")


def run(args: argparse.Namespace, dist) -> int:
    from ..data import load_data
    from ..losses.distillation import check_kd_args

    if args.resume:
        raise LeantrainError("distill does not support --resume yet; start it again")
    from ..losses.features import check_layers, check_weight, parse_pairs

    check_kd_args(args.temperature, args.alpha)
    pairs = parse_pairs(args.feature_layers) if args.feature_layers else None
    check_weight(args.feature_weight)
    cfg = common.config_from_args(args)
    out = common.default_out(args, "distill")
    bundle = load_data(cfg.data)
    seed = cfg.train.seed
    teacher = common.build_from(args.teacher_model, "--teacher-model", seed) \
        if args.teacher_model else common.build_model(cfg, bundle)
    teacher = common.load_weights(teacher, args.teacher, "teacher")
    student = common.build_from(args.student_model, "--student-model", seed)  # fail fast
    if pairs:
        check_layers(student, teacher, pairs)  # before anything is trained or written
    report = run_distillation(
        teacher, lambda: common.build_from(args.student_model, "--student-model", seed),
        bundle, cfg, out, args.temperature, args.alpha, cache=not args.no_cache,
        progress_bar=not args.no_progress, feature_pairs=pairs,
        feature_weight=args.feature_weight)
    print(format_report(report))
    print(f"\nreport: {out / REPORT_NAME}")
    return 0


def _describe(model, found: dict[str, Any], task: str, bundle) -> dict[str, Any]:
    """A row of the report: validation accuracy and the task's loss (perplexity for a
    language model, whose accuracy alone says little), size and CPU latency. The loss is the
    task's alone for every row: a model's own loss may hold auxiliary terms (a MoE's router
    loss) that the KD student's validation loss does not, and the rows must compare alike."""
    accuracy, loss = found["val_accuracy"], task_loss(found)
    from ..measure.latency import latency_seconds
    from ..run.measuring import measuring_call

    call = measuring_call(model, bundle.val, 64, bundle.collate_fn, channels_last=True)
    per_token = task in ("causal-lm", "seq2seq")
    return {"val_accuracy": accuracy, "val_loss": loss,
            "val_aux_loss": found.get("val_aux_loss"),
            "val_perplexity": math.exp(min(loss, 700.0)) if per_token and loss is not None
            else None,
            "parameters": sum(p.numel() for p in model.parameters()),
            "cpu_latency_batch64_ms": 1e3 * latency_seconds(model, call, channels_last=True)}


def task_loss(found: dict[str, Any]) -> float | None:
    """The task's validation loss alone: a model's own loss less its auxiliary terms."""
    loss = found.get("val_task_loss")
    return found.get("val_loss") if loss is None else loss


def run_distillation(teacher, build_student: Callable[[], Any], bundle, cfg, out: Path,
                     temperature: float | None = None, alpha: float | None = None,
                     cache: bool = True,
                     progress_bar: bool = True, feature_pairs: list[tuple[str, str]] | None = None,
                     feature_weight: float = 1.0) -> dict[str, Any]:
    """Teacher, student alone, student with KD (and feature matching on `feature_pairs`),
    each trained by `fit` under `out`. A temperature or alpha left None takes the measured
    default for the task's outputs (`losses.distillation.default_kd_args`)."""
    from ..checkpoint import atomic_save, atomic_write_text
    from ..data import make_loader
    from ..data.loaders import tensors_of
    from ..losses import distillation as kd
    from ..losses.features import FeatureMatch, detach_projections
    from ..run.fit import fit
    from ..run.plan import resolve_plan
    from ..run.step import metrics
    from ..run.summary import MODEL_NAME

    kd.check_kd_args(temperature, alpha)
    common.require_empty(out)
    plan = resolve_plan(cfg.plan, teacher)
    teacher = teacher.to(plan.device)
    val_loader = make_loader(bundle.val, cfg.data.eval_batch_size, False, device=plan.device,
                             collate_fn=bundle.collate_fn)
    student = build_student().to(plan.device)
    match = FeatureMatch(student, teacher, feature_pairs, feature_weight) \
        if feature_pairs else None
    # one batch through both: the task, the classes, and the hidden states' shapes
    teacher_step = _teacher_step(teacher, student, val_loader, plan, cfg.train.task)
    task = teacher_step.task
    defaulted = [name for name, value in (("temperature", temperature), ("alpha", alpha))
                 if value is None]
    default_temperature, default_alpha = kd.default_kd_args(task)
    temperature = default_temperature if temperature is None else temperature
    alpha = default_alpha if alpha is None else alpha
    if match is not None:
        match.attach_projections(student)
    taught = metrics(teacher, val_loader, teacher_step)
    train_data, cache_seconds, cache_note = bundle.train, None, "not asked (--no-cache)"
    if match is not None:
        cache_note = "feature distillation reads the teacher's hidden states: it runs live"
    elif cache and tensors_of(bundle.train) is not None \
            and not isinstance(tensors_of(bundle.train), dict):
        start = time.perf_counter()
        cached = kd.cache_teacher_logits(teacher, bundle.train, cfg.data.eval_batch_size,
                                         plan.device, plan.channels_last)
        if cached is not None:
            train_data, cache_seconds, cache_note = cached, time.perf_counter() - start, "cached"
        else:
            cache_note = "too large to cache: the teacher runs live every step"
    elif cache:
        cache_note = ("a dataset of dicts: the cache holds (input, label) tensors, so the "
                      "teacher runs live every step" if isinstance(tensors_of(bundle.train), dict)
                      else "not a tensor dataset: the teacher runs live every step")
    alone = fit(build_student(), bundle.train, bundle.val, cfg, out / "student_alone",
                progress_bar=progress_bar, collate_fn=bundle.collate_fn)
    with_kd = fit(student, train_data, bundle.val, cfg, out / "student_kd",
                  progress_bar=progress_bar, collate_fn=bundle.collate_fn,
                  loss_fn=kd.DistillationLoss(teacher, temperature, alpha, task, match))
    if match is not None:  # the projections were for training: model.pt is the student alone
        match.remove_hooks()
        detach_projections(student)
        atomic_save({k: v.detach().cpu() for k, v in student.state_dict().items()},
                    out / "student_kd" / MODEL_NAME)
    report = {
        "temperature": temperature, "alpha": alpha, "task": task,
        "defaulted": defaulted,  # the task's measured default, not given
        "feature_layers": [f"{s}={t}" for s, t in feature_pairs or []],
        "feature_weight": feature_weight if feature_pairs else None,
        "teacher_logits_cached": cache_seconds is not None, "cache": cache_note,
        "cache_seconds": cache_seconds,
        "teacher": _describe(teacher, taught, task, bundle),
        "student_alone": {**_describe(build_student(), alone, task, bundle),
                          "train_seconds": alone["train_seconds"]},
        "student_kd": {**_describe(student, with_kd, task, bundle),
                       "train_seconds": with_kd["train_seconds"]},
    }
    atomic_write_text(out / REPORT_NAME, json.dumps(report, indent=2))
    return report


def _teacher_step(teacher, student, loader, plan, task: str):
    """The teacher's step contract with its task (inferred from one batch, as the trainer
    infers it), after checking that the task has class scores to distil and that the student
    scores the same classes: before anything trains or is written."""
    from ..losses import tasks
    from ..run.step import check_first_batch, step_for

    checked, classes = check_first_batch(teacher, loader, step_for(teacher, plan, task))
    if checked.task not in tasks.CLASS_TASKS:
        what = "returns its own loss and no class scores ('logits')" \
            if checked.task == "model-loss" else f"is a {checked.task} model"
        raise LeantrainError(f"the teacher {what}: distillation matches class scores (tasks "
                             f"{', '.join(tasks.CLASS_TASKS)}), so there is nothing to distil")
    _, student_classes = check_first_batch(student, loader, step_for(student, plan,
                                                                     checked.task))
    if student_classes != classes:
        raise LeantrainError(f"the student scores {student_classes} classes and the teacher "
                             f"{classes}; distillation needs the same classes")
    return checked


def format_report(report: dict[str, Any]) -> str:
    from ..measure.report import table

    rows = []
    for name in ("teacher", "student_alone", "student_kd"):
        r = report[name]
        figures = [] if r.get("val_accuracy") is None else [f"acc {r['val_accuracy']:.2%}"]
        if r.get("val_loss") is not None:
            figures.append(f"loss {r['val_loss']:.4f}")
        if r.get("val_perplexity") is not None:
            figures.append(f"perplexity {r['val_perplexity']:.2f}")
        rows.append((name.replace("_", " "),
                     "   ".join([*figures, f"params {r['parameters']:,}",
                                 f"latency@64 {r['cpu_latency_batch64_ms']:.2f} ms"])))
    title = f"distillation (T={report['temperature']}, alpha={report['alpha']}"
    if report.get("feature_layers"):
        title += f", features {', '.join(report['feature_layers'])} x{report['feature_weight']}"
    title += ")"
    return table(rows, title)
