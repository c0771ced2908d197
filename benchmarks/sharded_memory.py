"""How much memory does each rank need to save and to resume a distributed checkpoint?

Two ranks (torchrun, gloo) shard a 16.8 M-parameter MLP with FSDP2 and AdamW: weights and two
moments make a checkpoint of ~200 MB. Each rank's resident memory is sampled every 2 ms while
it saves and, in a fresh launch, while it resumes, and its peak rise over what it held just
before is reported against the checkpoint's size, for the two ways leantrain has written
such a checkpoint:

- full (leantrain before issue 39): every rank gathers the full model and optimizer state
  (`distributed.full_state`), rank 0 writes one file; at resume every rank loads the whole
  file and sets it into its shards (`distributed.load_full_state`);
- sharded (now, `run/sharded.py`): each rank writes and reads its own shards through
  torch.distributed.checkpoint.

The bound the issue set: no rank's peak at save or resume rises by more than 0.6x the
checkpoint's size.

    python benchmarks/sharded_memory.py           # results/sharded_memory.json
    python benchmarks/sharded_memory.py --quick   # a 4 M-parameter model: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from torch import nn

RESULTS = Path(__file__).parent / "results" / "sharded_memory.json"
BOUND = 0.6


class Peak:
    """The peak resident memory of this process while the block runs, over what it held at
    its start (sampled every 2 ms)."""

    def __enter__(self) -> Peak:
        self.process, self.stop = psutil.Process(), threading.Event()
        self.start = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.rise = self.peak - self.start


def _model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(4)])


def _sharded_model_and_optimizer(width: int):
    from torch.distributed.fsdp import fully_shard

    model = _model(width)
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(8, width)).square().mean().backward()
    optimizer.step()  # the moments exist: the checkpoint holds weights and two moments
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def worker(mode: str, phase: str, folder: Path, width: int) -> None:
    import torch.distributed as dist

    from leantrain import distributed
    from leantrain.checkpoint import atomic_save, load_checkpoint
    from leantrain.distributed import DistContext
    from leantrain.run import sharded

    dist.init_process_group("gloo")
    ctx = DistContext.from_env()
    model, optimizer = _sharded_model_and_optimizer(width)
    if mode == "sharded":
        with Peak() as peak:
            if phase == "save":
                sharded.save(model, optimizer, {}, folder, ctx, step=1)
            else:
                sharded.load(model, optimizer, sharded.latest(folder))
    else:
        path = folder / "checkpoint.pt"
        with Peak() as peak:
            if phase == "save":
                weights, states = distributed.full_state(model, optimizer, "fsdp")
                if ctx.is_main:
                    atomic_save({"model": weights, "optimizer": states}, path)
                del weights, states
            else:
                saved = load_checkpoint(path)
                distributed.load_full_state(model, optimizer, "fsdp", saved["model"],
                                            saved["optimizer"])
                del saved
    dist.barrier()
    report = {"rank": ctx.rank, "mode": mode, "phase": phase, "rise_bytes": peak.rise,
              "before_bytes": peak.start}
    (folder / f"{mode}-{phase}-rank{ctx.rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def _size(folder: Path, mode: str) -> int:
    if mode == "full":
        return (folder / "checkpoint.pt").stat().st_size
    from leantrain.run import sharded

    return sum(p.stat().st_size for p in sharded.latest(folder).iterdir())


def _launch(mode: str, phase: str, folder: Path, width: int) -> None:
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node=2", __file__, "--worker", mode, phase, str(folder),
                    str(width)], check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", nargs=4, metavar=("MODE", "PHASE", "FOLDER", "WIDTH"))
    args = parser.parse_args()
    if args.worker:
        mode, phase, folder, width = args.worker
        worker(mode, phase, Path(folder), int(width))
        return
    width = 1024 if args.quick else 2048
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("full", "sharded"):
            folder = Path(tmp) / mode
            folder.mkdir()
            for phase in ("save", "resume"):
                start = time.perf_counter()
                _launch(mode, phase, folder, width)
                seconds = time.perf_counter() - start
                size = _size(folder, mode)
                for rank in (0, 1):
                    found = json.loads((folder / f"{mode}-{phase}-rank{rank}.json").read_text())
                    found.update(checkpoint_bytes=size, rise_over_size=found["rise_bytes"] / size,
                                 launch_seconds=seconds)
                    runs.append(found)
                    print(f"{mode:8s} {phase:6s} rank {rank}: +{found['rise_bytes'] / 2**20:6.1f} "
                          f"MiB = {found['rise_over_size']:.2f}x the {size / 2**20:.0f} MiB "
                          "checkpoint", flush=True)
    sharded_worst = max(r["rise_over_size"] for r in runs if r["mode"] == "sharded")
    record = {"machine": {"cpu": __import__("leantrain.env", fromlist=["cpu_model"]).cpu_model(),
                          "arch": platform.machine(), "torch": torch.__version__,
                          "cores": os.cpu_count()},
              "parameters": 4 * (width * width + width), "bound": BOUND, "runs": runs,
              "sharded_worst_rise_over_size": sharded_worst,
              "full_worst_rise_over_size": max(r["rise_over_size"] for r in runs
                                               if r["mode"] == "full"),
              "sharded_within_bound": sharded_worst <= BOUND}
    print(f"worst rise, sharded: {sharded_worst:.2f}x (bound {BOUND}); full: "
          f"{record['full_worst_rise_over_size']:.2f}x")
    if not args.quick:
        RESULTS.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
