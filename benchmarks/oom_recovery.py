"""Out-of-memory recovery for real: a batch that does not fit trains anyway, at the speed of a
run started at the micro-batch size the recovery found.

1. **Recovered**: text-gpt at ~380 M parameters (24 blocks, width 1152, context 1024), bf16 +
   fused AdamW + compile, batch 512 x 1,024 tokens: too large for the GPU, so the first step
   runs out of memory and the trainer replays it as 2, 4, ... micro-batches until it fits.
   Recorded: the split, the warnings, tokens/s (compile time excluded, as in every summary),
   peak memory, wall time.
2. **Started there**: the same model and global batch, started at the micro-batch size the
   recovery found (data.batch_size = 512 / split, plan.grad_accum = split).

The issue's bar: the recovered run's tokens/s within 10% of the started-there run's. One pair
of runs (device time is short): the ratio is one measurement, not an interval.

On a CPU, `--quick` checks the script end to end on a tiny model whose forward raises the
out-of-memory error above 8 samples per micro-batch (no CPU runs out of memory on cue):

    python benchmarks/oom_recovery.py --out benchmarks/results    # on a CUDA machine
    python benchmarks/oom_recovery.py --quick --out /tmp/oom       # checks the script
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from gpt_gpu import overrides
from torch import nn

from leantrain import fit, load_config
from leantrain.data import load_data
from leantrain.recipes import get_recipe

LARGE = {"gpt.depth": 24, "gpt.width": 1152, "gpt.heads": 9, "data.context": 1024,
         "optim.lr": 3e-4, "optim.name": "adamw", "data.max_bytes": 12_000_000}
QUICK = {"gpt.depth": 2, "gpt.width": 64, "gpt.heads": 2, "data.context": 64,
         "optim.name": "adamw", "data.max_bytes": 200_000}
FAST = {"plan.precision": "bf16", "plan.optimizer_impl": "fused", "plan.compile": True}
QUICK_LIMIT = 8  # --quick: samples per micro-batch above which the forward "runs out"


class _Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING or "compile" in record.getMessage():
            self.lines.append(record.getMessage())


class _OutOfMemoryAbove(nn.Module):
    """--quick on a CPU: the model raises the CUDA out-of-memory error on training forwards
    of more than `limit` samples, as a GPU without room for their activations would."""

    def __init__(self, inner: nn.Module, limit: int):
        super().__init__()
        self.inner, self.limit = inner, limit

    def forward(self, x):
        if self.training and len(x) > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated above {self.limit})")
        return self.inner(x)


def train(base: dict, size: dict, extra: dict, quick: bool) -> dict:
    """One run without a run folder (a 380 M model's checkpoint is 4.5 GB of disk writes)."""
    cfg = load_config(None, overrides({**size, **FAST, **extra, "train.epochs": 1,
                                       "train.monitor_interval_s": 0}), base)
    recipe = get_recipe("text-gpt")
    bundle = load_data(cfg.data)
    torch._dynamo.reset()  # each run compiles for itself
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model = recipe.build_model(256, cfg)
    if quick:
        model = _OutOfMemoryAbove(model, QUICK_LIMIT)
    captured = _Captured()
    logging.getLogger("leantrain").addHandler(captured)
    start = time.perf_counter()
    try:
        summary = fit(model, bundle.train, bundle.val, cfg, progress_bar=False)
    finally:
        logging.getLogger("leantrain").removeHandler(captured)
    keys = ("micro_split", "steps", "tokens_per_second", "samples_per_second", "step_seconds",
            "compile_seconds", "peak_memory_bytes", "flops_per_sample", "mfu", "val_loss")
    compiled = (summary.get("compile") or {}).get("compiled_step_seconds")
    return {"overrides": overrides(extra), "wall_seconds": time.perf_counter() - start,
            **{k: summary.get(k) for k in keys}, "compiled_step_seconds": compiled,
            "log": captured.lines}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--quick", action="store_true", help="a tiny model on any device")
    parser.add_argument("--batch", type=int, default=None, help="default 512 (--quick: 64)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.getLogger("leantrain").setLevel(logging.INFO)
    size, batch = (QUICK, args.batch or 64) if args.quick else (LARGE, args.batch or 512)
    recipe = get_recipe("text-gpt")
    base = {"recipe": recipe.name, **recipe.config}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"device": device, "torch": torch.__version__, "quick": args.quick,
              "size": size, "batch_size": batch, "steps": args.steps}
    path = out / ("oom_recovery_quick.json" if args.quick else "oom_recovery.json")
    runs = {}
    result["runs"] = runs
    stop = {"train.max_steps": args.steps}
    runs["recovered"] = train(base, size, {**stop, "data.batch_size": batch}, args.quick)
    path.write_text(json.dumps(result, indent=2))
    split = runs["recovered"]["micro_split"]
    print(json.dumps(runs["recovered"], indent=2), flush=True)
    runs["started_there"] = train(base, size, {**stop, "data.batch_size": batch // split,
                                               "plan.grad_accum": split}, args.quick)
    a, b = (runs[k]["tokens_per_second"] for k in ("recovered", "started_there"))
    result["recovered_over_started_there"] = a / b if a and b else None
    a, b = (runs[k]["compiled_step_seconds"] for k in ("recovered", "started_there"))
    result["compiled_steps_speed_ratio"] = b / a if a and b else None  # > 1: recovered faster
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    print(json.dumps(runs["started_there"], indent=2))


if __name__ == "__main__":
    main()
