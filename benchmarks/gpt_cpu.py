"""The text-gpt recipe on this CPU: bits per byte against the unigram baseline, in < 10 min.

1. Trains the recipe as `leantrain train --recipe text-gpt` would: a 1.85 M-parameter byte
   GPT on 2 MB of the Python standard library's sources (validation: held-out files), 2
   epochs, AdamW with warmup and cosine, bf16 autocast where native. Wall time, tokens/s,
   MFU and the loss curve are recorded.
2. The unigram baseline: the cross-entropy, in bits per byte, of the validation bytes under
   the training bytes' own frequencies (add-one smoothed). A model that learned nothing
   about context cannot beat it.
3. FLOPs per token from the FLOP counter, against 6·(N + d·V) + 12·L·T·d (weights, the tied
   output projection, attention scores and values for fwd + bwd).
4. Activation checkpointing on and off, 20 steps each after 3 warm-up ones, interleaved
   over 3 rounds: samples/s, and the bytes autograd keeps for backward (saved tensors).
5. A sample: 300 bytes after "def ", temperature 0.8, top-k 40, seed 0.

    python benchmarks/gpt_cpu.py
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from leantrain import fit, load_config
from leantrain.data import load_data
from leantrain.env import cpu_model
from leantrain.measure.plots import plt
from leantrain.recipes import get_recipe
from leantrain.recipes.gpt import generate, parameters_without_embeddings
from leantrain.run import step
from leantrain.run.plan import build
from leantrain.run.trainer import Trainer

RESULTS = Path(__file__).parent / "results"


def unigram_bits(train: torch.Tensor, val: torch.Tensor) -> float:
    counts = torch.bincount(train.flatten(), minlength=256).double() + 1
    logp = torch.log2(counts / counts.sum())
    return -logp[val.flatten()].mean().item()


def saved_bytes(run, batch) -> int:
    """Bytes autograd holds for backward during one forward (activation memory)."""
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step.probe(run.model, batch, run.plan, run.loss_fn)
    run.model.zero_grad(set_to_none=True)
    return total


def checkpointing_trials(cfg, bundle, recipe, rounds: int = 3, steps: int = 20) -> dict:
    out: dict[str, dict] = {}
    for r in range(rounds):
        for on in ([False, True] if r % 2 == 0 else [True, False]):
            trial_cfg = load_config(None, [f"plan.activation_checkpointing={str(on).lower()}",
                                           "train.monitor_interval_s=0"], cfg.to_dict())
            torch.manual_seed(0)
            run = build(trial_cfg, recipe.build_model(256, cfg), bundle.train, bundle.val,
                        measure_loader=False)
            stepper = Trainer(run, progress_bar=False).steps()
            for _ in range(3):
                next(stepper)
            start, samples = time.perf_counter(), 0
            for _ in range(steps):
                n, loss = next(stepper)
                samples += n
            loss.item()
            rate = samples / (time.perf_counter() - start)
            stepper.close()
            row = out.setdefault("on" if on else "off", {"samples_per_second": []})
            row["samples_per_second"].append(rate)
            row["saved_bytes"] = saved_bytes(run, next(iter(run.train_loader.batches())))
    for row in out.values():
        row["median_samples_per_second"] = statistics.median(row["samples_per_second"])
    return out


def main() -> None:
    recipe = get_recipe("text-gpt")
    cfg = load_config(None, ["train.monitor_interval_s=5"],
                      {"recipe": recipe.name, **recipe.config})
    bundle = load_data(cfg.data)
    print(bundle.description, flush=True)
    torch.manual_seed(cfg.train.seed)
    model = recipe.build_model(256, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = fit(model, bundle.train, bundle.val, cfg, Path(tmp) / "run",
                      progress_bar=False)
        wall = time.perf_counter() - start
        records = [json.loads(line)
                   for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    bits = 1 / math.log(2)
    curve = {"step": [r["step"] for r in records if r["kind"] == "train"],
             "train_bits": [r["loss"] * bits for r in records if r["kind"] == "train"]}
    val = [(r["step"], r["val_loss"] * bits) for r in records if r["kind"] == "epoch"]
    unigram = unigram_bits(bundle.train.tensors[1], bundle.val.tensors[1])

    context, width, depth = cfg.data.context, 192, len(model.blocks)
    analytic = (6 * (parameters_without_embeddings(model) + width * 256)
                + 12 * depth * context * width)
    counted = summary["flops_per_sample"] / context
    sample = generate(model.cpu(), torch.tensor(list(b"def "), dtype=torch.long), 300,
                      context, 0.8, 40, torch.Generator().manual_seed(0))
    text = bytes(sample.tolist()).decode("utf-8", errors="replace")
    ckpt = checkpointing_trials(cfg, bundle, recipe)

    result = {
        "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "data": bundle.description,
        "parameters": sum(p.numel() for p in model.parameters()),
        "wall_seconds": wall, "train_seconds": summary["train_seconds"],
        "tokens_per_second": summary["tokens_per_second"], "mfu": summary["mfu"],
        "peak_source": summary["peak_source"],
        "val_bits_per_byte": summary["val_bits_per_byte"], "unigram_bits_per_byte": unigram,
        "val_curve": val, "train_curve": curve,
        "flops_per_token": {"counter": counted, "analytic_6N_plus_attention": analytic,
                            "ratio": counted / analytic},
        "activation_checkpointing": ckpt,
        "sample": text,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpt_cpu.json").write_text(json.dumps(result, indent=2))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(curve["step"], curve["train_bits"], label="train (running epoch mean)")
    ax.plot([s for s, _ in val], [b for _, b in val], "o-", label="validation (held-out files)")
    ax.axhline(unigram, color="grey", linestyle="--", label=f"unigram baseline {unigram:.2f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("bits per byte")
    ax.set_title(f"text-gpt, {result['parameters'] / 1e6:.2f} M parameters, {cpu_model()}, "
                 f"{wall / 60:.1f} min")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "gpt_cpu.png", dpi=120)
    print(f"{wall:.0f} s, val {summary['val_bits_per_byte']:.3f} bits/byte vs unigram "
          f"{unigram:.3f}; {summary['tokens_per_second']:,.0f} tokens/s, MFU "
          f"{summary['mfu']:.1%}; FLOPs/token counter/analytic {counted / analytic:.3f}; "
          f"checkpointing off/on {ckpt['off']['median_samples_per_second']:.0f}/"
          f"{ckpt['on']['median_samples_per_second']:.0f} samples/s, saved "
          f"{ckpt['off']['saved_bytes'] / 2**20:.0f}/{ckpt['on']['saved_bytes'] / 2**20:.0f} MiB")
    print(text)


if __name__ == "__main__":
    main()
