"""`leantrain --help` and every `leantrain COMMAND --help` start without importing torch."""

import subprocess
import sys

import pytest

from leantrain.commands import COMMANDS

PROBE = """
import sys
from leantrain.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("TORCH" if any(m == "torch" or m.startswith("torch.") for m in sys.modules) else "NONE")
"""


@pytest.mark.parametrize("argv", [["--help"]] + [[name, "--help"] for name in COMMANDS])
def test_help_imports_no_torch(argv):
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage: leantrain" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "NONE"


TRAIN_RUN = """
import sys
from leantrain.cli import main
main(["train", "--no-progress", "--set", "train.max_steps=160", "--out", sys.argv[1]])
print("LOADED", *sorted({m.split(".")[0] for m in sys.modules}))
"""

# what a digits run must not import (scikit-learn's import was 1.07 s of a 9.7 s run; scipy's,
# for the interval of the plan its first steps decide, 1.1 s of 9 s): 160 steps, so it decides
UNUSED = ("sklearn", "scipy", "pandas", "matplotlib", "transformers", "optuna", "peft",
          "datasets", "torchao", "lightning")
OWN_SHARE = 0.15  # leantrain's own modules' share of the run's import time (0.09 measured)


def test_a_digits_run_imports_only_what_it_uses_and_little_of_its_own(tmp_path):
    """`python -X importtime` on a whole `train` run of the default recipe: no library it
    never uses, and leantrain's own modules (their self time) a small share of all imports.
    A share, not a time: it holds on a slow or busy machine."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", TRAIN_RUN,
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = set(done.stdout.strip().splitlines()[-1].split()[1:])
    assert not loaded & set(UNUSED), sorted(loaded & set(UNUSED))
    own = total = 0
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        self_us, _, name = (part.strip() for part in line[len("import time:"):].split("|"))
        if not self_us.isdigit():
            continue  # (the header)
        total += int(self_us)
        own += int(self_us) if name.startswith("leantrain") else 0
    assert total > 0 and own / total < OWN_SHARE, (own, total)
