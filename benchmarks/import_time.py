"""What a digits `leantrain train` run spends importing, by `python -X importtime`.

The run is the default recipe cut to 2 steps (what it imports does not depend on its
length); each `--src` (a leantrain source tree: this one, or an older commit's worktree) is run
`--repeats` times, interleaved. Reported per tree: the median of the summed self times of all
imports, and the cumulative times of the heavy packages issue 44 named (scikit-learn's
`sklearn.datasets`, `torch._dynamo`) where they were imported.

    git worktree add /tmp/before aa7ad16^   # before digits stopped importing scikit-learn
    python benchmarks/import_time.py --src before=/tmp/before/src now=src
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "import_time.json"
RUN = """
import sys
from leantrain.cli import main
main(["train", "--no-progress", "--set", "train.max_steps=2", "--out", sys.argv[1]])
"""
WATCHED = ("sklearn", "sklearn.datasets", "torch", "torch._dynamo", "leantrain")


def measure(src: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, "-X", "importtime", "-c", RUN, f"{tmp}/run"],
                              capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONPATH": src,
                                   "LEANTRAIN_CACHE": f"{tmp}/cache"})
    total, cumulative = 0, {}
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        self_us, cum_us, name = (part.strip() for part in line[len("import time:"):].split("|"))
        if self_us.isdigit():
            total += int(self_us)
            if name in WATCHED:
                cumulative[name] = cumulative.get(name, 0) + int(cum_us) / 1e6
    return {"imports_s": total / 1e6, "cumulative_s": cumulative}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", nargs="+", required=True, metavar="LABEL=PATH")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    trees = dict(item.split("=", 1) for item in args.src)
    runs: dict[str, list[dict]] = {label: [] for label in trees}
    for r in range(args.repeats):
        for label in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
            runs[label].append(measure(str(Path(trees[label]).resolve())))
            print(label, json.dumps(runs[label][-1]), flush=True)
    from leantrain.env import cpu_model
    record = {"machine": {"cpu": cpu_model(), "arch": platform.machine()},
              "run": "leantrain train (digits-cnn recipe), train.max_steps=2",
              "median_imports_s": {label: statistics.median(r["imports_s"] for r in found)
                                   for label, found in runs.items()},
              "trees": trees, "runs": runs}
    RESULTS.write_text(json.dumps(record, indent=1))
    print(json.dumps(record["median_imports_s"]))


if __name__ == "__main__":
    main()
