"""Hugging Face `datasets` as a data function returns them: a memory-mapped Arrow `Dataset`
and a sharded `IterableDataset`, unformatted (rows of Python lists), learn through `fit()`, and
a stream's shards are split by leantrain, not by the library, under loader workers."""

from collections import Counter

import pytest
import torch

datasets = pytest.importorskip("datasets")

from leantrain.config import TrainConfig, load_config  # noqa: E402
from leantrain.data.batching import make_loader, marking_last  # noqa: E402
from leantrain.data.loaders import LoaderOptions  # noqa: E402
from leantrain.run.fit import fit  # noqa: E402


def rows(n: int, seed: int = 0, start: int = 0):
    g = torch.Generator().manual_seed(seed)
    for i in range(start, start + n):
        x = torch.randn(6, generator=g)
        yield {"x": x.tolist(), "labels": int(x[0] + x[1] > 0), "id": i}


def generated(shards: list[tuple[int, int]]):
    """Rows of each (seed, start) shard, 60 a shard."""
    for seed, start in shards:
        yield from rows(60, seed, start)


class Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(),
                                       torch.nn.Linear(32, 2))

    def forward(self, x, id=None):  # noqa: A002 (the rows' key)
        return self.net(x)


def _cfg(*more: str) -> TrainConfig:
    return load_config(None, ["data.batch_size=16", "optim.lr=0.01", "train.epochs=4",
                              "train.monitor_interval_s=0", *more], TrainConfig().to_dict())


def test_an_arrow_dataset_from_disk_learns_as_it_is(tmp_path):
    datasets.Dataset.from_list(list(rows(400))).save_to_disk(tmp_path / "train")
    datasets.Dataset.from_list(list(rows(100, seed=1))).save_to_disk(tmp_path / "val")
    train = datasets.load_from_disk(tmp_path / "train")  # memory-mapped Arrow, unformatted
    val = datasets.load_from_disk(tmp_path / "val")
    summary = fit(Classifier(), train, val, _cfg(), progress_bar=False)
    assert summary["val_accuracy"] > 0.85


def test_a_sharded_iterable_dataset_learns_and_is_split_by_leantrain_under_workers():
    shards = [(s, 1000 * s) for s in range(3)]
    stream = datasets.IterableDataset.from_generator(generated, gen_kwargs={"shards": shards})
    assert stream.num_shards == 3
    summary = fit(Classifier(), stream, datasets.IterableDataset.from_generator(
        generated, gen_kwargs={"shards": [(9, 9000)]}), _cfg("train.max_steps=40",
                                                             "data.num_workers=2"),
        progress_bar=False)
    assert summary["steps"] == 40 and summary["val_accuracy"] > 0.8
    seen = Counter()
    for rank in range(2):
        loader = make_loader(stream.with_format("torch"), 5, True,
                             options=LoaderOptions(num_workers=2), shard=(rank, 2))
        seen.update(int(i) for batch, _ in marking_last(loader) for i in batch["id"])
    # 180 rows, global batches of 5 x 2: all 18 whole, each row read once
    assert sorted(seen) == sorted(r["id"] for r in generated(shards))
    assert set(seen.values()) == {1}
