"""`leantrain distill`: teacher vs student alone vs student with KD, trained by the same trainer.

Lives beside the trainer (it composes `fit` with the distillation loss from `compress/`), so
plans, checkpoints, logs and resume apply to both student runs unchanged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import atomic_write_text, load_checkpoint
from .compress.distill import DistillationLoss, cache_teacher_logits, check_kd_args
from .config import TrainConfig
from .data import DataBundle, make_loader
from .errors import LeantrainError
from .measure.latency import latency_seconds
from .measure.report import table
from .plan import resolve_plan
from .trainer import evaluate, fit

REPORT_NAME = "report.json"


def load_teacher(model: nn.Module, checkpoint: str | Path) -> nn.Module:
    """Load a plain state_dict (a run's model.pt, or the run folder) into the teacher model."""
    path = Path(checkpoint)
    state = load_checkpoint(path / "model.pt" if path.is_dir() else path)
    state = state.get("model", state)  # a training checkpoint.pt holds it under "model"
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise LeantrainError(f"teacher checkpoint {path} does not match the teacher model: "
                             f"{str(exc).splitlines()[0]}") from exc
    return model


def _describe(model: nn.Module, accuracy: float, sample: torch.Tensor) -> dict[str, Any]:
    return {"val_accuracy": accuracy,
            "parameters": sum(p.numel() for p in model.parameters()),
            "cpu_latency_batch64_ms": 1e3 * latency_seconds(model, sample, 64,
                                                            channels_last=True)}


def run_distillation(teacher: nn.Module, build_student: Callable[[], nn.Module],
                     bundle: DataBundle, cfg: TrainConfig, out: Path, temperature: float,
                     alpha: float, cache: bool = True, progress_bar: bool = True
                     ) -> dict[str, Any]:
    check_kd_args(temperature, alpha)
    if out.exists() and any(out.iterdir()):
        raise LeantrainError(f"{out} is not empty; choose another --out")
    plan = resolve_plan(cfg.plan, teacher)
    teacher = teacher.to(plan.device)
    teacher_acc, _ = evaluate(teacher, make_loader(bundle.val, cfg.data.eval_batch_size, False,
                                                   device=plan.device), plan)
    train_data, cache_seconds = bundle.train, None
    if cache:
        start = time.perf_counter()
        train_data = cache_teacher_logits(teacher, bundle.train, cfg.data.eval_batch_size,
                                          plan.device, plan.channels_last)
        cache_seconds = time.perf_counter() - start
    alone = fit(build_student(), bundle.train, bundle.val, cfg, out / "student_alone",
                progress_bar=progress_bar)
    student = build_student()
    with_kd = fit(student, train_data, bundle.val, cfg, out / "student_kd",
                  progress_bar=progress_bar, loss_fn=DistillationLoss(teacher, temperature, alpha))
    sample = bundle.val[0][0]
    report = {
        "temperature": temperature, "alpha": alpha,
        "teacher_logits_cached": cache, "cache_seconds": cache_seconds,
        "teacher": _describe(teacher, teacher_acc, sample),
        "student_alone": {**_describe(build_student(), alone["val_accuracy"], sample),
                          "train_seconds": alone["train_seconds"]},
        "student_kd": {**_describe(student, with_kd["val_accuracy"], sample),
                       "train_seconds": with_kd["train_seconds"]},
    }
    atomic_write_text(out / REPORT_NAME, json.dumps(report, indent=2))
    return report


def format_report(report: dict[str, Any]) -> str:
    rows = []
    for name in ("teacher", "student_alone", "student_kd"):
        r = report[name]
        rows.append((name.replace("_", " "),
                     f"acc {r['val_accuracy']:.2%}   params {r['parameters']:,}   "
                     f"latency@64 {r['cpu_latency_batch64_ms']:.2f} ms"))
    title = f"distillation (T={report['temperature']}, alpha={report['alpha']})"
    return table(rows, title)
