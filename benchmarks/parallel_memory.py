"""Is the per-rank memory estimate (`doctor --ranks`) right for FSDP2 and tensor parallel?

A stock Hugging Face Llama with grouped-query attention (random weights from a config) is
trained for two probe steps on 2 processes (torchrun, gloo) in two layouts, the same global
batch in each:

- fsdp: FSDP2 over both ranks, 4 sequences per rank;
- tp: tensor parallel over both ranks (`plan.parallel.tp=2`, the model's own plan), 8
  sequences seen by both.

In each rank torch's `MemTracker` measures what the rank's tensors hold at the peak of forward
and backward, of the optimizer step and of evaluating a batch (`memory_estimate._probe`, the
probe doctor uses, run inside the rank). The estimate is what `doctor --ranks 2` computes in
one process from a one-process probe (`memory_estimate.estimate` with a `Layout`). The issue's
bound: the estimate within 15% of the measured per-rank peak.

    python benchmarks/parallel_memory.py           # results/parallel_memory.json
    python benchmarks/parallel_memory.py --quick   # a smaller model: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "parallel_memory.json"
BOUND = 0.15
GLOBAL_BATCH = 8
LAYOUTS = {"fsdp": {"distributed": "fsdp"}, "tp": {"parallel": {"tp": 2}}}


def model(quick: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    width = 64 if quick else 256
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=512 if quick else 4096, hidden_size=width, intermediate_size=4 * width,
        num_hidden_layers=2 if quick else 4, num_attention_heads=8, num_key_value_heads=4,
        max_position_embeddings=128))


def data(quick: bool = False):
    from leantrain.data.loaders import TensorDictDataset

    vocab, length = (512, 32) if quick else (4096, 64)

    def counting(n, seed):
        g = torch.Generator().manual_seed(seed)
        ids = (torch.randint(0, vocab, (n, 1), generator=g) + torch.arange(length)) % vocab
        return TensorDictDataset(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 labels=ids)

    return counting(64, 0), counting(16, 1)


def config(layout: str, per_rank: int, one_process: bool = False):
    from leantrain.config import config_from_dict

    plan = {"precision": "fp32", "device": "cpu"}
    if not one_process:
        plan.update(LAYOUTS[layout])
    return config_from_dict({"data": {"batch_size": per_rank, "eval_batch_size": 8},
                             "train": {"epochs": 1}, "optim": {"name": "adamw", "lr": 1e-3},
                             "plan": plan})


def per_rank_batch(layout: str) -> int:
    return GLOBAL_BATCH // 2 if layout == "fsdp" else GLOBAL_BATCH


def measure_in_rank(layout: str, quick: bool, out: Path) -> None:
    """Inside one torchrun rank: the probe's three peaks, written to out/rankN.json."""
    from leantrain.bench.memory_estimate import _probe
    from leantrain.run.plan import build

    train, val = data(quick)
    run = build(config(layout, per_rank_batch(layout)), model(quick), train, val,
                measure_loader=False)
    fwbw, step, _, evaluation = _probe(run)
    (out / f"rank{run.dist.rank}.json").write_text(json.dumps(
        {"forward_backward": fwbw, "optimizer_step": step, "evaluation": evaluation}))


def estimated(layout: str, quick: bool) -> dict:
    from leantrain.bench.memory_estimate import Layout, estimate
    from leantrain.data import DataBundle
    from leantrain.tensor_parallel import split_share

    train, val = data(quick)
    bundle = DataBundle(train=train, val=val, num_classes=None, description="counting")
    tp = 2 if layout == "tp" else 1
    shape = Layout(2, "fsdp", tp=tp, split=split_share(model(quick), tp) if tp > 1 else 0.0)
    est = estimate(lambda: model(quick), bundle,
                   config(layout, per_rank_batch(layout), one_process=True), layout=shape)
    return est.per_rank


def measured(layout: str, quick: bool) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node=2", __file__, "--in-rank", layout, "--out", folder]
        if quick:
            command.append("--quick")
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        return [json.loads((Path(folder) / f"rank{r}.json").read_text()) for r in (0, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--in-rank", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_rank:
        measure_in_rank(args.in_rank, args.quick, Path(args.out))
        return
    rows = {}
    for layout in LAYOUTS:
        ranks = measured(layout, args.quick)
        peak = max(max(r[phase]["total"] for phase in r) for r in ranks)
        estimate = estimated(layout, args.quick)["training_peak_bytes"]
        rows[layout] = {"measured_peak_bytes_per_rank": [max(r[p]["total"] for p in r)
                                                         for r in ranks],
                        "measured_by_phase": ranks, "estimated_peak_bytes": estimate,
                        "estimate_over_measured": estimate / peak,
                        "within_bound": abs(estimate / peak - 1) <= BOUND}
        print(f"{layout}: measured {peak / 2**20:.2f} MiB per rank, estimated "
              f"{estimate / 2**20:.2f} MiB ({estimate / peak:.3f}x)")
    if args.quick:
        return
    RESULTS.write_text(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "bound": BOUND, "global_batch": GLOBAL_BATCH,
        "layouts": rows}, indent=2))
    print(f"written: {RESULTS}")


if __name__ == "__main__":
    main()
