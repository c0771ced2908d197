"""Does memory stay flat as the corpus grows, and does the model wait for the data?

Two token folders are generated (token ids drawn at random, 4,096 of them, in uint16 shards of
100 M tokens, the same 200 k validation tokens in each): a large one (1 B training tokens, 2 GB
on disk) and a small one (50 M, 100 MB). The text-gpt recipe trains on each for 300 steps, in
alternating rounds, each run a fresh process (`leantrain train --data FOLDER`). From each
run's summary.json: the process's peak RSS and the share of the step spent waiting for data.
The issue's bounds: the large corpus's peak RSS within 10% of the small one's, data wait under
5% of the step.

    python benchmarks/token_shards.py           # results/token_shards.json
    python benchmarks/token_shards.py --quick   # 20 M against 5 M tokens, 10 steps: it runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "token_shards.json"
VOCAB = 4096
RSS_BOUND, WAIT_BOUND = 0.10, 0.05
VAL_TOKENS = 200_000  # the same in both: evaluation costs the same


def generate(folder: Path, train_tokens: int, val_tokens: int, seed: int) -> float:
    """A token folder of random ids; returns the seconds it took."""
    from leantrain.data.tokens import write_token_folder

    began = time.perf_counter()
    rng = np.random.default_rng(seed)

    def chunks(total: int):
        for start in range(0, total, 20_000_000):
            yield rng.integers(0, VOCAB, min(20_000_000, total - start), dtype=np.uint16)

    write_token_folder(folder, {"train": chunks(train_tokens), "val": chunks(val_tokens)},
                       VOCAB, eot=0)
    return time.perf_counter() - began


def train(folder: Path, steps: int, out: Path) -> dict:
    command = [sys.executable, "-m", "leantrain", "train", "--recipe", "text-gpt", "--data",
               str(folder), "--out", str(out), "--no-progress", "--set",
               f"train.max_steps={steps}", "--set", "train.epochs=1", "--set",
               "plan.compile=false", "--set", "train.monitor_interval_s=0"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    summary = json.loads((out / "summary.json").read_text())
    shutil.rmtree(out)
    return {"peak_rss_bytes": summary["peak_memory_bytes"],
            "data_wait_fraction": summary["step_breakdown"]["fractions"]["data"],
            "steps": summary["steps"], "samples_per_second": summary["samples_per_second"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", default=None, help="where to write the corpora (a temp "
                                                     "folder by default; 2.1 GB)")
    args = parser.parse_args()
    sizes = {"large": 20_000_000, "small": 5_000_000} if args.quick else \
        {"large": 1_000_000_000, "small": 50_000_000}
    steps = 10 if args.quick else 300
    work = Path(args.work or tempfile.mkdtemp(prefix="token-shards-"))
    made = {name: generate(work / name, tokens, VAL_TOKENS, seed=i)
            for i, (name, tokens) in enumerate(sizes.items())}
    on_disk = {name: sum(p.stat().st_size for p in (work / name).iterdir()) for name in sizes}
    runs: dict[str, list[dict]] = {name: [] for name in sizes}
    for r in range(args.rounds):  # alternating, so a busy spell falls on both
        for name in (sizes if r % 2 == 0 else reversed(list(sizes))):
            runs[name].append(train(work / name, steps, work / f"run-{name}-{r}"))
            print(name, runs[name][-1], flush=True)
    rss = {n: statistics.median(x["peak_rss_bytes"] for x in runs[n]) for n in sizes}
    wait = {n: max(x["data_wait_fraction"] for x in runs[n]) for n in sizes}
    growth = rss["large"] / rss["small"] - 1
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cpu_model": _cpu_model(), "cores": os.cpu_count(),
                    "python": platform.python_version(),
                    "torch": __import__("torch").__version__},
        "quick": args.quick, "steps": steps, "train_tokens": sizes, "bytes_on_disk": on_disk,
        "generate_seconds": made, "runs": runs,
        "median_peak_rss_bytes": rss, "rss_growth_large_vs_small": growth,
        "max_data_wait_fraction": wait,
        "bounds": {"rss_growth": RSS_BOUND, "data_wait": WAIT_BOUND},
        "within_bounds": growth <= RSS_BOUND and max(wait.values()) < WAIT_BOUND,
    }
    if not args.work:
        shutil.rmtree(work)
    out = RESULTS.with_name("token_shards_quick.json") if args.quick else RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("median_peak_rss_bytes",
                                             "rss_growth_large_vs_small",
                                             "max_data_wait_fraction", "within_bounds")},
                     indent=1))


def _cpu_model() -> str:
    from leantrain.env import cpu_model

    return cpu_model()


if __name__ == "__main__":
    main()
