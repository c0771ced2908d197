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
