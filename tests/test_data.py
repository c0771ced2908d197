import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset, TensorDataset

from leantrain.config import DataConfig
from leantrain.data import DataLoaderBatches, InMemoryBatches, load_data, make_loader, tensors_of
from leantrain.errors import LeantrainError


def test_digits_is_32x32_standardised_with_a_fixed_80_20_split():
    a, b = load_data(DataConfig()), load_data(DataConfig())
    xt, yt = a.train.tensors
    xv, _ = a.val.tensors
    assert xt.shape[1:] == (1, 32, 32) and a.num_classes == 10
    assert len(xt) + len(xv) == 1797 and len(xv) == round(1797 * 0.2)
    assert abs(xt.mean().item()) < 1e-4 and abs(xt.std().item() - 1) < 1e-3
    assert torch.equal(yt, b.train.tensors[1])  # the split does not move between runs


def _check_batches(loader, n):
    seen = torch.cat([y for _, y in loader.batches(epoch=3)])
    assert sorted(seen.tolist()) == list(range(n))  # every sample once per epoch
    return seen


def test_in_memory_and_dataloader_draw_the_same_order_and_resume_mid_epoch():
    n = 50
    x, y = torch.randn(n, 3), torch.arange(n)
    fast = make_loader(TensorDataset(x, y), 8, shuffle=True, seed=5)
    assert isinstance(fast, InMemoryBatches) and len(fast) == 7
    order = _check_batches(fast, n)
    plain = DataLoaderBatches(TensorDataset(x, y), 8, shuffle=True, seed=5)
    assert torch.equal(order, _check_batches(plain, n))
    assert not torch.equal(order, torch.cat([b for _, b in fast.batches(epoch=4)]))
    for loader in (fast, plain):
        tail = torch.cat([b for _, b in loader.batches(epoch=3, start=2)])
        assert torch.equal(tail, order[16:])


def test_subsets_of_tensor_datasets_use_the_in_memory_loader():
    base = TensorDataset(torch.randn(10, 2), torch.arange(10))
    x, y = tensors_of(Subset(base, [7, 2]))
    assert y.tolist() == [7, 2]


def test_npz_source(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.random.rand(40, 5).astype("float32"), y=np.arange(40) % 4)
    bundle = load_data(DataConfig(source=str(path), val_fraction=0.25))
    assert len(bundle.train) == 30 and len(bundle.val) == 10 and bundle.num_classes == 4


def test_npz_without_y(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((4, 2)))
    with pytest.raises(LeantrainError, match="needs arrays 'x' and 'y'"):
        load_data(DataConfig(source=str(path)))


def test_csv_source_standardises_features(tmp_path):
    path = tmp_path / "t.csv"
    rows = ["a,b,target"] + [f"{i},{100 + 2 * i},{i % 3}" for i in range(30)]
    path.write_text("\n".join(rows))
    bundle = load_data(DataConfig(source=str(path), label_column="target"))
    x, y = bundle.train.tensors
    assert x.shape[1] == 2 and bundle.num_classes == 3
    assert torch.allclose(x.mean(0), torch.zeros(2), atol=1e-5)
    with pytest.raises(LeantrainError, match="no label column 'label'"):
        load_data(DataConfig(source=str(path)))


def test_csv_rejects_text_and_fractional_labels(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,label\n1,x\n2,1\n3,0\n")
    with pytest.raises(LeantrainError, match="line 2, column .label.: .x. is not a number"):
        load_data(DataConfig(source=str(path)))
    path.write_text("a,label\n1,0.5\n2,1\n3,0\n")
    with pytest.raises(LeantrainError, match="integer class indices"):
        load_data(DataConfig(source=str(path)))


def test_image_folder_decodes_per_item(tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(5):
            pixels = np.full((6, 6), 40 * i, dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / label / f"{i}.png")
    bundle = load_data(DataConfig(source=str(tmp_path), val_fraction=0.2))
    assert bundle.num_classes == 2 and len(bundle.train) == 8 and len(bundle.val) == 2
    x, y = bundle.train[0]
    assert x.shape == (1, 6, 6) and 0 <= x.min() <= x.max() <= 1
    loader = make_loader(bundle.train, 4, shuffle=True)
    assert isinstance(loader, DataLoaderBatches)
    assert sum(len(b) for _, b in loader.batches()) == 8


def test_missing_data_path_names_it():
    with pytest.raises(LeantrainError, match="data path not found: /no/such/dir"):
        load_data(DataConfig(source="/no/such/dir"))


def test_data_function_must_return_two_datasets(tmp_path, monkeypatch):
    (tmp_path / "baddata.py").write_text("def load():\n    return [1, 2, 3]\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LeantrainError, match=r"must return \(train_dataset, val_dataset\)"):
        load_data(DataConfig(source="baddata:load"))


def test_drop_last_keeps_only_full_batches_in_both_loaders():
    ds = TensorDataset(torch.arange(10.0).view(10, 1), torch.zeros(10, dtype=torch.long))
    for in_memory in (True, False):
        keep = make_loader(ds, 4, shuffle=True, in_memory=in_memory)
        drop = make_loader(ds, 4, shuffle=True, in_memory=in_memory, drop_last=True)
        assert len(keep) == 3 and [len(b[1]) for b in keep.batches()] == [4, 4, 2]
        assert len(drop) == 2 and [len(b[1]) for b in drop.batches()] == [4, 4]


def test_a_compiled_run_trains_on_full_batches_only(tabular):
    """The short last batch would make the compiled model recompile for a new shape."""
    from conftest import mlp

    from leantrain.config import load_config
    from leantrain.run.plan import build

    train, val = tabular  # 200 samples
    horizons = set()
    for compiled, batches in ((False, 4), (True, 3)):
        cfg = load_config(None, ["data.batch_size=64", f"plan.compile={str(compiled).lower()}",
                                 "plan.device=cpu", "train.monitor_interval_s=0"])
        run = build(cfg, mlp(), train, val, measure_loader=False)
        assert len(run.train_loader) == batches
        assert len(run.val_loader) == 1  # evaluation (eager) keeps every sample
        horizons.add(run.total_steps)
    assert len(horizons) == 1  # the same LR at every step: the bench compares them step-wise
    cfg = load_config(None, ["data.batch_size=256", "plan.compile=true", "plan.device=cpu",
                             "train.monitor_interval_s=0"])
    small = build(cfg, mlp(), train, val, measure_loader=False)
    assert len(small.train_loader) == 1  # no full batch at all: the short one is kept


def test_the_in_memory_loader_on_a_dataset_of_items_is_a_clear_error(tabular):
    from conftest import mlp
    from test_measure import SlowItems

    from leantrain.config import load_config
    from leantrain.run.plan import build

    cfg = load_config(None, ["data.loader=in-memory", "plan.device=cpu"])
    with pytest.raises(LeantrainError, match="'in-memory' needs a tensor-backed dataset"):
        build(cfg, mlp(), SlowItems(16, delay=0), tabular[1])
    auto = build(load_config(None, ["plan.device=cpu", "data.num_workers=0"]), mlp(),
                 SlowItems(16, delay=0), tabular[1])
    assert auto.train_loader.kind.startswith("DataLoader")  # "auto": the only loader it can use
    assert auto.val_loader.kind == "in-memory batched"  # the validation set is tensors


def test_the_digits_are_read_without_importing_scikit_learn_and_match_its_loader():
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from leantrain.data.sources import _digits_arrays

    images, target = _digits_arrays()
    reference = load_digits()
    assert np.array_equal(images, reference.images) and np.array_equal(target, reference.target)
    code = ("import sys; from leantrain.data.sources import _digits_arrays; _digits_arrays(); "
            "print('sklearn' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "False"  # 1.07 s of a 9.7 s digits run, no longer paid
