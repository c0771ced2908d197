"""The text-gpt recipe at ~100 M parameters on a GPU: tokens/s, MFU and memory per technique.

1. One model (8 blocks, width 1024, 8 heads of 128, context 1024: 101 M parameters) trained
   with technique stacks that add one thing at a time: plain fp32 eager (no TF32, PyTorch's
   default foreach AdamW), bf16 autocast, + fused AdamW, + torch.compile, + activation
   checkpointing. Each stack: warm-up steps (compilation included), then timed optimizer
   steps between two device synchronizations; median step time of several timed windows,
   peak CUDA memory, and MFU = counted training FLOPs per token x tokens/s over the GPU's
   dense peak for the precision (leantrain's peak table).
2. FLOPs per token: the FLOP counter against 6·(N + d·V) + 12·L·T·d.
3. A real `leantrain train`-style run (fit, 2 epochs) of the full stack, with the resource
   monitor on: its summary (tokens/s, MFU, step-time breakdown, GPU utilization), and a sample.

    python benchmarks/gpt_gpu.py --out benchmarks/results   # on a CUDA machine
    python benchmarks/gpt_gpu.py --quick --out /tmp/x        # a tiny model: checks the script
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from leantrain import fit, load_config
from leantrain.data import load_data
from leantrain.measure.plots import plt
from leantrain.recipes import get_recipe
from leantrain.recipes.gpt import generate, parameters_without_embeddings
from leantrain.run import summary as run_summary
from leantrain.run.plan import build
from leantrain.run.trainer import Trainer

SIZE = {"gpt.depth": 8, "gpt.width": 1024, "gpt.heads": 8, "data.context": 1024,
        "data.batch_size": 32, "optim.lr": 6e-4, "data.max_bytes": 12_000_000}
QUICK = {"gpt.depth": 2, "gpt.width": 64, "gpt.heads": 2, "data.context": 64,
         "data.batch_size": 8, "data.max_bytes": 200_000}
FULL_STACK = {"plan.precision": "bf16", "plan.optimizer_impl": "fused", "plan.compile": True}
STACKS = {
    "fp32 eager": {"plan.precision": "fp32", "plan.tf32": False,
                   "plan.optimizer_impl": "foreach"},
    "bf16": {"plan.precision": "bf16", "plan.optimizer_impl": "foreach"},
    "bf16 + fused AdamW": {"plan.precision": "bf16", "plan.optimizer_impl": "fused"},
    "bf16 + fused + compile": FULL_STACK,
    "bf16 + fused + compile + act. ckpt": {**FULL_STACK, "plan.activation_checkpointing": True},
}


def overrides(values: dict) -> list[str]:
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()]


def measure_stack(base: dict, size: dict, stack: dict, bundle, recipe, warmup: int,
                  windows: int, steps: int, keep: bool = False) -> dict:
    """One stack's row; `keep` puts the trainer in it (its optimizer, for state bytes)."""
    cfg = load_config(None, overrides({**size, **stack, "train.monitor_interval_s": 0}), base)
    torch._dynamo.reset()  # each stack compiles for itself (warm-up includes it)
    torch.manual_seed(0)
    run = build(cfg, recipe.build_model(256, cfg), bundle.train, bundle.val,
                measure_loader=False)
    trainer = Trainer(run, progress_bar=False)
    device = run.plan.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    flops_per_sample = run_summary.training_flops(run)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stepper = trainer.steps()
    start = time.perf_counter()
    for _ in range(warmup):
        next(stepper)
    sync()
    warmup_s = time.perf_counter() - start
    rates, losses = [], []
    for _ in range(windows):
        tick, samples = time.perf_counter(), 0
        for _ in range(steps):
            n, loss = next(stepper)
            samples += n
        sync()
        rates.append(samples / (time.perf_counter() - tick))
        losses.append(loss.item())
    stepper.close()
    samples_per_s = statistics.median(rates)
    use = run_summary.utilization(run.plan, flops_per_sample, samples_per_s)
    context = cfg.data.context
    row = {
        "overrides": overrides(stack),
        "warmup_seconds": warmup_s,
        "tokens_per_second_windows": [r * context for r in rates],
        "tokens_per_second": samples_per_s * context,
        "step_ms": 1000 * cfg.data.batch_size / samples_per_s,
        "mfu": use["mfu"],
        "peak_source": use["peak_source"],
        "flops_per_token": flops_per_sample / context if flops_per_sample else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda" else None,
        "loss_after_windows": losses,
    }
    if keep:
        row["trainer"] = trainer
    del trainer, stepper
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def full_run(base: dict, size: dict, bundle, recipe, out: Path, epochs: int) -> dict:
    cfg = load_config(None, overrides({**size, **FULL_STACK, "train.epochs": epochs,
                                       "train.monitor_interval_s": 0.5}), base)
    torch._dynamo.reset()  # the run compiles for itself, as a user's run would
    torch.manual_seed(cfg.train.seed)
    model = recipe.build_model(256, cfg)
    start = time.perf_counter()
    summary = fit(model, bundle.train, bundle.val, cfg, out / "gpt_gpu_run", progress_bar=False)
    wall = time.perf_counter() - start
    sample = generate(model, torch.tensor(list(b"def "), dtype=torch.long,
                                          device=next(model.parameters()).device),
                      300, cfg.data.context, 0.8, 40,
                      torch.Generator(next(model.parameters()).device).manual_seed(0))
    keep = ("tokens_per_second", "mfu", "peak_source", "val_bits_per_byte", "steps",
            "train_seconds", "compile_seconds", "step_breakdown", "monitor",
            "peak_memory_bytes", "parameters")
    return {"wall_seconds": wall, **{k: summary[k] for k in keep},
            "sample": bytes(sample.tolist()).decode("utf-8", errors="replace")}


def plot(result: dict, path: Path) -> None:
    names = list(result["stacks"])
    rates = [result["stacks"][n]["tokens_per_second"] / 1e3 for n in names]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bars = ax.barh(names[::-1], rates[::-1], color="tab:blue")
    for bar, name in zip(bars, names[::-1], strict=True):
        row = result["stacks"][name]
        mfu = f"MFU {row['mfu']:.0%}" if row["mfu"] is not None else "MFU n/a"
        mem = f", {row['peak_memory_gib']:.1f} GiB" if row["peak_memory_gib"] else ""
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {mfu}{mem}",
                va="center", fontsize=9)
    ax.set_xlabel("thousand tokens / s (median of timed windows)")
    ax.set_title(f"text-gpt {result['parameters'] / 1e6:.0f} M parameters, {result['device']}")
    ax.set_xlim(0, max(rates) * 1.35)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--quick", action="store_true", help="a tiny model: checks the script")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = QUICK if args.quick else SIZE
    recipe = get_recipe("text-gpt")
    base = {"recipe": recipe.name, **recipe.config}
    cfg = load_config(None, overrides(size), base)
    bundle = load_data(cfg.data)
    print(bundle.description, flush=True)
    model = recipe.build_model(256, cfg)
    n, d = parameters_without_embeddings(model), cfg.gpt.width
    analytic = 6 * (n + d * 256) + 12 * cfg.gpt.depth * cfg.data.context * d
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"device": device, "torch": torch.__version__, "data": bundle.description,
              "size": size, "parameters": sum(p.numel() for p in model.parameters()),
              "analytic_flops_per_token": analytic, "stacks": {}}
    del model
    warmup, windows, steps = (2, 2, 3) if args.quick else (8, 5, 10)
    for name, stack in STACKS.items():
        row = measure_stack(base, size, stack, bundle, recipe, warmup, windows, steps)
        result["stacks"][name] = row
        print(f"{name:40s} {row['tokens_per_second']:>12,.0f} tok/s  step "
              f"{row['step_ms']:7.1f} ms  MFU "
              f"{row['mfu'] if row['mfu'] is None else format(row['mfu'], '.1%')}  peak "
              f"{row['peak_memory_gib'] or 0:.1f} GiB  warm-up {row['warmup_seconds']:.0f} s",
              flush=True)
        (out / "gpt_gpu.json").write_text(json.dumps(result, indent=2))
    counted = result["stacks"]["bf16 + fused + compile"]["flops_per_token"]
    result["flops_per_token_counter_over_analytic"] = counted / analytic if counted else None
    result["full_run"] = full_run(base, size, bundle, recipe, out, 2)
    (out / "gpt_gpu.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "gpt_gpu.png")
    run = result["full_run"]
    print(f"full run: {run['steps']} steps, {run['tokens_per_second']:,.0f} tok/s, MFU "
          f"{run['mfu'] or 0:.1%}, val {run['val_bits_per_byte']:.3f} bits/byte, compile "
          f"{run['compile_seconds']:.0f} s")
    print(run["sample"])


if __name__ == "__main__":
    main()
