"""Start-up time of the command line: `leantrain --help` and `leantrain train --help`.

Each command runs as a whole fresh process (`python -m leantrain ...`), 5 times, interleaved
with the other commands in alternating order; the median and range are reported. The
floor (issue: run layer) is 0.5 s for both `--help` commands, which import no torch.
`python -c "import torch"` is timed beside them for scale.

    python benchmarks/startup.py   # writes benchmarks/results/startup.json
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from leantrain.env import cpu_model  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "startup.json"
REPEATS = 5
COMMANDS = {
    "leantrain --help": [sys.executable, "-m", "leantrain", "--help"],
    "leantrain train --help": [sys.executable, "-m", "leantrain", "train", "--help"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
}


def seconds(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    names = list(COMMANDS)
    for r in range(REPEATS):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(seconds(COMMANDS[name]))
    result = {
        "machine": cpu_model(), "repeats": REPEATS,
        "commands": {name: {"seconds": t, "median_s": statistics.median(t),
                            "min_s": min(t), "max_s": max(t)} for name, t in times.items()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for name, row in result["commands"].items():
        print(f"{name:28s} median {row['median_s']:.3f} s  ({row['min_s']:.3f}-{row['max_s']:.3f})")
    print(f"machine: {result['machine']}; raw: {RESULTS}")


if __name__ == "__main__":
    main()
