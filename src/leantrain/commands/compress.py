"""`leantrain compress`: apply separable conversion, pruning and int8 quantization to a
trained model, fine-tuning with the trainer where a step needs it, and report each stage.

Every stage is measured the same way: parameters, multiply-adds (FLOP counter / 2, one
sample), state_dict size on disk, CPU latency at batch 1 and 64 (fp32, one memory format for
all stages), and validation accuracy.
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LeantrainError
from . import common

PRUNE_METHODS = ("structured", "unstructured")
# compress.quantize's METHODS and STATIC, named here so the parser does not import torch
QUANTIZE_METHODS = ("int8-dynamic", "int8-weight-only", "int8-static")
QUANTIZE_ALIASES = {"int8": "int8-dynamic"}  # the one choice compress had before the others
STATIC_METHOD, STATIC_MODEL_NAME = "int8-static", "model.pt2"
CALIBRATION_BATCHES = 8  # of 64 training samples: int8-static's activation ranges
FINETUNE_LR_SHARE = 0.5  # of the run's lr, fine-tuning after a pruning step


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compress", help="separable convs, pruning, int8: a smaller model and a before/after "
                         "report",
        description="Load trained weights, apply the steps asked for (fine-tuning with the "
                    "trainer where a step needs it) and report parameters, multiply-adds, file "
                    "size, CPU latency (batch 1 and 64) and accuracy after each stage.",
        epilog="example:\n  leantrain train --out runs/base\n  leantrain compress --checkpoint "
               "runs/base/model.pt --prune 0.5 --out runs/small",
        formatter_class=common.RAW)
    common.add_source_args(p)
    p.add_argument("--checkpoint", required=True, metavar="MODEL_PT",
                   help="trained weights: a model.pt state_dict or its run folder")
    p.add_argument("--separable", action="store_true",
                   help="convert eligible 3x3 convs to depthwise-separable, retrain")
    p.add_argument("--prune", type=float, metavar="RATIO",
                   help="share of channels (structured) or weights (unstructured)")
    p.add_argument("--prune-method", default="structured", choices=PRUNE_METHODS)
    p.add_argument("--quantize", choices=[*QUANTIZE_ALIASES, *QUANTIZE_METHODS],
                   help="int8-dynamic (int8 = the same) or int8-weight-only: torchao on Linear "
                        "and Conv1D layers; int8-static: convs and Linear, the pt2e flow with "
                        "the x86 Inductor quantizer calibrated on the training data, for models "
                        "called on one tensor")
    p.add_argument("--finetune-epochs", type=int, default=4, metavar="N")
    p.add_argument("--finetune-lr", type=float, metavar="LR",
                   help="peak lr of the fine-tuning (default: half the run's optim.lr, with "
                        "its optimizer: 0.05 for the digits recipe's SGD, 5e-4 for AdamW at "
                        "torch's default)")
    p.add_argument("--keep-harmful", action="store_true",
                   help="write the model even when a stage is judged harmful (default: the "
                        "report only, so a broken model is never taken for a result)")
    p.add_argument("--max-drop", type=float, default=0.01, metavar="X",
                   help="accuracy a stage may cost before it is marked harmful (default 0.01 "
                        "= 1 point)")


def run(args: argparse.Namespace, dist) -> int:
    from ..data import load_data

    quantize = QUANTIZE_ALIASES.get(args.quantize, args.quantize)
    options = CompressArgs(args.separable, args.prune, args.prune_method, quantize,
                           args.finetune_epochs, args.finetune_lr, args.max_drop,
                           args.keep_harmful)
    options.check()
    cfg = common.config_from_args(args)
    out = common.default_out(args, "compress")
    common.require_empty(out)
    bundle = load_data(cfg.data)
    model = common.load_weights(common.build_model(cfg, bundle), args.checkpoint)
    report = run_compression(model, bundle, cfg, options, out, progress_bar=not args.no_progress)
    print(format_compression(report))
    model_line = f"model: {out / report['model_file']}" if report["model_file"] else \
        "model: not written (a stage was judged harmful; --keep-harmful writes it anyway)"
    print(f"\nreport: {out / 'report.json'}, {out / 'report.png'}; {model_line}")
    return 0


@dataclass(frozen=True)
class CompressArgs:
    separable: bool = False
    prune: float | None = None
    prune_method: str = "structured"
    quantize: str | None = None
    finetune_epochs: int = 4
    finetune_lr: float | None = None  # None: half the run's peak lr (FINETUNE_LR_SHARE)
    max_drop: float = 0.01
    keep_harmful: bool = False

    def tuning_lr(self, cfg) -> float:
        """The fine-tuning's lr: as asked, else a share of the lr the model trained at, so
        that it keeps its meaning for whichever optimizer the run uses."""
        return self.finetune_lr if self.finetune_lr is not None \
            else FINETUNE_LR_SHARE * cfg.optim.resolved().lr

    def check(self) -> None:
        """Reject bad input before anything is loaded, trained or written."""
        if not (self.separable or self.prune is not None or self.quantize):
            raise LeantrainError("nothing to do: give --separable, --prune RATIO and/or "
                                 "--quantize METHOD")
        if self.prune is not None:
            from ..compress.prune import check_ratio

            check_ratio(self.prune)
        if self.prune_method not in PRUNE_METHODS:
            raise LeantrainError(f"--prune-method {self.prune_method!r}: allowed "
                                 f"{', '.join(PRUNE_METHODS)}")
        if self.quantize not in (None, *QUANTIZE_METHODS):
            raise LeantrainError(f"--quantize {self.quantize!r}: allowed "
                                 f"{', '.join(QUANTIZE_METHODS)}")
        if self.finetune_lr is not None and not 0 < self.finetune_lr < float("inf"):
            raise LeantrainError(f"--finetune-lr must be a finite number > 0, got "
                                 f"{self.finetune_lr}")
        if self.finetune_epochs < 1:
            raise LeantrainError(f"--finetune-epochs must be >= 1, got {self.finetune_epochs}")
        if not 0 <= self.max_drop < 1:
            raise LeantrainError(f"--max-drop must be in [0, 1), got {self.max_drop}")


def probe(model, bundle, size: int) -> tuple[Any, bool]:
    """A validation batch of `size` samples as training calls `model` on it
    (`run.measuring.measuring_call`: collated, labels passed where the forward takes them),
    and whether the model runs fastest channels_last (has convs)."""
    from ..run.measuring import measuring_call
    from ..techniques.memory_format import has_conv2d

    conv = has_conv2d(model)
    return measuring_call(model, bundle.val, size, bundle.collate_fn, conv), conv


def measure_stage(name: str, model, bundle, note: str = "") -> dict[str, Any]:
    import torch

    from ..compress.quantize import state_bytes
    from ..config import PlanConfig
    from ..data import make_loader
    from ..measure.flops import count_flops
    from ..measure.latency import latency_seconds
    from ..run.plan import resolve_plan
    from ..run.step import evaluate

    model.eval()  # (not reassigned: an exported graph's eval returns None)
    if any(p.device.type != "cpu" for p in model.parameters()):
        model.cpu()
    one, conv = probe(model, bundle, 1)
    plan = resolve_plan(PlanConfig(device="cpu", precision="fp32", channels_last=conv), model)
    with torch.no_grad():
        macs = count_flops(lambda: one(model)) // 2
    accuracy, loss = evaluate(model, make_loader(bundle.val, 256, False,
                                                 collate_fn=bundle.collate_fn), plan)
    return {
        "stage": name, "note": note,
        "parameters": sum(p.numel() for p in model.parameters()),
        "macs": macs, "file_bytes": state_bytes(model), "val_accuracy": accuracy,
        "val_loss": loss,
        "latency_b1_ms": 1e3 * latency_seconds(model, one, channels_last=conv),
        "latency_b64_ms": 1e3 * latency_seconds(model, probe(model, bundle, 64)[0],
                                                channels_last=conv),
    }


def run_compression(model, bundle, cfg, args: CompressArgs, out: Path,
                    progress_bar: bool = True) -> dict[str, Any]:
    from ..checkpoint import atomic_write_text
    from ..compress.prune import (
        check_structured,
        finalize,
        prune_channels,
        prune_unstructured,
        save_pruned,
    )
    from ..compress.quantize import save_static
    from ..compress.separable import to_separable
    from ..compress.verdict import HARMFUL, judge_all
    from ..config import config_from_dict, merge
    from ..measure.latency import batch_of
    from ..measure.load import LoadWatch
    from ..measure.plots import bar_panels
    from ..run.fit import fit
    from ..run.summary import MODEL_NAME

    if args.quantize == STATIC_METHOD:
        check_static(bundle)  # before any stage trains
    if args.prune is not None and args.prune_method == "structured":
        check_structured(model)  # an attention layout it cannot prune: before any measuring
    load = LoadWatch().__enter__()  # read at the verdicts: what else ran while they timed
    stages = [measure_stage("trained", model, bundle)]
    tune_cfg = config_from_dict(merge(cfg.to_dict(), {
        "train": {"epochs": args.finetune_epochs, "monitor_interval_s": 0},
        "optim": {"lr": args.tuning_lr(cfg)}}))

    def finetune(net, step: int) -> None:
        fit(net, bundle.train, bundle.val, tune_cfg, None, progress_bar=progress_bar,
            collate_fn=bundle.collate_fn)

    if args.separable:
        before = copy.deepcopy(model)
        model, changes = to_separable(model, norm=True, activation=True)
        if not changes:
            raise LeantrainError("--separable: no Conv2d qualifies (groups=1, kernel > 1, "
                                 ">= 16 input channels)")
        fit(model, bundle.train, bundle.val, cfg, None, progress_bar=progress_bar,
            collate_fn=bundle.collate_fn)
        stages.append(measure_stage("separable", model, bundle,
                                    f"{len(changes)} convs converted, retrained "
                                    f"{cfg.train.epochs} epochs"))
        _pair(stages[-1], model, before, bundle)
    if args.prune is not None:
        before = copy.deepcopy(model)
        if args.prune_method == "structured":
            example = probe(model, bundle, 1)[0].example()
            prune_channels(model.eval(), example, args.prune, steps=2, finetune=finetune)
            note = f"{args.prune:.0%} of channels removed in 2 steps, fine-tuned after each"
        else:
            prune_unstructured(model, args.prune, schedule="gradual", steps=3,
                               finetune=finetune)
            finalize(model)
            note = (f"{args.prune:.0%} of weights zeroed (gradual, 3 steps): dense kernels "
                    "gain no speed from unstructured sparsity")
        stages.append(measure_stage(f"pruned ({args.prune_method})", model, bundle, note))
        _pair(stages[-1], model, before, bundle)
    if args.quantize == STATIC_METHOD:
        model, stage = quantize_static_stage(model, bundle, stages[-1])
        stages.append(stage)
    elif args.quantize:
        model, stage = quantize_linear_stage(model, bundle, stages[-1], args.quantize)
        stages.append(stage)
    judge_all(stages, args.max_drop)
    load.__exit__()
    report = {"stages": stages, "args": args.__dict__, "load": load.reading.to_dict(),
              "recommend_against": [s["stage"] for s in stages if s["verdict"] == HARMFUL]}
    out.mkdir(parents=True, exist_ok=True)
    if report["recommend_against"] and not args.keep_harmful:
        report["model_file"] = None  # a harmful model is not written where a result would be
    elif args.quantize == STATIC_METHOD:
        report["model_file"] = STATIC_MODEL_NAME
        # a batch of 2: with 1, export would fix the batch size at 1
        save_static(model, batch_of(common.sample_inputs(bundle), 2), out / STATIC_MODEL_NAME)
    else:
        report["model_file"] = MODEL_NAME
        save_pruned(model, out / MODEL_NAME)  # a plain state_dict (+ head counts): load_pruned
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    names = [s["stage"] for s in stages]
    bar_panels(names, [("multiply-adds (M)", [s["macs"] / 1e6 for s in stages]),
                       ("latency b64 (ms)", [s["latency_b64_ms"] for s in stages]),
                       ("file size (KiB)", [s["file_bytes"] / 1024 for s in stages]),
                       _quality_panel(stages)],
               out / "report.png", "leantrain compress: each stage", reference=None)
    return report


def _quality_panel(stages: list[dict[str, Any]]) -> tuple[str, list[float]]:
    if all(s["val_accuracy"] is not None for s in stages):
        return "val accuracy (%)", [100 * s["val_accuracy"] for s in stages]
    return "val loss", [s["val_loss"] for s in stages]


def _quality(stage: dict[str, Any]) -> str:
    return f"{stage['val_accuracy']:.2%}" if stage["val_accuracy"] is not None \
        else f"loss {stage['val_loss']:.4g}"


def check_static(bundle) -> None:
    import torch

    if not isinstance(common.sample_inputs(bundle), torch.Tensor):
        raise LeantrainError("--quantize int8-static takes a model called on one tensor (a "
                             "conv model); this one takes keyword inputs: use int8-dynamic or "
                             "int8-weight-only for transformers")


def _pair(stage: dict[str, Any], model, before, bundle) -> None:
    """The stage's speed-up over the model before it at batch 64, in interleaved rounds with
    an interval (what the verdict judges by; the table's latencies are single figures)."""
    from ..measure.latency import paired_speedup

    call, conv = probe(before, bundle, 64)
    found = paired_speedup(model, before, call, channels_last=conv)
    stage["speedup_b64"] = {**found, "kind": "b64"}


def _compiled_latencies(stage: dict[str, Any], model, before, bundle, channels_last: bool,
                        freezing: bool = False) -> None:
    """Batch-64 latency of the stage's model and of the one before it, both under
    torch.compile (int8 pays compiled, if at all), paired in interleaved rounds; with
    `freezing`, Inductor folds the weights into constants (the pt2e x86 recipe: its int8
    kernels are packed from them)."""
    import torch

    from ..measure.latency import paired_speedup

    call = probe(before, bundle, 64)[0]
    with torch._inductor.config.patch(freezing=freezing):
        found = paired_speedup(torch.compile(model), torch.compile(before), call,
                               channels_last=channels_last)
    stage["latency_compiled_b64_ms"] = found["model_ms"]
    stage["latency_compiled_b64_ms_before"] = found["reference_ms"]
    stage["speedup_b64"] = {**found, "kind": "compiled b64"}


def quantize_linear_stage(model, bundle, before: dict[str, Any], method: str):
    """torchao int8 (`method`) on a copy of `model`'s Linear and Conv1D layers, measured."""
    from ..compress.quantize import quantize_linear
    from ..techniques.memory_format import has_conv2d

    quantized = quantize_linear(copy.deepcopy(model), method)
    stage = measure_stage(f"{method} (Linear layers)", quantized, bundle,
                          f"torchao {method} on Linear layers only. It pays off under "
                          "torch.compile, if at all: compiled latencies are measured for it "
                          "and for the model before it. Multiply-adds are counted on the "
                          "float graph (the counter does not see int8 matmuls)")
    stage["macs"], stage["macs_counted_on"] = before["macs"], "the float graph"
    _compiled_latencies(stage, quantized, model, bundle, has_conv2d(model))
    return quantized, stage


def quantize_static_stage(model, bundle, before: dict[str, Any]):
    """int8-static (pt2e, x86 Inductor quantizer) of `model`, calibrated on the first
    CALIBRATION_BATCHES training batches of 64, measured in NCHW (how its kernels run)."""
    from itertools import islice

    from ..compress.quantize import quantize_pt2e
    from ..data import make_loader
    from ..data.loaders import first_tensor

    loader = make_loader(bundle.train, 64, False, collate_fn=bundle.collate_fn)
    calibration = [first_tensor(b) for b in islice(loader.batches(), CALIBRATION_BATCHES)]
    quantized = quantize_pt2e(copy.deepcopy(model), calibration[0], calibration)
    stage = measure_stage(STATIC_METHOD, quantized, bundle,
                          f"pt2e int8-static (x86 Inductor quantizer), calibrated on "
                          f"{len(calibration)} training batches; it runs int8 kernels only "
                          "compiled (eager it simulates them): compiled latencies, with "
                          "Inductor freezing, in NCHW, are measured for it and for the model "
                          "before it. Multiply-adds are counted on the float graph. Saved as "
                          "a torch.export program: torch.export.load(path).module()")
    stage["macs"], stage["macs_counted_on"] = before["macs"], "the float graph"
    # its int8 weights are graph constants, not parameters; quantizing keeps every weight
    stage["parameters"] = before["parameters"]
    _compiled_latencies(stage, quantized, model, bundle, channels_last=False, freezing=True)
    return quantized, stage


def format_compression(report: dict[str, Any]) -> str:
    """One row per stage with its verdict against the stage before, then the notes."""
    from ..measure.load import busy_line
    from ..measure.report import human_bytes

    head = ("stage", "parameters", "multiply-adds", "file", "b1 / b64 ms", "accuracy / loss",
            "verdict")
    rows = [head]
    for s in report["stages"]:
        latency = f"{s['latency_b1_ms']:.3f} / {s['latency_b64_ms']:.2f}"
        if s.get("latency_compiled_b64_ms") is not None:
            latency += f" (compiled {s['latency_compiled_b64_ms']:.2f}, before " \
                       f"{s['latency_compiled_b64_ms_before']:.2f})"
        macs = f"{s['macs']:,}" + (" (float graph)" if s.get("macs_counted_on") else "")
        rows.append((s["stage"], f"{s['parameters']:,}", macs, human_bytes(s["file_bytes"]),
                     latency, _quality(s), f"{s['verdict']}: {s['why']}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    lines += [f"  {s['stage']}: {s['note']}" for s in report["stages"] if s["note"]]
    if report.get("recommend_against"):
        lines.append("recommendation: do not apply " + ", ".join(report["recommend_against"]) +
                     " (harmful: see its verdict)")
    busy = busy_line(report.get("load"))
    return "\n".join(lines + ([busy] if busy else []))
