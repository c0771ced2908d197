import logging
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

# The commands tests start as processes keep torch's default threads (a command from the
# command line fits them to the cores others leave free): a run and its resume then compute
# alike on a loaded machine. tests/test_measure.py tests the fitting itself.
os.environ["LEANTRAIN_FIT_THREADS"] = "0"


# torch's threads in a process just started (read before any test could change them)
PROCESS_THREADS = torch.get_num_threads()


def train_here(argv: list[str]) -> None:
    """`leantrain ARGV` (a one-process train or resume) in this process, with the threads a
    process started for it gets: the same run, without the interpreter, torch and transformers
    to start (about 3 s each on a 2-core machine). The launches it is compared with still
    start their own processes; a user module it names must be importable here."""
    from leantrain.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(PROCESS_THREADS)
    try:
        assert main(argv) == 0, argv
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _quiet_and_seeded():
    torch.manual_seed(0)
    logging.getLogger("leantrain").setLevel(logging.WARNING)


class FakeClock:
    """Injected time for timing tests: `now()` moves only when the test's model or data says
    so (`advance`), so what a measurement finds is what the test set, on a loaded machine as on
    a quiet one. No test of leantrain's timing logic asserts on the wall clock."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def fake_clock(monkeypatch) -> FakeClock:
    """Every timing leantrain takes (`leantrain.measure.clock`) reads this clock instead, and
    the machine reads as quiet (`measure.load.slowdown`): budgets plan alike on a loaded one."""
    from leantrain.measure import clock, load

    fake = FakeClock()
    monkeypatch.setattr(clock, "now", fake.now)
    monkeypatch.setattr(load, "slowdown", lambda: 1.0)
    return fake


class Ticking(nn.Module):
    """A model whose every forward takes `seconds` of injected time on `clock`."""

    def __init__(self, inner: nn.Module, clock: FakeClock, seconds: float = 0.01):
        super().__init__()
        self.inner, self.clock, self.seconds = inner, clock, seconds

    def forward(self, x):
        self.clock.advance(self.seconds)
        return self.inner(x)


def blobs(n: int = 256, features: int = 8, classes: int = 3, seed: int = 0):
    """Separable Gaussian blobs: a tabular task an MLP learns in a few steps."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, features, generator=g) * 3
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, features, generator=g)
    return x, y


@pytest.fixture
def tabular():
    x, y = blobs()
    return TensorDataset(x[:200], y[:200]), TensorDataset(x[200:], y[200:])


def mlp(features: int = 8, classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(features, 32), nn.ReLU(), nn.Linear(32, classes))


def small_images(n: int = 512):
    """(train, val) of random 1x12x12 images with 10 classes, the last 64 for validation:
    what `tiny_cnn` trains on when only the plan, not the learning, is under test."""
    from torch.utils.data import TensorDataset
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 12, 12, generator=g), torch.randint(0, 10, (n,), generator=g)
    return TensorDataset(x[:n - 64], y[:n - 64]), TensorDataset(x[n - 64:], y[n - 64:])


def tiny_cnn(classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))


def kill_mid_run(proc, out: Path, step: int, timeout: float = 300) -> None:
    """SIGKILL `proc` (a `leantrain train --out OUT` process) once its metrics log a step at or
    past `step` with a checkpoint written: the folder a run killed mid-training leaves."""
    import json
    import signal
    import time

    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "checkpoint.pt").exists() and metrics.exists() and any(
                json.loads(line).get("step", 0) >= step
                for line in metrics.read_text().splitlines()[:-1]):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model.pt").exists(), "the run was meant to be killed before it finished"


def snapshot_first_checkpoint(monkeypatch, train, snapshot):
    """Run `train()` and copy its run folder right after its first checkpoint to `snapshot`:
    the folder a run killed at that instant leaves behind (for resume tests)."""
    import shutil

    from leantrain.run.checkpoints import Checkpoints

    original = Checkpoints.save

    def save_and_snapshot_first(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if not snapshot.exists():
            # a killed run's lock names a dead process (stale, taken over on resume); this
            # live one's is left out
            shutil.copytree(self.out_dir, snapshot, ignore=shutil.ignore_patterns(".lock"))

    with monkeypatch.context() as patch:
        patch.setattr(Checkpoints, "save", save_and_snapshot_first)
        train()


def refused_on_this_machine(capsys, tmp_path, *settings: str) -> str:
    """`leantrain train` asked for something this machine cannot run: it exits 2 with one line
    on stderr (returned) and writes no model."""
    from leantrain.cli import main

    out = tmp_path / "run"
    assert main(["train", *settings, "--epochs", "1", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert not (out / "model.pt").exists()
    return err[0]
