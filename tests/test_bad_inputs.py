"""Nothing lost, nothing silent: every bad input, bad state and interruption the reliability
issue lists ends in one line (exit 2, or 128 + the signal), with the run folder as it should
be afterwards: no half-written files, the last finite checkpoint kept, resumes bit-identical.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import blobs, mlp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from leantrain import fit, load_config
from leantrain.checkpoint import atomic_save
from leantrain.cli import main
from leantrain.errors import LeantrainError
from leantrain.run import folder as run_folder
from leantrain.run import trainer as trainer_module
from leantrain.run.checkpoints import Checkpoints
from leantrain.run.finite import NonFiniteError
from leantrain.run.signals import Stopped

FAST = ["--no-progress", "--set", "train.monitor_interval_s=0"]


def _one_line_error(capsys, code: int, *fragments: str, exit_code: int = 2) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == exit_code, err
    assert err and err[-1].startswith("leantrain: error:"), err
    for fragment in fragments:
        assert fragment in err[-1], err[-1]
    assert not any("Traceback" in line for line in err)
    return err[-1]


def _cfg(*overrides):
    return load_config(None, ["plan.device=cpu", "data.batch_size=20", "train.epochs=6",
                              "optim.lr=0.05", "train.log_every=5", "train.checkpoint_every=10",
                              "train.monitor_interval_s=0", *overrides])


def _data():
    x, y = blobs(240)
    return TensorDataset(x[:200], y[:200]), TensorDataset(x[200:], y[200:])


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ non-finite values


class _Explodes(nn.Module):
    """Its outputs become inf from the 41st training forward on."""

    def __init__(self):
        super().__init__()
        self.net, self.calls = mlp(), 0

    def forward(self, x):
        if self.training:
            self.calls += 1
        out = self.net(x)
        return out * float("inf") if self.training and self.calls > 40 else out


def test_outputs_that_become_inf_stop_the_run_and_the_kept_checkpoint_is_finite(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError) as caught:
        fit(_Explodes(), *_data(), _cfg(), out, progress_bar=False)
    message = str(caught.value)
    found = re.match(r"step (\d+): the training loss is (nan|inf) \(not finite\)", message)
    assert found, message
    saved = _weights(out / "checkpoint.pt")
    kept = saved["progress"]["step"]
    assert 0 < kept < int(found.group(1)) <= kept + 10  # found at the first log step after
    assert f"last finite checkpoint (step {kept}) is kept in {out}" in message
    assert "optim.lr" in message and "clip_norm" in message  # the usual fixes
    assert all(torch.isfinite(t).all() for t in saved["model"].values())
    assert not (out / "model.pt").exists()  # no non-finite model is ever written


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    """Weights gone NaN after a step whose loss was still finite: the check before the
    checkpoint names the parameter."""
    class Poisoned(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.calls = mlp(), 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 10:
                with torch.no_grad():
                    self.net[0].bias[0] = float("nan")
                return self.net(x).nan_to_num()
            return self.net(x).nan_to_num()

    with pytest.raises(NonFiniteError,
                       match=r"step 10: parameter net\.0\.(weight|bias) holds NaN"):
        fit(Poisoned(), *_data(), _cfg("train.log_every=1000"), tmp_path / "run",
            progress_bar=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_non_finite_buffers_are_never_checkpointed_either(tmp_path):
    """BatchNorm statistics gone inf while the outputs stay finite: the check before the
    checkpoint names the buffer, and the last checkpoint kept holds finite buffers only."""
    class PoisonedStatistics(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                     nn.Linear(16, 3))
            self.calls = 0

        def forward(self, x):
            self.calls += self.training
            if self.calls == 30:  # training normalises by the batch's statistics: still finite
                with torch.no_grad():
                    self.net[1].running_var.fill_(float("inf"))
            return self.net(x)

    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"buffer net\.1\.running_var holds NaN or inf"):
        fit(PoisonedStatistics(), *_data(), _cfg("train.checkpoint_every=5"), out,
            progress_bar=False)
    saved = _weights(out / "checkpoint.pt")
    assert 0 < saved["progress"]["step"] < 30
    assert all(torch.isfinite(t).all() for t in saved["model"].values()
               if t.is_floating_point())


def test_the_cli_exits_2_on_a_run_that_goes_non_finite(tmp_path, capsys, monkeypatch):
    (tmp_path / "explode.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class M(nn.Module):\n"
        "    def __init__(self):\n        super().__init__(); self.l = nn.Linear(1024, 10)\n"
        "    def forward(self, x):\n        return self.l(x.flatten(1)) * float('inf')\n"
        "def model():\n    return M()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["train", "--model", "explode:model", "--epochs", "1", "--out",
                 str(tmp_path / "run"), *FAST])
    _one_line_error(capsys, code, "the training loss is", "not finite")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(["optim.lr", "optim.momentum", "optim.weight_decay",
                            "schedule.warmup_fraction", "train.clip_norm", "data.val_fraction",
                            "train.monitor_interval_s"]),
       value=st.sampled_from([".nan", "nan", "inf", "-inf", "1e400", ".inf"]))
def test_non_finite_config_floats_are_refused_naming_the_key(key, value):
    with pytest.raises(LeantrainError, match=f"'{key}'"):
        load_config(None, [f"{key}={value}"])


@pytest.mark.parametrize("override, fragment", [
    ("optim.momentum=-0.5", "'optim.momentum' must be in [0, 1)"),
    ("optim.weight_decay=-1e-4", "'optim.weight_decay' must be >= 0"),
    (f"train.seed={2**40}", "'train.seed' must be in [0, 2**32)"),
    ("train.seed=-1", "'train.seed' must be in [0, 2**32)"),
])
def test_out_of_range_optimizer_values_and_seeds_are_refused(override, fragment):
    with pytest.raises(LeantrainError) as caught:
        load_config(None, [override])
    assert fragment in str(caught.value)


# ------------------------------------------------------------------ data files


def _csv(path: Path, rows: list[str]) -> Path:
    path.write_text("f1,f2,label\n" + "\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("bad_row, fragment", [
    ("0.5,nan,1", "line 4, column 'f2': nan is not a finite number"),
    ("0.5,,1", "line 4, column 'f2': empty is not a number"),
    ("0.5,x7,1", "line 4, column 'f2': 'x7' is not a number"),
    ("0.5,1", "line 4: 2 values for 3 columns"),
])
def test_csv_values_that_are_not_finite_numbers_name_line_and_column(tmp_path, capsys,
                                                                     bad_row, fragment):
    rows = ["0.1,0.2,0", "0.3,0.1,1", bad_row] + [f"{i / 10},{i / 7},{i % 2}" for i in range(20)]
    data = _csv(tmp_path / "t.csv", rows)
    out = tmp_path / "run"
    code = main(["train", "--data", str(data), "--epochs", "1", "--out", str(out), *FAST])
    _one_line_error(capsys, code, str(data), fragment)
    assert not out.exists()


@pytest.mark.parametrize("rows", [
    [f"{1.7e308 if i % 2 else -1.7e308},{i},{i % 2}" for i in range(40)],  # sums overflow
    ["3,1,0", "5,2,1"],  # one training row: its std is 0 (or NaN, unbiased)
])
def test_finite_csv_values_stay_finite_once_standardised(tmp_path, rows):
    from leantrain.config import DataConfig
    from leantrain.data.sources import csv_table

    bundle = csv_table(_csv(tmp_path / "t.csv", rows), DataConfig())
    for part in (bundle.train, bundle.val):
        assert torch.isfinite(part.tensors[0]).all()
    if len(rows) > 2:  # the sign still tells the class apart
        x, y = bundle.train.tensors
        assert torch.equal(x[:, 0] > 0, y.bool())


@pytest.mark.parametrize("arrays, fragment", [
    ({"x": np.full((30, 4), np.nan, dtype=np.float32), "y": np.zeros(30, int)},
     "'x' of sample 0 at position (0,) is nan"),
    ({"x": np.zeros((30, 4)), "y": np.array(["cat"] * 30)},
     "labels must be integer class indices, found dtype <U3"),
    ({"x": np.zeros((30, 4)), "y": np.zeros(30, int), "x_val": np.zeros((0, 4)),
      "y_val": np.zeros(0, int)}, "the validation arrays are empty"),
    ({"x": np.array(3.0), "y": np.array(1)}, "'x' is one number"),
    ({"x": np.zeros((0, 4)), "y": np.zeros(0, int)}, "no samples"),
    ({"x": np.zeros((1, 4)), "y": np.zeros(1, int)}, "1 sample; training needs at least 2"),
    ({"x": np.zeros((30, 0)), "y": np.zeros(30, int)}, "the samples hold no values"),
    ({"x": np.zeros((30, 4)), "y": np.full(30, 10**12)}, "sample 0's label is 1000000000000"),
    ({"x": np.zeros((30, 4)), "y": np.full(30, 1e30)}, "sample 0's label is 1e+30"),
    ({"x": np.zeros((30, 4)), "y": np.zeros(30, int), "x_val": np.zeros((5, 3)),
      "y_val": np.zeros(5, int)}, "x_val's samples are (3,) but x's are (4,)"),
])
def test_npz_inputs_are_checked_at_load_time(tmp_path, capsys, arrays, fragment):
    data = tmp_path / "d.npz"
    np.savez(data, **arrays)
    out = tmp_path / "run"
    code = main(["train", "--data", str(data), "--epochs", "1", "--out", str(out), *FAST])
    _one_line_error(capsys, code, fragment)
    assert not out.exists()


def _images(root: Path, n: int = 60, odd: int | None = None, corrupt: int | None = None):
    from PIL import Image
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            size = (12, 12) if i == odd and c == "b" else (8, 8)
            path = root / c / f"{i:03d}.png"
            if i == corrupt and c == "b":
                path.write_bytes(b"not a png at all")
                continue
            Image.fromarray(np.full(size[::-1], 40 * i % 255, dtype=np.uint8)).save(path)


@pytest.mark.parametrize("kind, fragment", [
    ("odd", "b/055.png is 12x12 while the other images are 8x8; set data.image_size"),
    ("corrupt", "b/055.png cannot be read as an image"),
])
def test_a_later_image_of_another_size_or_a_corrupt_one_names_the_file(tmp_path, capsys, kind,
                                                                       fragment):
    root = tmp_path / "images"
    _images(root, **{kind: 55})  # beyond the 50 files the loader samples up front
    out = tmp_path / "run"
    code = main(["train", "--data", str(root), "--epochs", "1", "--set", "data.loader=dataloader",
                 "--set", "data.num_workers=0", "--out", str(out), *FAST])
    _one_line_error(capsys, code, fragment)


def test_non_finite_inputs_in_tensors_are_found_before_training(tmp_path):
    train, val = _data()
    x, y = train.tensors
    x = x.clone()
    x[3, 5] = float("nan")
    with pytest.raises(LeantrainError, match="the training set's sample 3 holds nan"):
        fit(mlp(), TensorDataset(x, y), val, _cfg(), tmp_path / "run", progress_bar=False)
    assert not (tmp_path / "run").exists()


class _Streamed(Dataset):
    """Not tensor-backed: samples made on access; sample 17 holds an inf."""

    def __init__(self):
        self.x, self.y = blobs(200)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i].clone()
        if i == 17:
            x[2] = float("inf")
        return x, int(self.y[i])


def test_non_finite_inputs_in_streamed_data_are_found_at_first_sight(tmp_path):
    with pytest.raises(LeantrainError, match=r"an input value is inf at sample \d+ of a batch "
                                             r"of 20.*\(dataset index 17\)"):
        fit(mlp(), _Streamed(), _data()[1], _cfg("data.loader=dataloader",
                                                 "data.num_workers=0"),
            tmp_path / "run", progress_bar=False)


class _LateBadLabel(Dataset):
    """A dataset that is not tensor-backed (labels checked as they come), one label 7 of 3."""

    def __init__(self):
        self.x, self.y = blobs(200)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], 7 if i == 150 else int(self.y[i])


def test_a_label_out_of_range_in_a_later_batch_names_the_batch(tmp_path):
    with pytest.raises(LeantrainError, match=r"training batch \d+ of epoch 1: a label is out of "
                                             r"range"):
        fit(mlp(), _LateBadLabel(), _data()[1], _cfg("data.loader=dataloader",
                                                     "data.num_workers=0"),
            tmp_path / "run", progress_bar=False)


def test_a_label_out_of_range_in_the_validation_set_fails_before_training(tmp_path):
    train, _ = _data()
    x, y = blobs(40)
    y[-1] = 9
    with pytest.raises(LeantrainError, match=r"labels out of range: found 0\.\.9"):
        fit(mlp(), train, TensorDataset(x, y), _cfg(), tmp_path / "run", progress_bar=False)
    assert not (tmp_path / "run").exists()


def test_a_one_image_folder_is_refused_before_any_work(tmp_path, capsys):
    from PIL import Image
    (tmp_path / "images" / "a").mkdir(parents=True)
    (tmp_path / "images" / "b").mkdir()  # (a second class, with no image)
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a" / "only.png")
    out = tmp_path / "run"
    code = main(["train", "--data", str(tmp_path / "images"), "--out", str(out), *FAST])
    _one_line_error(capsys, code, "1 sample; training needs at least 2")
    assert not out.exists()


def _png_folder(root: Path, layout: dict[str, int], mode: str = "RGB") -> Path:
    from PIL import Image

    for name, count in layout.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            value = (i * 37) % 200 + 20
            array = np.full((8, 8), value * (257 if mode == "I;16" else 1),
                            dtype=np.uint16 if mode == "I;16" else np.uint8)
            image = Image.fromarray(array) if mode == "I;16" else \
                Image.fromarray(array).convert(mode)
            image.save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("layout, fragment", [
    ({"cats": 6}, "one class (cats); a classifier needs at least 2 class subfolders"),
    ({"train/cats": 4, "train/dogs": 4, "val/cats": 2, "val/dogs": 2, "val/eels": 2},
     "class eels has images but no subfolder in"),
])
def test_a_folder_with_one_class_or_val_classes_train_lacks_is_refused(tmp_path, capsys,
                                                                       layout, fragment):
    images = _png_folder(tmp_path / "images", layout)
    out = tmp_path / "run"
    code = main(["train", "--data", str(images), "--out", str(out), *FAST])
    _one_line_error(capsys, code, fragment)
    assert not out.exists()


def test_every_label_one_class_is_refused(tmp_path, capsys):
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    np.savez(tmp_path / "zeros.npz", x=x, y=np.zeros(64, dtype=np.int64))
    out = tmp_path / "run"
    code = main(["train", "--data", str(tmp_path / "zeros.npz"), "--out", str(out), *FAST])
    _one_line_error(capsys, code, "every label is 0", "one class")
    assert not out.exists()


def test_16_bit_pngs_keep_their_range():
    """Converted to 8 bits, every 16-bit pixel above 255 was clipped: blank images."""
    from PIL import Image

    from leantrain.data.sources import pixels

    deep = Image.fromarray((np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8))
    assert deep.mode == "I;16"
    values = pixels(deep, 1, None)
    assert values.min() == 0.0 and 0.95 < values.max() < 0.97
    assert len(np.unique(values)) == 64  # not clipped to one value
    assert pixels(deep, 3, 4).shape == (4, 4, 3)


def test_a_16_bit_png_folder_trains_on_what_the_images_show(tmp_path):
    from leantrain.config import DataConfig
    from leantrain.data import load_data

    images = _png_folder(tmp_path / "images", {"dark": 4, "light": 4}, mode="I;16")
    bundle = load_data(DataConfig(source=str(images)))
    first = bundle.train[0][0]
    assert first.shape[0] == 1 and 0.0 < float(first.max()) < 1.0


class _Named(Dataset):
    """Class names as labels, as a dataset read from a folder of captions might give."""

    def __len__(self):
        return 40

    def __getitem__(self, i):
        return torch.randn(8), ("cat", "dog", "eel")[i % 3]


def test_class_names_as_labels_are_one_line_before_anything_is_written(tmp_path):
    with pytest.raises(LeantrainError, match=r"labels are a tuple of str .*map class names"):
        fit(mlp(), _Named(), _Named(), _cfg("data.loader=dataloader", "data.num_workers=0"),
            tmp_path / "run", progress_bar=False)
    assert not (tmp_path / "run").exists()


def test_validation_samples_of_another_shape_fail_before_training(tmp_path):
    train, _ = _data()
    with pytest.raises(LeantrainError, match=r"the validation set's first batch: the model "
                                             r"cannot run on the data: input batch of shape "
                                             r"\(40, 5\)"):
        fit(mlp(), train, TensorDataset(torch.randn(40, 5), torch.zeros(40, dtype=torch.long)),
            _cfg(), tmp_path / "run", progress_bar=False)
    assert not (tmp_path / "run").exists()


def _batchnorm_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))


def test_a_batchnorm_model_given_one_sample_batches_fails_before_training(tmp_path):
    with pytest.raises(LeantrainError, match=r"cannot run on the data in training mode: input "
                                             r"batch of shape \(1, 8\).*more than 1 value"):
        fit(_batchnorm_mlp(), *_data(), _cfg("data.batch_size=1"), tmp_path / "run",
            progress_bar=False)
    assert not (tmp_path / "run").exists()


def test_a_last_batch_of_one_sample_is_dropped_for_batchnorm_and_the_model_learns(tmp_path):
    x, y = blobs(241)  # 201 training samples in batches of 20: the last one holds 1
    train, val = TensorDataset(x[:201], y[:201]), TensorDataset(x[201:], y[201:])
    summary = fit(_batchnorm_mlp(), train, val, _cfg(), tmp_path / "run", progress_bar=False)
    assert summary["val_accuracy"] > 0.9
    assert summary["steps"] == 6 * 10  # 10 full batches an epoch, the lone sample dropped


class _NoisyInTraining(nn.Module):
    """A training-only branch (noise on the hidden layer) with a shape bug that evaluation
    never meets."""

    def __init__(self):
        super().__init__()
        self.first, self.last = nn.Linear(8, 32), nn.Linear(32, 3)

    def forward(self, x):
        hidden = self.first(x)
        if self.training:
            hidden = hidden + 0.01 * torch.randn(16)  # (16,) cannot add to (batch, 32)
        return self.last(torch.relu(hidden))


def test_a_forward_that_differs_in_training_is_checked_in_training_mode(tmp_path):
    with pytest.raises(LeantrainError, match="cannot run on the data in training mode"):
        fit(_NoisyInTraining(), *_data(), _cfg(), tmp_path / "run", progress_bar=False)
    assert not (tmp_path / "run").exists()


def test_an_empty_validation_set_is_refused(tmp_path):
    train, _ = _data()
    with pytest.raises(LeantrainError, match="the validation set is empty"):
        fit(mlp(), train, TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)),
            _cfg(), tmp_path / "run", progress_bar=False)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ run folders


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p.write_text("a file"), "is a file"),
    (lambda p: None, "cannot create it"),  # --out under a file
])
def test_an_out_that_is_a_file_or_under_one_is_one_line(tmp_path, capsys, make, fragment):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = blocker if fragment == "is a file" else blocker / "run"
    code = main(["train", "--epochs", "1", "--out", str(out), *FAST])
    _one_line_error(capsys, code, fragment)
    assert blocker.read_text() == "x"


def test_an_out_that_cannot_be_written_is_one_line_and_left_as_it_was(tmp_path, capsys,
                                                                       monkeypatch):
    """A read-only folder (root, which runs these tests, may write anywhere: the refusal the
    file system would give is simulated where the run first writes, its lock)."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(run_folder.os, "open", refuse)
    out = tmp_path / "run"
    code = main(["train", "--epochs", "1", "--out", str(out), *FAST])
    _one_line_error(capsys, code, "cannot write there (Permission denied)")
    assert not out.exists()


def test_generate_with_another_architectures_weights_is_one_line(tmp_path, capsys):
    import yaml
    from conftest import tiny_cnn

    from leantrain.config import merge
    from leantrain.recipes import get_recipe
    recipe = get_recipe("text-gpt")
    folder = tmp_path / "run"
    folder.mkdir()
    cfg = load_config(None, [], merge({"recipe": recipe.name}, recipe.config))
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    torch.save(tiny_cnn().state_dict(), folder / "model.pt")
    code = main(["generate", "--checkpoint", str(folder), "--prompt", "def "])
    _one_line_error(capsys, code, "does not match the model")


def test_a_folder_holding_other_files_is_not_trained_into(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    code = main(["train", "--epochs", "1", "--out", str(out), *FAST])
    _one_line_error(capsys, code, "holds files but no checkpoint.pt")
    assert [p.name for p in out.iterdir()] == ["metrics.jsonl"]


MARKS_ITS_LOADING = """
from pathlib import Path

def data():
    Path(__file__).with_name("data_was_loaded").touch()
    raise SystemExit(3)
"""


def test_a_second_run_on_a_folder_in_use_exits_2_at_once(tmp_path):
    out = tmp_path / "run"
    (tmp_path / "marks.py").write_text(MARKS_ITS_LOADING)
    first = subprocess.Popen([sys.executable, "-m", "leantrain", "train", "--epochs", "200",
                              "--out", str(out), *FAST], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (out / ".lock").exists() and time.time() < deadline:
            time.sleep(0.1)
        assert (out / ".lock").exists()
        # its data source writes a marker when loaded: "at once" is "before any data"
        second = subprocess.run([sys.executable, "-m", "leantrain", "train", "--epochs", "1",
                                 "--data", "marks:data", "--out", str(out), *FAST],
                                capture_output=True, text=True, cwd=tmp_path,
                                env={**os.environ, "PYTHONPATH": str(tmp_path)})
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2, second.stderr
    assert f"is in use by process {first.pid}" in second.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "data_was_loaded").exists()  # no data loaded, nothing measured


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                           "started": "earlier"}))
    fit(mlp(), *_data(), _cfg("train.epochs=1"), out, progress_bar=False)
    assert (out / "model.pt").exists() and not (out / ".lock").exists()
    assert any("stale lock" in r.getMessage() for r in caplog.records)


def test_files_follow_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        fit(mlp(), *_data(), _cfg("train.epochs=1"), tmp_path / "run", progress_bar=False)
    finally:
        os.umask(old)
    for name in ("model.pt", "checkpoint.pt", "summary.json", "config.yaml"):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == 0o644, name


def test_a_full_disk_is_one_line_and_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    import errno

    from leantrain import checkpoint
    out = tmp_path / "run"
    fit(mlp(), *_data(), _cfg("train.epochs=1"), out, progress_bar=False)
    before = (out / "checkpoint.pt").read_bytes()

    def full(obj, handle):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(LeantrainError, match="checkpoint.pt: no space left on the device"):
        checkpoint.atomic_save({"w": torch.ones(1)}, out / "checkpoint.pt")
    assert (out / "checkpoint.pt").read_bytes() == before
    assert not list(out.glob(".*.tmp"))


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs, where the machine lets this process mount one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip() or 'not root'}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_real_full_disk_is_one_line_and_the_same_command_runs_once_there_is_room(
        small_disk, capsys, tmp_path, monkeypatch):
    # a 1 MB model (digits are 32x32): config.yaml and the metrics fit in 256 KiB, its
    # first checkpoint does not
    (tmp_path / "wide.py").write_text(
        "from torch import nn\n"
        "def model():\n    return nn.Sequential(nn.Flatten(), nn.Linear(1024, 256), "
        "nn.ReLU(), nn.Linear(256, 10))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = small_disk / "run"
    command = ["train", "--model", "wide:model", "--epochs", "1", "--out", str(out), *FAST]
    code = main(command)
    line = _one_line_error(capsys, code, "no space left on the device")
    assert len(line) < 300
    assert not list(out.glob(".*.tmp"))  # nothing half-written
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    assert main(command) == 0  # the leftovers hold no checkpoint: the same command starts afresh
    assert (out / "model.pt").is_file()


# ------------------------------------------------------------------ resume


def _finished_run(tmp_path: Path, name: str = "run") -> Path:
    out = tmp_path / name
    fit(mlp(), *_data(), _cfg(), out, progress_bar=False)
    return out


def test_a_kill_after_the_final_checkpoint_resume_writes_the_missing_model(tmp_path):
    out = _finished_run(tmp_path)
    reference = _weights(out / "model.pt")
    (out / "model.pt").unlink()
    (out / "summary.json").unlink()
    cfg = load_config(out / "config.yaml")
    summary = fit(mlp(), *_data(), cfg, out, resume=True, progress_bar=False)
    assert _same(_weights(out / "model.pt"), reference)
    assert json.loads((out / "summary.json").read_text())["steps"] == summary["steps"]


def test_a_kill_before_the_final_checkpoint_resumes_to_the_same_model(tmp_path, monkeypatch):
    reference = _weights(_finished_run(tmp_path, "full") / "model.pt")
    out = tmp_path / "killed"
    original = Checkpoints.save

    def killed_at_the_finished_checkpoint(self, state, extra=None, **kwargs):
        if extra is not None:  # the artefacts are written; the finished checkpoint is next
            raise KeyboardInterrupt
        original(self, state, extra, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Checkpoints, "save", killed_at_the_finished_checkpoint)
        with pytest.raises(KeyboardInterrupt):
            fit(mlp(), *_data(), _cfg(), out, progress_bar=False)
    assert not _weights(out / "checkpoint.pt")["progress"]["finished"]
    fit(mlp(), *_data(), load_config(out / "config.yaml"), out, resume=True, progress_bar=False)
    assert _same(_weights(out / "model.pt"), reference)
    assert _weights(out / "checkpoint.pt")["progress"]["finished"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["kind"], r["step"], r.get("epoch")) for r in records]
    assert len(logged) == len(set(logged))  # nothing the killed run logged is logged twice


def test_resuming_a_finished_run_with_everything_there_is_refused(tmp_path):
    out = _finished_run(tmp_path)
    with pytest.raises(LeantrainError, match="already finished"):
        fit(mlp(), *_data(), load_config(out / "config.yaml"), out, resume=True)


def test_resume_with_an_edited_lr_names_the_key(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--out", str(out), *FAST]) == 0
    checkpoint = out / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=True)
    state["progress"]["finished"] = False  # as if killed before the end
    atomic_save(state, checkpoint)  # (with its hash, as leantrain writes it)
    config = out / "config.yaml"
    config.write_text(config.read_text().replace("lr: 0.1", "lr: 0.05"))
    code = main(["train", "--resume", str(out), "--no-progress"])
    _one_line_error(capsys, code, "optim.lr (0.1 -> 0.05)")


@pytest.mark.parametrize("flag", [["--precision", "bf16"], ["--device", "cpu"], ["--compile"],
                                  ["--set", "optim.lr=1"]])
def test_flags_that_cannot_change_on_resume_are_refused(tmp_path, capsys, flag):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"")  # the flags are refused before it is read
    code = main(["train", "--resume", str(out), *flag, "--no-progress"])
    _one_line_error(capsys, code, "--resume continues with the run's own config", flag[0])


def test_more_epochs_on_resume_are_honoured(tmp_path, monkeypatch):
    out = tmp_path / "run"
    original = trainer_module.Trainer._end_epoch

    def stop_after_the_first_epoch(self, epoch):
        stop = original(self, epoch)
        if epoch == 0:
            self.checkpoints.save(self.state)
            raise KeyboardInterrupt
        return stop

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module.Trainer, "_end_epoch", stop_after_the_first_epoch)
        assert main(["train", "--epochs", "2", "--out", str(out), *FAST]) == 130
    assert main(["train", "--resume", str(out), "--epochs", "3", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 3
    assert "epochs: 3" in (out / "config.yaml").read_text()


def test_resume_with_another_architecture_names_the_parameter(tmp_path):
    out = tmp_path / "run"
    snapshot_cfg = _cfg("train.epochs=2")
    with pytest.raises(KeyboardInterrupt):
        _interrupt_after_first_checkpoint(lambda: fit(mlp(), *_data(), snapshot_cfg, out,
                                                      progress_bar=False))
    wider = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3))
    with pytest.raises(LeantrainError, match=r"differs from the checkpoint's at 0\.weight "
                                             r"\(checkpoint \[32, 8\], model \[64, 8\]\)"):
        fit(wider, *_data(), snapshot_cfg, out, resume=True, progress_bar=False)


def _interrupt_after_first_checkpoint(train):
    original = Checkpoints.save

    def save_then_stop(self, state, *args, **kwargs):
        original(self, state, *args, **kwargs)
        raise KeyboardInterrupt

    Checkpoints.save = save_then_stop
    try:
        train()
    finally:
        Checkpoints.save = original


@pytest.mark.parametrize("saved, fragment", [
    ([1, 2, 3], "not a leantrain training checkpoint (it holds a list"),
    (torch.ones(3), "not a leantrain training checkpoint (it holds a Tensor"),
    ({"model": {}, "optimizer": {}}, "its 'scheduler' entry is missing"),
])
def test_a_checkpoint_of_the_wrong_structure_is_one_line(tmp_path, saved, fragment):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _interrupt_after_first_checkpoint(lambda: fit(mlp(), *_data(), _cfg(), out,
                                                      progress_bar=False))
    atomic_save(saved, out / "checkpoint.pt")  # a hash of its own: the structure is refused
    with pytest.raises(LeantrainError) as caught:
        fit(mlp(), *_data(), _cfg(), out, resume=True, progress_bar=False)
    assert fragment in str(caught.value)


def test_a_bit_flipped_checkpoint_is_refused(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _interrupt_after_first_checkpoint(lambda: fit(mlp(), *_data(), _cfg(), out,
                                                      progress_bar=False))
    data = bytearray((out / "checkpoint.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (out / "checkpoint.pt").write_bytes(bytes(data))
    with pytest.raises(LeantrainError, match="is corrupt: its SHA-256 differs"):
        fit(mlp(), *_data(), _cfg(), out, resume=True, progress_bar=False)
    # its hash gone (copied without it, or deleted): refused too, unless the user says so
    (out / "checkpoint.pt.sha256").write_text("")
    with pytest.raises(LeantrainError, match=r"no SHA-256 recorded beside it .* --no-verify"):
        fit(mlp(), *_data(), _cfg(), out, resume=True, progress_bar=False)
    (out / "checkpoint.pt.sha256").unlink()
    with pytest.raises(LeantrainError, match="no SHA-256 recorded beside it"):
        fit(mlp(), *_data(), _cfg(), out, resume=True, progress_bar=False)


def test_train_resume_without_a_recorded_hash_needs_no_verify(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--epochs", "2", "--set", "train.monitor_interval_s=0", "--no-progress"]
    try:  # the CLI may turn the interrupt into its exit code 130
        _interrupt_after_first_checkpoint(lambda: main([*args, "--out", str(out)]))
    except KeyboardInterrupt:
        pass
    (out / "checkpoint.pt.sha256").unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--no-verify" in err[0]
    assert main(["train", "--resume", str(out), "--no-verify", "--no-progress"]) == 0
    assert (out / "model.pt").is_file()


# ------------------------------------------------------------------ signals


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_run_checkpoints_that_step_and_the_resume_is_bit_identical(
        tmp_path, monkeypatch, sig, code):
    reference = _weights(_finished_run(tmp_path, "full") / "model.pt")
    out = tmp_path / "stopped"
    original = trainer_module.Trainer._after_step

    def signal_at_step_23(self, bar, tick):
        if self.state.progress.step == 22:  # this call books step 23
            os.kill(os.getpid(), sig)
        return original(self, bar, tick)

    # as in a terminal (a background job, CI's included, starts with SIGINT ignored, which
    # leantrain leaves ignored)
    outside = signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT
                            else signal.SIG_DFL)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(trainer_module.Trainer, "_after_step", signal_at_step_23)
            with pytest.raises(Stopped) as caught:
                fit(mlp(), *_data(), _cfg(), out, progress_bar=False)
        restored = signal.getsignal(sig)
    finally:
        signal.signal(sig, outside)
    assert caught.value.exit_code == code
    assert f"at step 23; checkpoint written; continue with: leantrain train --resume {out}" \
        in str(caught.value)
    assert _weights(out / "checkpoint.pt")["progress"]["step"] == 23
    assert restored in (signal.default_int_handler, signal.SIG_DFL)  # handlers restored
    fit(mlp(), *_data(), load_config(out / "config.yaml"), out, resume=True, progress_bar=False)
    assert _same(_weights(out / "model.pt"), reference)


def test_an_ignored_sigint_stays_ignored_during_training():
    from leantrain.run.signals import StopRequest
    outside = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopRequest():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # ours
    finally:
        signal.signal(signal.SIGINT, outside)


def test_sigterm_to_a_real_train_process_exits_143_naming_the_resume_command(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "leantrain", "train", "--epochs", "12",
                             "--out", str(out), *FAST], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("leantrain: error: stopped by SIGTERM at step") and \
        f"leantrain train --resume {out}" in last
    step = _weights(out / "checkpoint.pt")["progress"]["step"]
    assert f"at step {step};" in last
    assert not (out / run_folder.LOCK_NAME).exists()


# ------------------------------------------------------------------ no code from a run folder


HELPERS = """
from pathlib import Path

Path(__file__).with_name("code_ran").touch()  # importing it runs code

def build():
    import torch
    return torch.nn.Sequential(torch.nn.Linear(8, 3))
"""


def _handed_folder(tmp_path: Path, **config) -> Path:
    """A run folder someone handed over: its config names `helpers:build`, and helpers.py
    sits beside it, in the folder the command runs from."""
    folder = tmp_path / "handed"
    folder.mkdir()
    (folder / "helpers.py").write_text(HELPERS)
    cfg = load_config(None, [f"{k}={v}" for k, v in config.items()])
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    (folder / "checkpoint.pt").write_bytes(b"")
    (folder / "model.pt").write_bytes(b"")
    return folder


@pytest.mark.parametrize("command", [["train", "--resume", "."],
                                     ["generate", "--checkpoint", ".", "--prompt", "x"]])
def test_a_folder_whose_config_names_code_is_refused_without_importing_it(
        tmp_path, monkeypatch, capsys, command):
    folder = _handed_folder(tmp_path, model="helpers:build", **{"data.context": 16})
    monkeypatch.chdir(folder)
    code = main([*command, "--no-progress"] if command[0] == "train" else command)
    _one_line_error(capsys, code, "names code to import (--model helpers:build)",
                    "--trust-run-code")
    assert not (folder / "code_ran").exists()
    assert "helpers" not in sys.modules


def test_a_data_function_named_by_a_folder_is_refused_too(tmp_path, monkeypatch, capsys):
    folder = _handed_folder(tmp_path, **{"data.source": "helpers:build"})
    monkeypatch.chdir(folder)
    code = main(["train", "--resume", ".", "--no-progress"])
    _one_line_error(capsys, code, "(--data helpers:build)")
    assert not (folder / "code_ran").exists()


HOSTILE_NAMES = [  # each reaches code through a leantrain module's namespace, or is not a builder
    "leantrain.checkpoint:os.abort", "leantrain.checkpoint:tempfile.mkdtemp",
    "leantrain.cli:main", "leantrain.recipes.models:torch.manual_seed",
    "leantrain.recipes.models:nn.Module", "leantrain.recipes:get_recipe.__globals__",
    "leantrain.recipes.models:__import__", "leantrain.recipes.models:os",
    "leantrain.recipes.models.torch:load", "leantrain.recipes.models:default_model.__call__",
    "leantrain:__builtins__", "leantrain.:x", "leantrain.recipes..models:digits_cnn",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
@pytest.mark.parametrize("key", ["model", "data.source"])
def test_a_folder_naming_code_through_leantrain_is_refused_without_running_it(
        tmp_path, monkeypatch, capsys, name, key):
    folder = _handed_folder(tmp_path, **{"data.context": 16})
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    section, _, field = key.rpartition(".")
    (cfg[section] if section else cfg)[field] = name
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(folder)
    before = set(os.listdir(tempfile.gettempdir()))
    code = main(["train", "--resume", ".", "--no-progress"])
    flag = "--model" if key == "model" else "--data"
    _one_line_error(capsys, code, f"names code to import ({flag} ", "--trust-run-code")
    assert set(os.listdir(tempfile.gettempdir())) <= before  # (mkdtemp did not run)


def test_leantrains_own_model_builders_are_trusted_by_their_module():
    from leantrain.data.sources import code_named_by

    assert code_named_by("leantrain.recipes.models:digits_student", "digits") == {}
    assert code_named_by("leantrain.checkpoint:os.abort", "digits") == {
        "--model": "leantrain.checkpoint:os.abort"}


def test_a_config_file_that_names_code_says_which_module_and_file_it_imports(tmp_path, caplog,
                                                                             monkeypatch):
    import logging

    from leantrain.cli import build_parser
    from leantrain.commands import common

    (tmp_path / "helpers.py").write_text(HELPERS)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"model": "helpers:build"}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = build_parser().parse_args(["doctor", "--config", "run.yaml"])
    with caplog.at_level(logging.INFO, logger="leantrain"):
        assert common.config_from_args(args).model == "helpers:build"
    lines = [r.getMessage() for r in caplog.records if "names code to import" in r.getMessage()]
    assert len(lines) == 1, lines
    assert f"module helpers, file {tmp_path / 'helpers.py'}" in lines[0]
    assert not (tmp_path / "code_ran").exists()  # said before anything imports it


@pytest.mark.parametrize("vouch", [["--model", "helpers:build"], ["--trust-run-code"]])
def test_naming_the_model_again_or_trusting_the_folder_lets_it_run(tmp_path, monkeypatch,
                                                                   capsys, vouch):
    folder = _handed_folder(tmp_path, model="helpers:build", **{"data.context": 16})
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "helpers", raising=False)
    main(["generate", "--checkpoint", ".", "--prompt", "x", *vouch])
    assert (folder / "code_ran").exists()  # imported: the user vouched for it
    assert "names code to import" not in capsys.readouterr().err


# ------------------------------------------------------------------ killed before a checkpoint


SLOW_UNTIL_TOLD = """
import time
from pathlib import Path

import torch

SLOW = Path(__file__).with_name("slow")

def model():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                           torch.nn.Linear(16, 3))

        def forward(self, x):
            if self.training and SLOW.exists():
                time.sleep(0.2)  # an epoch far longer than the test waits
            return self.net(x)
    return Net()
"""


def test_a_run_killed_before_its_first_checkpoint_starts_afresh_with_the_same_command(
        tmp_path, capsys):
    (tmp_path / "slow_net.py").write_text(SLOW_UNTIL_TOLD)
    (tmp_path / "slow").touch()
    np.savez(tmp_path / "blobs.npz", x=blobs(256)[0].numpy(), y=blobs(256)[1].numpy())
    out = tmp_path / "run"
    command = ["train", "--model", "slow_net:model", "--data", str(tmp_path / "blobs.npz"),
               "--epochs", "2", "--out", str(out), "--set", "train.log_every=1", *FAST]
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    first = subprocess.Popen([sys.executable, "-m", "leantrain", *command], cwd=tmp_path,
                             env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()):
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.05)
    finally:
        first.kill()  # SIGKILL mid-epoch: config.yaml, metrics, a lock, no checkpoint
        first.wait()
    assert not (out / "checkpoint.pt").exists() and (out / "config.yaml").exists()
    (tmp_path / "slow").unlink()
    done = subprocess.run([sys.executable, "-m", "leantrain", *command], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "starting afresh" in done.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == sorted(steps) and steps[0] == 1  # the killed run's records are gone
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2


# ------------------------------------------------------------------ config files, hostile


@pytest.mark.parametrize("content, fragment", [
    (b"optim:\n  lr: 0.1\n  lr: 3e-4\n", "key 'lr' appears twice in one mapping"),
    (b"optim: {lr: 0.1}\noptim: {name: sgd}\n", "key 'optim' appears twice"),
    (b"optim:\n  name: \xff\xfeadamw\n", "is not UTF-8 text (byte"),
    (b"optim: [1, 2\n", "is not valid YAML"),
    # aliases nested nine deep: 9**9 elements to expand, a few shared objects in memory; the
    # echo is bounded before it is built, the run never starts
    (b"a: &a [x, x, x, x, x, x, x, x, x]\n" + b"".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n".encode()
        for p, n in zip("abcdefgh", "bcdefghi", strict=True)) + b"optim: {lr: *i}\n",
     "config key 'optim.lr' has value [[[[...], [...],"),
    (b"optim:\n  lr: [" + b"1, " * 5000 + b"1]\n", "config key 'optim.lr' has value [1, 1,"),
])
def test_a_hostile_config_file_is_one_bounded_line_and_exit_2(tmp_path, capsys, content,
                                                              fragment):
    path = tmp_path / "run.yaml"
    path.write_bytes(content)
    out = tmp_path / "run"
    assert main(["train", "--config", str(path), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1 and len(err) < 500, err[:300]
    assert not out.exists()


@pytest.mark.parametrize("content, fragment", [
    (b"?\n", "unknown config key 'None'"),  # {None: None}: found by the random-bytes property
    (b"a:\n", "unknown config key 'a'"),
    (b"optim: {lr: fast}\n", "config key 'optim.lr' has value 'fast'"),
    (b"optim: 3\n", "config section 'optim' must be a mapping"),
])
def test_a_config_files_wrong_key_or_value_names_the_file(tmp_path, capsys, content, fragment):
    path = tmp_path / "mine.yaml"
    path.write_bytes(content)
    assert main(["train", "--config", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and err.endswith("(in mine.yaml)") and len(err) < 300, err


def test_a_wrong_set_beside_a_config_file_is_not_blamed_on_the_file(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text("optim: {lr: 0.1}\n")
    assert main(["train", "--config", str(path), "--set", "optim.lr=fast",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "config key 'optim.lr' has value 'fast'" in err and "mine.yaml" not in err, err


def test_an_unreadable_config_file_is_named(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = tmp_path / "run.yaml"
    path.write_text("optim: {lr: 0.1}\n")
    path.chmod(0)
    assert main(["train", "--config", str(path), "--no-progress"]) == 2
    assert "cannot be read" in capsys.readouterr().err


def _damaged_npz(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.npz"
    x, y = blobs(40)
    np.savez(tmp_path / "good.npz", x=x.numpy(), y=y.numpy())
    good = (tmp_path / "good.npz").read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "cut":
        path.write_bytes(good[:len(good) // 2])
    elif kind == "crc":
        flipped = bytearray(good)
        flipped[len(flipped) // 2] ^= 0xFF
        path.write_bytes(bytes(flipped))
    else:  # pickled objects, which a data file may never run
        np.savez(path, x=np.array([{"a": 1}] * 40, dtype=object), y=y.numpy())
    return path


@pytest.mark.parametrize("kind, fragment", [("empty", "No data left"),
                                            ("cut", "not a zip file"), ("crc", "CRC-32"),
                                            ("objects", "Object arrays cannot be loaded")])
def test_a_damaged_npz_is_one_line(kind, fragment, tmp_path, capsys):
    path = _damaged_npz(tmp_path, kind)
    code = main(["train", "--data", str(path), "--epochs", "1", "--out", str(tmp_path / "run"),
                 *FAST])
    _one_line_error(capsys, code, "not a readable .npz of numeric arrays", fragment)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [["train"], ["bench"], ["doctor"], ["find-lr"],
                                     ["find-batch-size"]])
def test_an_out_that_is_a_file_or_too_long_a_name_is_refused_before_any_work(command, tmp_path,
                                                                            capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    code = main([*command, "--out", str(afile), *FAST])
    _one_line_error(capsys, code, "is a file; give a folder")
    assert afile.read_text() == "mine"
    code = main([*command, "--out", str(tmp_path / ("x" * 300)), *FAST])
    _one_line_error(capsys, code, "a name of 300 bytes; the file system allows 255")


# ------------------------------------------------------------------ nothing overwritten


@pytest.mark.parametrize("command", [["bench"], ["find-lr"], ["find-batch-size"], ["doctor"]])
def test_a_folder_the_command_did_not_write_is_refused_and_left_as_it_was(tmp_path, capsys,
                                                                          command):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "plan.yaml").write_text("# my own plan\nplan:\n  precision: bf16\n")
    code = main([*command, "--out", str(out), "--no-progress"])
    _one_line_error(capsys, code, "files leantrain", "give a new or empty folder")
    assert (out / "plan.yaml").read_text() == "# my own plan\nplan:\n  precision: bf16\n"
    assert sorted(p.name for p in out.iterdir()) == ["plan.yaml"]


def test_find_lr_and_doctor_do_not_write_into_a_training_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--no-progress", "--set",
                 "train.max_steps=2"]) == 0
    before = sorted(p.name for p in run.iterdir())
    capsys.readouterr()
    for command in (["find-lr", "--steps", "5"], ["doctor", "--steps", "1", "--no-profile"]):
        code = main([*command, "--out", str(run), "--no-progress"])
        _one_line_error(capsys, code, "give a new or empty folder")
    assert sorted(p.name for p in run.iterdir()) == before


def test_the_same_command_writes_into_its_own_folder_again_and_another_does_not(tmp_path,
                                                                                capsys):
    out = tmp_path / "lr"
    for _ in range(2):
        assert main(["find-lr", "--steps", "5", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    code = main(["doctor", "--out", str(out), "--no-progress"])
    _one_line_error(capsys, code, "holds `leantrain find-lr`'s results")


@pytest.mark.parametrize("target, fragment", [
    ("folder", "is a folder; give a plan file"),
    ("notes.txt/plan.yaml", "notes.txt is a file, not a folder"),
    ("notes.txt", "notes.txt"),
])
@pytest.mark.parametrize("command", [["bench"], ["find-lr"], ["find-batch-size"]])
def test_a_bad_apply_target_is_refused_before_any_work(tmp_path, capsys, command, target,
                                                       fragment):
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("my notes, not a plan: [\n")
    out = tmp_path / "out"
    code = main([*command, "--apply", str(tmp_path / target), "--out", str(out),
                 "--no-progress"])
    _one_line_error(capsys, code, fragment)
    assert not out.exists()
    assert (tmp_path / "notes.txt").read_text() == "my notes, not a plan: [\n"


@pytest.mark.parametrize("argv", [["--set", "optim.lr=[1"], ["--set", "optim.lr={a: [1"],
                                  ["--config", "bad.yaml"]])
def test_yaml_that_does_not_parse_is_one_line_saying_where(tmp_path, monkeypatch, capsys, argv):
    """PyYAML's message spans lines, with a caret drawing: the whole stderr was 8 lines."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("train:\n  epochs: [1\n")
    code = main(["train", *argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "is not valid YAML" in err[0] and re.search(r"at line \d+, column \d+", err[0])


# ------------------------------------------------------------------ the user's code fails later

USER_CODE = """
import sys
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset


class Breaks(Dataset):
    def __len__(self):
        return 256

    def __getitem__(self, i):
        if i == 200:
            raise ValueError("corrupt record 200")
        return torch.randn(8), i % 3


class Lies(Dataset):
    def __len__(self):
        return 10**12

    def __getitem__(self, i):
        return torch.randn(8), i % 3


def _val():
    return TensorDataset(torch.randn(32, 8), torch.arange(32) % 3)


def breaks():
    return Breaks(), _val()


def lies():
    return Lies(), _val()


def good():
    return TensorDataset(torch.randn(256, 8), torch.arange(256) % 3), _val()


def raises():
    raise RuntimeError("cannot reach the bucket")


def exits():
    sys.exit(0)


def mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


class Doubles(nn.Module):
    def forward(self, x):
        return x[:, :3] * 2


def no_parameters():
    return Doubles()


def frozen():
    return mlp().requires_grad_(False)
"""


@pytest.mark.parametrize("data, model, fragment", [
    ("breaks", "mlp", "Breaks[200] raised ValueError: corrupt record 200"),
    ("lies", "mlp", "Lies says it holds 1,000,000,000,000 samples (its __len__)"),
    ("raises", "mlp", "--data usercode:raises raised RuntimeError: cannot reach the bucket"),
    ("exits", "mlp", "--data usercode:exits called sys.exit(0) instead of returning"),
    ("good", "raises", "--model usercode:raises raised RuntimeError"),
    ("good", "exits", "--model usercode:exits called sys.exit(0)"),
    ("good", "no_parameters", "has no parameters: nothing to train"),
    ("good", "frozen", "is frozen (requires_grad=False): nothing to train"),
])
def test_user_code_that_fails_later_is_one_line_naming_it(tmp_path, monkeypatch, capsys, data,
                                                         model, fragment):
    (tmp_path / "usercode.py").write_text(USER_CODE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "usercode", raising=False)
    code = main(["train", "--data", f"usercode:{data}", "--model", f"usercode:{model}",
                 "--out", str(tmp_path / "run"), "--set", "data.loader=dataloader",
                 "--set", "train.epochs=1", "--no-progress"])
    _one_line_error(capsys, code, fragment)


# ------------------------------------------------------------------ crafted checkpoints


@pytest.fixture(scope="module")
def mid_run(tmp_path_factory) -> Path:
    """A digits run stopped after 8 steps (its checkpoint is then re-marked unfinished)."""
    out = tmp_path_factory.mktemp("crafted") / "base"
    assert main(["train", "--out", str(out), "--no-progress", "--set", "train.max_steps=8",
                 "--set", "train.epochs=2"]) == 0
    return out


def _rng(saved):
    return saved["rng"][0] if isinstance(saved["rng"], list) else saved["rng"]


CRAFTED = {  # each keeps a valid .sha256: the hash proves the file, not its author
    "rng.torch is not a generator state": lambda s: _rng(s).__setitem__("torch", "x"),
    "rng.torch is not a generator state of": lambda s: _rng(s).__setitem__(
        "torch", torch.zeros(3, dtype=torch.uint8)),
    "optimizer has 0 parameter groups": lambda s: s.__setitem__(
        "optimizer", {"state": {}, "param_groups": []}),
    "optimizer state 'momentum_buffer' has another shape": lambda s: s["optimizer"][
        "state"].__setitem__(0, {"momentum_buffer": torch.zeros(1)}),  # (aborted the process)
    "scheduler.last_epoch is 'x'": lambda s: s["scheduler"].__setitem__("last_epoch", "x"),
    "epoch_sums are not three finite numbers": lambda s: s.__setitem__(
        "epoch_sums", [[torch.zeros(())]]),
    "progress.step is 'x'": lambda s: s["progress"].__setitem__("step", "x"),
    "progress.epoch is -3": lambda s: s["progress"].__setitem__("epoch", -3),
    "progress.batch is 1,000,000,000, past the epoch's": lambda s: s["progress"].__setitem__(
        "batch", 10**9),
    "model lacks entry": lambda s: s["model"].pop(next(iter(s["model"]))),
    "holds NaN or inf; leantrain writes finite checkpoints only": lambda s: next(
        iter(s["model"].values())).fill_(float("nan")),
    "is not a tensor of shape": lambda s: s["model"].__setitem__(
        next(iter(s["model"])), torch.zeros(2, dtype=torch.int64)),
    "marked finished but holds no summary": lambda s: (
        s["progress"].__setitem__("finished", True), s.pop("summary", None)),
}


@pytest.mark.parametrize("fragment", list(CRAFTED))
def test_a_crafted_checkpoint_with_a_valid_hash_is_one_line_and_nothing_is_applied(
        tmp_path, capsys, mid_run, fragment):
    import shutil

    from leantrain.checkpoint import load_checkpoint

    out = tmp_path / "run"
    shutil.copytree(mid_run, out)
    saved = load_checkpoint(out / "checkpoint.pt")
    saved["progress"]["finished"] = False
    CRAFTED[fragment](saved)
    (out / "checkpoint.pt.sha256").unlink()
    atomic_save(saved, out / "checkpoint.pt")
    if "finished" in fragment:
        (out / "summary.json").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code = main(["train", "--resume", str(out), "--no-progress"])
    line = _one_line_error(capsys, code, fragment)
    assert len(line) < 300 + len(str(out))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing written


def _unfinish(out: Path) -> None:
    """The run as a kill before its end leaves it: the checkpoint not marked finished."""
    from leantrain.checkpoint import load_checkpoint

    saved = load_checkpoint(out / "checkpoint.pt")
    saved["progress"]["finished"] = False
    saved.pop("summary", None)
    atomic_save(saved, out / "checkpoint.pt")
    for name in ("summary.json", "model.pt", "model.pt.sha256"):
        (out / name).unlink(missing_ok=True)


@pytest.mark.parametrize("change", ["shrunk", "extended", "edited"])
def test_a_resume_on_changed_data_is_refused_unless_asked(tmp_path, capsys, change):
    rng = np.random.default_rng(0)
    rows = [[*rng.normal(size=4).round(4), i % 3] for i in range(120)]
    table = tmp_path / "table.csv"

    def write(rows):
        table.write_text("a,b,c,d,label\n" + "".join(",".join(map(str, r)) + "\n"
                                                      for r in rows))

    write(rows)
    out = tmp_path / "run"
    args = ["--data", str(table), "--set", "data.label_column=label", "--no-progress"]
    assert main(["train", *args, "--out", str(out), "--set", "train.max_steps=3"]) == 0
    _unfinish(out)
    changed = {"shrunk": rows[:100], "extended": rows + rows[:20],
               "edited": [[99.0, *rows[0][1:]], *rows[1:]]}[change]
    write(changed)
    capsys.readouterr()
    code = main(["train", "--resume", str(out), *args[:2], "--no-progress"])
    _one_line_error(capsys, code, "data changed since the checkpoint", "--data-changed")
    assert main(["train", "--resume", str(out), *args[:2], "--no-progress",
                 "--data-changed"]) == 0


@pytest.mark.parametrize("argv, fragment", [
    (["launch", "--nproc", "100000", "--", "train"], "--nproc must be in 1.."),
    (["tune", "--objective", "metric", "--workers", "100000"], "--workers must be in 1.."),
    (["train", "--set", "data.num_workers=100000"], "'data.num_workers' must be in 0.."),
    (["train", "--set", "data.image_size=-5"], "'data.image_size' must be in 1..8192"),
    (["train", "--set", "data.image_size=100000"], "'data.image_size' must be in 1..8192"),
    (["train", "--set", "a.b=" + "[" * 5000], "nests too deep to read"),
    (["train", "--config", "deep.yaml"], "nests collections too deep to read"),
    (["train", "--out", "/tmp/" + "/".join(["d" * 200] * 25)], "a path of 5,029 bytes"),
])
def test_absurd_sizes_and_depths_are_one_line_before_any_work(tmp_path, monkeypatch, capsys,
                                                               argv, fragment):
    """100000 launch ranks forked until the machine stopped answering; YAML nested 10,000 deep
    was a RecursionError; an --out over 4,096 bytes an OSError."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "deep.yaml").write_text("a: " + "{b: " * 10000 + "1" + "}" * 10000)
    if "--out" not in argv and argv[0] != "launch":
        argv = [*argv, "--out", str(tmp_path / "out")]
    code = main([*argv, "--no-progress"] if argv[0] != "launch" else argv)
    _one_line_error(capsys, code, fragment)
    assert not (tmp_path / "out").exists()


def test_an_npz_header_asking_for_more_than_the_file_holds_is_refused_before_allocating(
        tmp_path, capsys):
    """A crafted header asked numpy for 1.82 TiB (a MemoryError traceback)."""
    import io
    import zipfile

    np.savez(tmp_path / "ok.npz", x=np.zeros((10, 4), np.float32), y=np.arange(10) % 2)
    with zipfile.ZipFile(tmp_path / "ok.npz") as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (500000, 1000000)})
    body = members["x.npy"]
    members["x.npy"] = header.getvalue() + body[10 + int.from_bytes(body[8:10], "little"):]
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    code = main(["train", "--data", str(tmp_path / "bomb.npz"), "--out", str(tmp_path / "o"),
                 *FAST])
    _one_line_error(capsys, code, "array 'x' says it is (500000, 1000000) of float32",
                    "a damaged or crafted file")


def test_a_decompression_bomb_image_is_one_line(tmp_path, capsys):
    from PIL import Image

    images = _png_folder(tmp_path / "images", {"small": 2, "other": 2}, mode="L")
    Image.new("L", (12000, 12000)).save(images / "small" / "big.png")  # 144 M pixels
    code = main(["train", "--data", str(images), "--set", "data.image_size=8",
                 "--out", str(tmp_path / "o"), *FAST])
    _one_line_error(capsys, code, "big.png cannot be read as an image", "decompression bomb")


# ------------------------------------------------------------------ file-system faults


def test_a_plan_cache_that_cannot_be_written_costs_a_warning_not_the_run(tmp_path, monkeypatch,
                                                                        caplog):
    """A read-only $HOME (clusters) failed the run after its measuring."""
    import logging

    from leantrain.run import plan_cache

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LEANTRAIN_CACHE", str(tmp_path / "file" / "cache"))  # (not a folder)
    with caplog.at_level(logging.WARNING, logger="leantrain"):
        plan_cache.write("k", {"values": {}})
    assert "plan cache" in caplog.text and "measures again" in caplog.text


def test_a_sha256_file_that_is_not_text_is_a_corrupt_checkpoint_not_a_traceback(tmp_path):
    from leantrain.checkpoint import load_checkpoint

    atomic_save({"w": torch.ones(2)}, tmp_path / "checkpoint.pt")
    (tmp_path / "checkpoint.pt.sha256").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(LeantrainError, match="is corrupt"):
        load_checkpoint(tmp_path / "checkpoint.pt")


def test_a_metrics_log_that_is_not_utf8_is_truncated_like_any_other(tmp_path):
    from leantrain.run.logs import truncate_after

    (tmp_path / "metrics.jsonl").write_bytes(b'{"step": 1}\n\xff\xfe broken\n{"step": 3}\n')
    truncate_after(tmp_path, step=2)
    assert (tmp_path / "metrics.jsonl").read_bytes() == b'{"step": 1}\n'
    (tmp_path / "metrics.jsonl").write_bytes(b'{"step": 1}\n\xff\xfe broken\n{"step": 3}\n')
    truncate_after(tmp_path, step=9, lines=2)
    assert (tmp_path / "metrics.jsonl").read_bytes() == b'{"step": 1}\n\xff\xfe broken\n'


def test_a_leftover_tensorboard_link_is_removed_and_what_it_points_to_is_kept(tmp_path):
    """rmtree on a link raised; following it would have emptied the user's folder."""
    run, shared = tmp_path / "run", tmp_path / "shared"
    run.mkdir()
    shared.mkdir()
    (shared / "keep.txt").write_text("mine")
    (run / "config.yaml").write_text("{}")
    (run / "tensorboard").symlink_to(shared, target_is_directory=True)
    run_folder.clear_leftovers(run)
    assert not (run / "tensorboard").exists() and (shared / "keep.txt").read_text() == "mine"


def test_a_full_disk_while_logging_stops_the_run_in_one_line(tmp_path):
    import errno
    import threading

    from leantrain.run.logs import RunLog

    log = RunLog(tmp_path)

    class Full:
        closed = False

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

        def close(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    log.handle = Full()
    monitor = threading.Thread(target=lambda: log.log("monitor", 1, cpu=50.0))
    monitor.start()
    monitor.join()  # the monitor's thread only notes it
    assert log.failed and "no space left on the device" in log.failed
    with pytest.raises(LeantrainError, match="no space left on the device; the last checkpoint"):
        log.log("train", 2, loss=1.0)
    log.close()  # (a close that fails too is quiet)


def test_stdout_on_a_full_device_is_one_line(tmp_path, monkeypatch, capsys):
    import errno

    from leantrain import cli

    def full(args, dist):
        raise OSError(errno.ENOSPC, "No space left on device")

    from leantrain.commands import doctor

    monkeypatch.setattr(doctor, "run", full)
    assert cli.main(["doctor", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["leantrain: error: cannot write the output: no space left on the device"]


@pytest.mark.parametrize("extra, fragment", [
    (["--ranks", "1"], "--ranks prices a launch of several processes: 2.."),
    (["--ranks", "6", "--set", "plan.distributed=fsdp", "--set",
      "plan.parallel.dp_replicate=4"], "dp_replicate (4) x dp_shard (auto) must equal the 6"),
    (["--ranks", "4", "--set", "plan.parallel.dp_replicate=2"], "plan.distributed=fsdp"),
    (["--ranks", "4", "--set", "plan.distributed=ddp", "--set", "plan.parallel.tp=2"],
     "this run is ddp"),  # what a launch would refuse: priced as FSDP2 once
])
def test_doctor_per_rank_layouts_that_cannot_launch_are_one_line(tmp_path, capsys, extra,
                                                                 fragment):
    out = tmp_path / "doctor"
    code = main(["doctor", "--steps", "1", "--no-profile", "--out", str(out), *extra])
    _one_line_error(capsys, code, fragment)
    assert not out.exists()  # before any work


STREAM_MODULE = '''
import torch
from torch.utils.data import IterableDataset, TensorDataset

class Stream(IterableDataset):
    def __iter__(self):
        for i in range(64):
            yield torch.randn(8), i % 2

def data():
    return Stream(), TensorDataset(torch.randn(16, 8), torch.randint(0, 2, (16,)))

def model():
    return torch.nn.Linear(8, 2)
'''


def test_a_stream_without_max_steps_is_one_line_not_a_traceback(tmp_path, capsys,
                                                                 monkeypatch):
    """An IterableDataset from a data function or through fit() (issue 41's first finding:
    "TypeError: object of type 'Stream' has no len()"): it trains, for train.max_steps, and
    without it the run cannot know its length."""
    from leantrain import fit

    (tmp_path / "user_streams.py").write_text(STREAM_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    code = main(["train", "--data", "user_streams:data", "--model", "user_streams:model",
                 "--no-progress", "--out", str(out)])
    _one_line_error(capsys, code, "the training set is a stream (Stream, no length): set how "
                                  "long to train with train.max_steps")
    assert not out.exists()
    import user_streams

    train, val = user_streams.data()
    with pytest.raises(LeantrainError, match="the training set is a stream"):
        fit(torch.nn.Linear(8, 2), train, val)


@pytest.mark.parametrize("content", [">", "''", "0", "false", "[]"])
def test_a_config_file_of_a_falsy_scalar_is_not_an_empty_config(tmp_path, capsys, content):
    """A lone ">" parses to '' (found by the random-bytes property): not a mapping, so not a
    config; only an empty file (or comments) is an empty one."""
    path, out = tmp_path / "given.yaml", tmp_path / "run"
    path.write_text(content)
    code = main(["train", "--config", str(path), "--out", str(out), "--no-progress"])
    _one_line_error(capsys, code, "given.yaml must hold a mapping at the top level")
    assert not out.exists()
    path.write_text("# nothing here\n")  # comments only: an empty config, the defaults
    from leantrain.config import read_yaml

    assert read_yaml(path) == {}


def test_a_long_wrong_value_named_with_its_file_stays_one_bounded_line(tmp_path, capsys):
    """Found by the YAML-structures property: a section given a long list, echoed (bounded)
    and then named with its file, came to 301 characters."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"optim": [-10**16, "0" * 12 + "\x1f" * 4 + "x" * 40,
                                              {"k" * 30: None, "j" * 30: None}]}))
    assert main(["train", "--config", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and len(err) < 300 and err.endswith("(in config.yaml)")
