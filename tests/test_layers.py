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
    """lint-imports on the package under `src`, with the project's own contracts."""
    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = "\n".join(f"    {layer}" for layer in contract["contracts"][0]["layers"])
    acyclic = contract["contracts"][1]
    config = tmp_path / "layers.ini"
    config.write_text(f"[importlinter]\nroot_package = {contract['root_package']}\n"
                      f"exclude_type_checking_imports = "
                      f"{contract['exclude_type_checking_imports']}\n\n"
                      f"[importlinter:contract:layers]\nname = layers\ntype = layers\n"
                      f"layers =\n{layers}\n\n"
                      f"[importlinter:contract:acyclic]\nname = acyclic\n"
                      f"type = {acyclic['type']}\nancestors = {acyclic['ancestors'][0]}\n")
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


@pytest.mark.skipif(LINT is None, reason="import-linter is a dev dependency")
def test_an_import_circle_inside_a_package_breaks_the_contract(tmp_path):
    """run/ once held plan -> step -> recovery -> state -> plan: one at run time is refused."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "leantrain", src / "leantrain")
    state = src / "leantrain" / "run" / "state.py"
    state.write_text(state.read_text() + "\nfrom . import plan as _plan  # noqa\n")
    broken = _lint(src, tmp_path)
    assert broken.returncode != 0
    assert "No cycles are allowed in leantrain.run" in broken.stdout


def test_the_training_loop_stays_on_a_page():
    """DESIGN.md: the loop stays on a page; what it calls has a module of its own."""
    lines = (ROOT / "src" / "leantrain" / "run" / "trainer.py").read_text().splitlines()
    assert len(lines) <= 300, f"run/trainer.py has {len(lines)} lines"
