"""Streams (datasets without a length): batched and split across ranks and loader workers with
every sample of an epoch read once, resumed mid-epoch exactly, trained through `fit()` and the
CLI, and refused in one line when they cannot be used."""

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import kill_mid_run, snapshot_first_checkpoint
from torch.utils.data import IterableDataset

from leantrain.config import load_config
from leantrain.data.batching import make_loader, marking_last
from leantrain.data.loaders import LoaderOptions
from leantrain.errors import LeantrainError
from leantrain.run.fit import fit


class Numbered(IterableDataset):
    """`n` samples (x, y, id), the same on every pass; y says whether x[0] > 0. With `noise`,
    each sample also draws from torch's global random numbers (as augmentation would)."""

    def __init__(self, n: int, seed: int = 0, noise: bool = False):
        self.n, self.seed, self.noise = n, seed, noise

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        for i in range(self.n):
            x = torch.randn(8, generator=generator)
            if self.noise:
                x = x + 0.01 * torch.randn(8)
            yield {"x": x, "labels": (x[0] > 0).long(), "id": torch.tensor(i)}


class Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(),
                                       torch.nn.Dropout(0.2), torch.nn.Linear(32, 2))

    def forward(self, x, id=None):  # noqa: A002 (the batch's key)
        return self.net(x)


def ids_seen(loader, epoch: int = 0, start: int = 0) -> list[int]:
    return [int(i) for batch, _ in marking_last(loader, epoch, start) for i in batch["id"]]


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_and_workers_together_read_each_sample_of_an_epoch_once(workers):
    seen = Counter()
    per_rank = []
    for rank in range(2):
        loader = make_loader(Numbered(103), 5, True, options=LoaderOptions(num_workers=workers),
                             shard=(rank, 2))
        ids = ids_seen(loader)
        per_rank.append(len(ids))
        seen.update(ids)
    # 103 samples, global batches of 5 x 2: ten full ones; the short last one is dropped
    assert per_rank == [50, 50] and sorted(seen) == list(range(100))
    assert set(seen.values()) == {1}


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_resumes_at_any_batch_of_an_epoch_with_the_same_batches(workers):
    loader = make_loader(Numbered(47, noise=True), 4, True,
                         options=LoaderOptions(num_workers=workers))
    whole = list(marking_last(loader, epoch=1))
    assert [last for _, last in whole] == [False] * 11 + [True]  # 11 of 4, then 3
    for start in (1, 5, 11):
        resumed = list(marking_last(loader, epoch=1, start=start))
        assert len(resumed) == len(whole) - start
        for (a, _), (b, _) in zip(resumed, whole[start:], strict=True):
            assert torch.equal(a["x"], b["x"]) and torch.equal(a["id"], b["id"])


def test_reading_a_stream_never_moves_the_trainings_random_numbers():
    loader = make_loader(Numbered(20, noise=True), 4, True)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    list(marking_last(loader))
    assert torch.equal(torch.get_rng_state(), before)


def _fit(out: Path, workers: int, **train) -> dict:
    from leantrain.config import TrainConfig

    cfg = load_config(None, [f"data.num_workers={workers}", "data.batch_size=16",
                             "train.epochs=3", "train.max_steps=40", "train.log_every=5",
                             "train.checkpoint_every=7", "optim.lr=0.01",
                             *(f"train.{k}={v}" for k, v in train.items())],
                      TrainConfig().to_dict() | {"recipe": "default"})
    return fit(Classifier(), Numbered(256, noise=True), Numbered(64, seed=1), cfg, out,
               progress_bar=False)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_run_learns_and_resumes_mid_epoch_bit_identical(tmp_path, monkeypatch,
                                                                 workers):
    full = _fit(tmp_path / "full", workers)
    assert full["steps"] == 40  # 16 a step over 256 samples: 16 per epoch, bounded at 40
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").open()]
    losses = [r["val_loss"] for r in records if r["kind"] == "epoch"]
    assert losses[-1] < 0.8 * losses[0] and losses[-1] < 0.69  # it learns: below chance
    snapshot = tmp_path / "snapshot"
    snapshot_first_checkpoint(monkeypatch, lambda: _fit(tmp_path / "other", workers), snapshot)
    state = torch.load(snapshot / "checkpoint.pt", weights_only=True)
    assert state["progress"]["step"] == 7 and state["progress"]["batch"] == 7  # mid-epoch
    cfg = load_config(snapshot / "config.yaml")
    fit(Classifier(), Numbered(256, noise=True), Numbered(64, seed=1), cfg, snapshot,
        resume=True, progress_bar=False)
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(snapshot / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stream_without_max_steps_is_one_line_before_any_work(tmp_path):
    from leantrain.config import TrainConfig

    with pytest.raises(LeantrainError, match="stream .*set how long to train with "
                                             "train.max_steps"):
        fit(Classifier(), Numbered(64), Numbered(16), TrainConfig(), tmp_path / "run")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def _generator():
    yield from Numbered(8)


@pytest.mark.parametrize("train, fragment", [
    (_generator(), "used up after one pass"),
    (Numbered(0), "yielded no sample"),
])
def test_a_stream_that_cannot_train_is_one_line(tmp_path, train, fragment):
    from leantrain.config import TrainConfig

    cfg = load_config(None, ["train.max_steps=5", "data.batch_size=16"], TrainConfig().to_dict())
    with pytest.raises(LeantrainError, match=fragment):
        fit(Classifier(), train, Numbered(16), cfg, tmp_path / "run")


def test_a_stream_shorter_than_one_batch_of_every_rank_is_one_line():
    from leantrain.data.batching import first_batch

    with pytest.raises(LeantrainError, match="training stream ended before its first batch of "
                                             r"16 x 2 process\(es\)"):
        first_batch(make_loader(Numbered(20), 16, True, shard=(1, 2)))


class Failing(Numbered):
    def __iter__(self):
        for i, sample in enumerate(super().__iter__()):
            if i == 21:
                raise OSError("connection reset")
            yield sample


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_that_fails_mid_epoch_names_the_sample(workers):
    loader = make_loader(Failing(64), 4, True, options=LoaderOptions(num_workers=workers))
    with pytest.raises(Exception) as raised:
        ids_seen(loader)
    assert "raised OSError: connection reset at sample 21 of epoch 1" in str(raised.value)


STREAM_MODULE = textwrap.dedent('''
    import os
    import torch
    from torch.utils.data import IterableDataset

    class Numbered(IterableDataset):
        def __init__(self, n, seed=0):
            self.n, self.seed = n, seed
        def __iter__(self):
            g = torch.Generator().manual_seed(self.seed)
            for i in range(self.n):
                x = torch.randn(8, generator=g)
                yield {"x": x, "labels": (x[0] > 0).long(), "id": torch.tensor(i)}

    class Recording(torch.nn.Module):
        """Writes the ids of each training batch it sees, one file per rank."""
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Linear(8, 2)
        def forward(self, x, id=None):
            if (self.training and torch.is_grad_enabled() and id is not None
                    and os.environ.get("IDS_DIR")):
                rank = os.environ.get("RANK", "0")
                with open(os.path.join(os.environ["IDS_DIR"], f"ids.{rank}"), "a") as f:
                    f.write(" ".join(str(int(i)) for i in id) + "\\n")
            return self.net(x)

    def data():
        return Numbered(200), Numbered(32, seed=1)

    def model():
        return Recording()
''')


def test_launch_two_ranks_with_two_workers_each_read_every_sample_once(tmp_path):
    (tmp_path / "numbered.py").write_text(STREAM_MODULE)
    ids = tmp_path / "ids"
    ids.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}"
           f"{os.environ.get('PYTHONPATH', '')}", "IDS_DIR": str(ids)}
    done = subprocess.run(
        [sys.executable, "-m", "leantrain", "launch", "--nproc", "2", "--", "train", "--data",
         "numbered:data", "--model", "numbered:model", "--out", str(tmp_path / "run"),
         "--no-progress", "--set", "train.epochs=1", "--set", "train.max_steps=1000",
         "--set", "data.batch_size=10", "--set", "data.num_workers=2",
         "--set", "train.monitor_interval_s=0",
         # 6 processes on 2 cores beside a CPU hog: a collective waited past gloo's 60 s once
         "--set", "train.dist_timeout_s=240"],
        capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = Counter()
    for rank in (0, 1):
        batches = (ids / f"ids.{rank}").read_text().splitlines()
        # the run's FLOP count traces the first batch once before training takes it
        assert batches[0] == batches[1]
        trained = " ".join(batches[1:]).split()
        assert len(trained) == 100  # 10 steps of 10 samples on each rank
        seen.update(map(int, trained))
    assert sorted(seen) == list(range(200)) and set(seen.values()) == {1}


def test_a_stream_run_killed_mid_epoch_resumes_bit_identical(tmp_path):
    (tmp_path / "numbered.py").write_text(STREAM_MODULE)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}"
           f"{os.environ.get('PYTHONPATH', '')}"}
    args = ["train", "--data", "numbered:data", "--model", "numbered:model", "--no-progress",
            "--set", "train.epochs=2", "--set", "train.max_steps=30", "--set",
            "data.batch_size=8", "--set", "data.num_workers=2", "--set",
            "train.checkpoint_every=3", "--set", "train.log_every=1"]

    def cli(*more, **kwargs):
        return subprocess.Popen([sys.executable, "-m", "leantrain", *args, *more], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                **kwargs)

    full = cli("--out", str(tmp_path / "full"))
    assert full.wait(timeout=300) == 0, full.stderr.read()[-2000:]
    out = tmp_path / "killed"
    kill_mid_run(cli("--out", str(out)), out, 10)  # mid-epoch: 25 steps an epoch
    resumed = subprocess.run([sys.executable, "-m", "leantrain", "train", "--resume", str(out),
                              "--data", "numbered:data", "--model", "numbered:model",
                              "--no-progress"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_loader_tuning_measures_a_streams_readers():
    from leantrain.data.tuning import tune_loader

    tuning = tune_loader(Numbered(4000), 32, lambda batch: None, LoaderOptions(),
                         {"num_workers"}, on_cuda=False, epochs=1, window_s=0.05, rounds=1)
    workers = {m.options.num_workers for m in tuning.measured}
    assert 0 in workers and len(workers) >= 2  # 0 and at least one count of workers
    assert all(m.median("samples_per_second") > 0 for m in tuning.measured)
    assert not tuning.choice.persistent_workers


class ShrinkingAfterTheFirstEpoch(Numbered):
    def set_epoch(self, epoch: int) -> None:
        self.n = 40 if epoch == 0 else 3


def test_an_epoch_of_a_stream_without_a_batch_is_one_line_not_an_endless_loop():
    loader = make_loader(ShrinkingAfterTheFirstEpoch(40), 4, True, shard=(0, 2))
    assert len(list(marking_last(loader, epoch=0))) == 5
    with pytest.raises(LeantrainError, match="yielded no batch of 4 x 2 process\\(es\\) in "
                                             "epoch 2"):
        list(marking_last(loader, epoch=1))
