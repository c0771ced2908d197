"""GPU-scale speed and memory on text-gpt: the figures issue 20 asks of a lent H100/H200.

Each row trains the recipe for real (leantrain's own step through `Trainer.steps`, as
`gpt_gpu.measure_stack` does: warm-up steps with compilation, then timed windows between two
device synchronizations) and records tokens/s per window, MFU and peak CUDA memory:

1. **Large model**: text-gpt at ~380 M parameters (24 blocks, width 1152, context 1024):
   bf16 + fused AdamW + compile (target: >= 50% MFU), the same with compile max-autotune, and
   fp8 (tensorwise and rowwise) + compile; fp8's speed-up over bf16 is the ratio of the
   windows' medians with a 95% bootstrap interval over windows.
2. **fp8 break-even**: bf16 vs fp8 tokens/s at growing widths, to find the smallest model at
   which fp8 pays.
3. **Optimizer-state memory** on the large model: AdamW state bytes measured through torchao's
   tensor subclasses for fp32, bf16 (weights too), 8-bit and 4-bit states (target: 8-bit <=
   0.3x fp32), their tokens/s and peak memory, the loss after the same steps; and with the
   optimizer offloaded to the CPU.
4. **Compile modes** on a small model (where kernel launches bound the step): default,
   max-autotune, reduce-overhead (CUDA graphs), warm-up (compile) seconds counted.
5. **Memory estimate vs measured peak**: `bench.memory_estimate` on the large model against
   `torch.cuda.max_memory_allocated` of the bf16 row (target: within 20%).
6. OOM recovery for real is `benchmarks/oom_recovery.py` (the same large model at batch 512,
   against a run started at the micro-batch size it finds).

A row that cannot run here is recorded with the reason (`unsupported: ...`), so the same
script on a CPU (`--quick`, tiny sizes) checks its own logic end to end:

    python benchmarks/gpu_scale.py --out benchmarks/results/gpu_scale   # on a CUDA machine
    python benchmarks/gpu_scale.py --quick --out /tmp/gpu_scale          # checks the script
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from gpt_gpu import measure_stack, overrides
from scipy.stats import bootstrap

from leantrain import load_config
from leantrain.bench.memory_estimate import estimate
from leantrain.data import load_data
from leantrain.errors import LeantrainError
from leantrain.recipes import get_recipe
from leantrain.techniques.optimizer_states import state_bytes

LARGE = {"gpt.depth": 24, "gpt.width": 1152, "gpt.heads": 9, "data.context": 1024,
         "data.batch_size": 16, "optim.lr": 3e-4, "optim.name": "adamw",
         "data.max_bytes": 12_000_000}
SMALL = {"gpt.depth": 4, "gpt.width": 256, "gpt.heads": 4, "data.context": 256,
         "data.batch_size": 8, "optim.name": "adamw", "data.max_bytes": 4_000_000}
WIDTHS = (512, 1024, 1536, 2048)  # the fp8 break-even sweep: 8 blocks, heads of 128
QUICK_LARGE = {"gpt.depth": 2, "gpt.width": 64, "gpt.heads": 2, "data.context": 64,
               "data.batch_size": 8, "optim.name": "adamw", "data.max_bytes": 200_000}
QUICK_SMALL = {**QUICK_LARGE, "gpt.width": 32}
QUICK_WIDTHS = (32, 64)
FAST = {"plan.precision": "bf16", "plan.optimizer_impl": "fused", "plan.compile": True}
LARGE_STACKS = {
    "bf16 + fused + compile": FAST,
    "bf16 + fused + compile max-autotune": {**FAST, "plan.compile_mode": "max-autotune"},
    "fp8 + compile": {**FAST, "plan.precision": "fp8"},
    "fp8-rowwise + compile": {**FAST, "plan.precision": "fp8-rowwise"},
}
STATE_STACKS = {
    "fp32 states": {"plan.precision": "bf16", "plan.optimizer_impl": "fused"},
    "bf16 weights and states": {"plan.precision": "bf16", "plan.optimizer_states": "bf16"},
    "8-bit states": {"plan.precision": "bf16", "plan.optimizer_states": "8bit"},
    "4-bit states": {"plan.precision": "bf16", "plan.optimizer_states": "4bit"},
    "offloaded to the CPU": {"plan.precision": "bf16", "plan.optimizer_offload": True},
}
COMPILE_MODES = {"eager": {"plan.precision": "bf16", "plan.optimizer_impl": "fused"},
                 **{f"compile {m}": {**FAST, "plan.compile_mode": m}
                    for m in ("default", "max-autotune", "reduce-overhead")}}


def ratio_interval(faster: list[float], slower: list[float]) -> dict:
    """Median ratio of two rows' window rates, with a 95% bootstrap interval."""
    ratio = statistics.median(faster) / statistics.median(slower)
    if min(len(faster), len(slower)) < 3:
        return {"ratio": ratio, "low": None, "high": None}
    res = bootstrap((faster, slower), lambda a, b: statistics.median(a) / statistics.median(b),
                    vectorized=False, paired=False, n_resamples=2000, random_state=0)
    return {"ratio": ratio, "low": res.confidence_interval.low,
            "high": res.confidence_interval.high}


class Rows:
    """Measured rows, written to OUT/gpu_scale.json after each (a crash keeps what ran)."""

    def __init__(self, out: Path, timing: tuple[int, int, int], header: dict):
        self.out, self.timing, self.result = out, timing, {**header, "sections": {}}
        self.recipe = get_recipe("text-gpt")
        self.base = {"recipe": self.recipe.name, **self.recipe.config}

    def save(self) -> None:
        (self.out / "gpu_scale.json").write_text(json.dumps(self.result, indent=2, default=str))

    def measure(self, section: str, name: str, size: dict, stack: dict, states: bool = False
                ) -> dict:
        cfg = load_config(None, overrides(size), self.base)
        bundle = load_data(cfg.data)
        try:
            row = measure_stack(self.base, size, stack, bundle, self.recipe, *self.timing,
                                keep=states)
        except LeantrainError as exc:
            row = {"overrides": overrides(stack), "unsupported": str(exc)}
        except torch.OutOfMemoryError as exc:
            row = {"overrides": overrides(stack), "out_of_memory": str(exc).splitlines()[0]}
        if states and "trainer" in row:
            row["optimizer_state_bytes"] = _state_bytes(row.pop("trainer"))
        self.result["sections"].setdefault(section, {})[name] = row
        self.save()
        _print(name, row)
        return row


def _state_bytes(trainer) -> int | None:
    optimizer = trainer.state.optimizer
    return state_bytes(optimizer) if hasattr(optimizer, "state") else None  # (offloaded)


def _print(name: str, row: dict) -> None:
    if "tokens_per_second" not in row:
        print(f"{name:40s} {row.get('unsupported') or row.get('out_of_memory')}", flush=True)
        return
    mfu = "n/a" if row["mfu"] is None else f"{row['mfu']:.1%}"
    print(f"{name:40s} {row['tokens_per_second']:>12,.0f} tok/s  MFU {mfu}  peak "
          f"{row['peak_memory_gib'] or 0:.1f} GiB  warm-up {row['warmup_seconds']:.0f} s",
          flush=True)


def compare(rows: dict, faster: str, slower: str) -> dict | None:
    a, b = rows.get(faster, {}), rows.get(slower, {})
    if "tokens_per_second_windows" not in a or "tokens_per_second_windows" not in b:
        return None
    return ratio_interval(a["tokens_per_second_windows"], b["tokens_per_second_windows"])


def memory_estimate_vs_peak(rows: Rows, size: dict, measured_gib: float | None) -> dict:
    cfg = load_config(None, overrides({**size, **STATE_STACKS["fp32 states"]}), rows.base)
    bundle = load_data(cfg.data)
    est = estimate(lambda: rows.recipe.build_model(256, cfg), bundle, cfg)
    out = {"estimate_bytes": est.peak_bytes, "estimate": est.to_dict(),
           "measured_bytes": measured_gib * 2**30 if measured_gib else None}
    if measured_gib:
        out["estimate_over_measured"] = est.peak_bytes / (measured_gib * 2**30)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_scale"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script")
    parser.add_argument("--only", nargs="*", help="sections to run (default: all)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    large, small = (QUICK_LARGE, QUICK_SMALL) if args.quick else (LARGE, SMALL)
    widths = QUICK_WIDTHS if args.quick else WIDTHS
    timing = (2, 3, 2) if args.quick else (6, 5, 8)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rows = Rows(out, timing, {"device": device, "torch": torch.__version__,
                              "large": large, "small": small, "quick": args.quick,
                              "timing": dict(zip(("warmup", "windows", "steps"), timing,
                                                 strict=True))})
    wanted = set(args.only or ("large", "fp8_sizes", "states", "compile_modes", "estimate"))
    sections = rows.result["sections"]
    if "large" in wanted:
        for name, stack in LARGE_STACKS.items():
            rows.measure("large", name, large, stack)
        base = "bf16 + fused + compile"
        rows.result["fp8_over_bf16"] = {
            name: compare(sections["large"], name, base) for name in LARGE_STACKS if "fp8" in name}
    if "fp8_sizes" in wanted:
        for width in widths:
            size = {**large, "gpt.depth": 8 if not args.quick else 2, "gpt.width": width,
                    "gpt.heads": max(width // 128, 1) if not args.quick else 2}
            for precision in ("bf16", "fp8"):
                rows.measure("fp8_sizes", f"width {width} {precision}", size,
                             {**FAST, "plan.precision": precision})
        rows.result["fp8_break_even"] = {
            width: compare(sections["fp8_sizes"], f"width {width} fp8", f"width {width} bf16")
            for width in widths}
    if "states" in wanted:
        for name, stack in STATE_STACKS.items():
            rows.measure("states", name, large, stack, states=True)
        fp32 = sections["states"]["fp32 states"].get("optimizer_state_bytes")
        rows.result["state_bytes_over_fp32"] = {
            name: row["optimizer_state_bytes"] / fp32 for name, row in sections["states"].items()
            if fp32 and row.get("optimizer_state_bytes")}
    if "compile_modes" in wanted:
        for name, stack in COMPILE_MODES.items():
            rows.measure("compile_modes", name, small, stack)
    if "estimate" in wanted:
        bf16 = sections.get("states", {}).get("fp32 states", {})
        rows.result["memory_estimate"] = memory_estimate_vs_peak(
            rows, large, bf16.get("peak_memory_gib"))
    rows.save()
    print(json.dumps({k: v for k, v in rows.result.items() if k != "sections"}, indent=2,
                     default=str))


if __name__ == "__main__":
    main()
