"""The `leantrain` command: the default job, the error paths, and resume after SIGKILL."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import kill_mid_run, train_here

from leantrain.cli import main

FAST = ["--no-progress", "--set", "train.epochs=1", "--set", "data.batch_size=256"]


def run_cli(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "leantrain", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout)


def test_default_train_reaches_97_percent(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["val_accuracy"] >= 0.97
    table = capsys.readouterr().out
    for row in ("validation accuracy", "wall time", "samples/s", "peak memory", "channels_last",
                "applied", "not applied: "):
        assert row in table


def test_help_documents_every_option():
    result = run_cli("train", "--help")
    assert result.returncode == 0
    for option in ("--recipe", "--config", "--set", "--model", "--data", "--target-acc",
                   "--epochs", "--device", "--precision", "--compile", "--out", "--resume",
                   "--no-progress", "--debug"):
        assert option in result.stdout, option


def _assert_clean_failure(result, fragment, out_dir):
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("leantrain: error:") and fragment in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    assert not out_dir.exists(), "a failed run must not leave files behind"


@pytest.fixture
def user_code(tmp_path):
    (tmp_path / "usercode.py").write_text(
        "import torch\nfrom torch import nn\nfrom torch.utils.data import TensorDataset\n"
        "def model():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n"
        "def wide_data():\n"
        "    x = torch.randn(40, 1, 8, 9)\n"
        "    return TensorDataset(x, torch.zeros(40, dtype=torch.long)), TensorDataset(x, "
        "torch.zeros(40, dtype=torch.long))\n"
        "def many_labels():\n"
        "    x = torch.randn(40, 1, 8, 8)\n"
        "    y = torch.arange(40)\n"
        "    return TensorDataset(x, y), TensorDataset(x, y)\n"
    )
    return tmp_path


@pytest.mark.parametrize("args, fragment", [
    (["--set", "optim.lrr=0.1"], "unknown config key 'optim.lrr'; allowed keys here: name, lr"),
    (["--set", "optim.lr=fast"], "'optim.lr' has value 'fast' (str); allowed: float"),
    (["--data", "/no/such/data.npz"], "data path not found: /no/such/data.npz"),
    (["--model", "nosuchpkg.models:build"], "cannot import module 'nosuchpkg.models'"),
    (["--model", "usercode:missing"], "module 'usercode' has no 'missing'"),
    (["--model", "usercode:model", "--data", "usercode:wide_data"],
     "the model cannot run on the data: input batch of shape (40, 1, 8, 9)"),
    (["--model", "usercode:model", "--data", "usercode:many_labels"],
     "labels out of range: found 0..39, but the model outputs 10 classes"),
    (["--resume", "nowhere"], "resume nowhere: no checkpoint.pt"),
])
def test_bad_input_fails_with_one_clear_line(user_code, args, fragment):
    out = user_code / "run"
    result = run_cli("train", "--out", str(out), *args, cwd=user_code) if "--resume" not in args \
        else run_cli("train", *args, cwd=user_code)
    _assert_clean_failure(result, fragment, out)


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("--debug", "train", "--set", "optim.lrr=1", "--out", str(tmp_path / "r"))
    assert result.returncode != 0 and "Traceback" in result.stderr and "optim.lrr" in result.stderr


def test_config_file_and_shortcuts(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("optim:\n  lr: 0.05\ntrain:\n  epochs: 5\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--epochs", "1", "--precision", "fp32",
                 "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["plan"]["precision"] == "fp32"
    assert "lr: 0.05" in (out / "config.yaml").read_text()
    assert main(["train", "--out", str(out), "--no-progress"]) == 2  # will not overwrite a run


def test_csv_data_gets_a_default_model(tmp_path):
    rows = ["f1,f2,label"] + [f"{i % 3 + 0.1 * (i % 7)},{-(i % 3)},{i % 3}" for i in range(90)]
    (tmp_path / "t.csv").write_text("\n".join(rows))
    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "t.csv"), "--out", str(out), *FAST,
                 "--set", "train.epochs=10", "--set", "data.batch_size=16"]) == 0
    assert json.loads((out / "summary.json").read_text())["val_accuracy"] > 0.9


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path):
    args = ["train", "--no-progress", "--set", "train.epochs=3",
            "--set", "train.checkpoint_every=4", "--set", "train.log_every=1"]
    train_here([*args, "--out", str(tmp_path / "full")])  # (a process's threads: see conftest)

    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "leantrain", *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    kill_mid_run(proc, out, 30, timeout=120)  # in the second epoch (23 steps an epoch)
    step = torch.load(out / "checkpoint.pt", weights_only=True)["progress"]["step"]
    assert 0 < step < 69

    train_here(["train", "--resume", str(out), "--no-progress"])
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(out / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not [p for p in Path(out).iterdir() if p.name.endswith(".tmp")]
