"""The layers contract (import-linter, in pyproject.toml) holds, and an upward import breaks it."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent))


def _lint(src: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """lint-imports on the package under `src`, with the project's own contract."""
    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = "\n".join(f"    {layer}" for layer in contract["contracts"][0]["layers"])
    config = tmp_path / "layers.ini"
    config.write_text(f"[importlinter]\nroot_package = {contract['root_package']}\n\n"
                      f"[importlinter:contract:layers]\nname = layers\ntype = layers\n"
                      f"layers =\n{layers}\n")
    return subprocess.run([LINT, "--config", str(config), "--no-cache"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(src), "PATH": str(Path(sys.executable).parent)})


@pytest.mark.skipif(LINT is None, reason="import-linter is a dev dependency")
def test_the_layers_hold_and_an_upward_import_breaks_them(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "leantrain", src / "leantrain")
    kept = _lint(src, tmp_path)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    loaders = src / "leantrain" / "data" / "loaders.py"  # data may not import the run layer
    loaders.write_text(loaders.read_text() + "\nfrom ..run import plan  # noqa\n")
    broken = _lint(src, tmp_path)
    assert broken.returncode != 0
    assert "leantrain.data.loaders -> leantrain.run.plan" in broken.stdout
