"""Stock Hugging Face models (tiny configs, random weights, returned as is) and other model
types through every command: dict batches, the model's own loss, inferred task losses."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import snapshot_first_checkpoint
from torch import nn

pytest.importorskip("transformers")
import model_types  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from leantrain import fit, load_config  # noqa: E402
from leantrain.cli import main  # noqa: E402
from leantrain.data.loaders import TensorDictDataset  # noqa: E402
from leantrain.measure.report import format_summary  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
hf_logging.set_verbosity_error()


@pytest.fixture
def examples(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.chdir(EXAMPLES)
    return EXAMPLES


def _cfg(*overrides):
    return load_config(None, ["plan.device=cpu", "train.monitor_interval_s=0",
                              "optim.name=adamw", "optim.weight_decay=0", *overrides])


def _import(name):
    import importlib

    return importlib.import_module(name)


# ---------------------------------------------------------------- fit() on each model type


def test_sequence_classification_with_a_padding_collator_learns(examples):
    ex = _import("hf_sequence_classification")
    train, val, pad = ex.data()
    torch.manual_seed(0)
    summary = fit(ex.model(), train, val, _cfg("optim.lr=3e-3", "train.epochs=8"),
                  progress_bar=False, collate_fn=pad)
    assert summary["task"] == "classification"
    assert summary["train_loader"].startswith("DataLoader")  # the collate_fn batches
    assert summary["val_accuracy"] >= 0.9  # chance: 0.5


def test_token_classification_ignores_the_padded_positions():
    torch.manual_seed(0)
    summary = fit(model_types.tagger(), *model_types.tagged(),
                  _cfg("optim.lr=3e-3", "train.epochs=3"), progress_bar=False)
    assert summary["task"] == "token-classification"
    assert summary["train_loader"] == "in-memory batched"  # a dict of tensors, indexed
    assert summary["val_accuracy"] >= 0.9  # chance: 0.5


def test_a_causal_lm_stops_at_exactly_max_steps_and_learns(examples):
    ex = _import("hf_causal_lm")
    train, val = ex.data(max_bytes=60_000)
    torch.manual_seed(0)
    summary = fit(ex.model(), train, val, _cfg("optim.lr=3e-3", "train.max_steps=40",
                                               "data.batch_size=32"), progress_bar=False)
    assert summary["task"] == "causal-lm" and summary["steps"] == 40
    assert "max_steps (40)" in summary["stop_reason"]
    assert summary["val_perplexity"] == pytest.approx(math.exp(summary["val_loss"]))
    assert summary["val_perplexity"] < 40  # uniform over 256 bytes: 256


def test_image_classification_on_pixel_values(examples):
    ex = _import("hf_image_classification")
    train, val = ex.data()
    torch.manual_seed(0)
    summary = fit(ex.model(), train, val, _cfg("optim.lr=2e-3", "train.epochs=4"),
                  progress_bar=False)
    assert summary["task"] == "classification"
    assert summary["val_accuracy"] >= 0.4  # chance: 0.1


def test_regression_uses_mse_and_reports_mae():
    train, val = model_types.regression()
    summary = fit(model_types.mlp_1(), train, val, _cfg("optim.lr=1e-2", "train.epochs=10"),
                  progress_bar=False)
    assert summary["task"] == "regression" and summary["val_accuracy"] is None
    spread = val.tensors[1].abs().mean().item()
    assert summary["val_mae"] < 0.3 * spread  # predicting 0 gets `spread`


def test_multi_label_uses_bce_and_per_label_accuracy():
    summary = fit(model_types.mlp_4(), *model_types.multilabel(),
                  _cfg("optim.lr=1e-2", "train.epochs=8"), progress_bar=False)
    assert summary["task"] == "multi-label"
    assert summary["val_accuracy"] >= 0.9  # chance: 0.5
    assert summary["metric"].startswith("per-label accuracy")  # said, not "accuracy"
    assert "per-label accuracy" in format_summary(summary)


def test_a_custom_loss_gets_the_logits_and_the_model_loss_is_not_used():
    seen = []

    def loss_fn(outputs, labels, inputs, *extras):
        seen.append((tuple(outputs.shape), sorted(inputs)))
        return nn.functional.cross_entropy(outputs.flatten(0, -2).float(), labels.flatten(),
                                           ignore_index=-100)

    fit(model_types.tagger(), model_types._tagged(64, 0), model_types._tagged(32, 1),
        _cfg("train.epochs=1", "data.batch_size=32"), progress_bar=False, loss_fn=loss_fn)
    assert seen[0] == ((32, 12, 2), ["attention_mask", "input_ids"])


def test_activation_checkpointing_uses_the_models_own_and_keeps_the_losses():
    data = TensorDictDataset(input_ids=torch.randint(0, 50, (64, 16)))

    def run(checkpointing: bool):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2,
                                           n_positions=16, resid_pdrop=0, embd_pdrop=0,
                                           attn_pdrop=0))
        cfg = _cfg("train.epochs=1", "data.batch_size=16", "plan.precision=fp32",
                   f"plan.activation_checkpointing={str(checkpointing).lower()}")
        return fit(model, data, data, cfg, progress_bar=False)

    plain, ckpt = run(False), run(True)
    assert "checkpointing_enable()" in ckpt["plan"]["outcomes"]["activation_checkpointing"]
    assert ckpt["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-5)


def test_a_resumed_hf_run_ends_bit_identical(tmp_path, monkeypatch, examples):
    ex = _import("hf_sequence_classification")
    train, val, pad = ex.data()
    cfg = _cfg("optim.lr=3e-3", "train.epochs=2", "train.checkpoint_every=5",
               "plan.precision=fp32")

    def train_to(out):
        torch.manual_seed(0)
        return fit(ex.model(), train, val, cfg, out, progress_bar=False, collate_fn=pad)

    train_to(tmp_path / "full")
    snapshot = tmp_path / "snapshot"
    snapshot_first_checkpoint(monkeypatch, lambda: train_to(tmp_path / "other"), snapshot)
    torch.manual_seed(0)
    fit(ex.model(), train, val, cfg, snapshot, resume=True, progress_bar=False, collate_fn=pad)
    full = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    resumed = torch.load(snapshot / "model.pt", weights_only=True)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


# ---------------------------------------------------------------- the CLI on them

HF_ARGS = ["--model", "hf_sequence_classification:model", "--data",
           "hf_sequence_classification:data", "--set", "optim.name=adamw", "--set",
           "optim.lr=3e-3", "--no-progress"]


@pytest.mark.parametrize("example, task", [("hf_causal_lm", "causal-lm"),
                                           ("hf_seq2seq", "seq2seq")])
def test_distilling_a_stock_language_model_reports_loss_and_perplexity(examples, tmp_path,
                                                                       capsys, example, task):
    args = ["--data", f"{example}:data", "--set", "optim.name=adamw", "--set",
            "optim.lr=3e-3", "--set", "train.max_steps=8", "--no-progress"]
    teacher = tmp_path / "teacher"
    assert main(["train", "--model", f"{example}:model", *args, "--out", str(teacher)]) == 0
    out = tmp_path / "kd"
    assert main(["distill", "--teacher-model", f"{example}:model", "--teacher", str(teacher),
                 "--student-model", f"{example}:student", *args, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == task
    for row in ("teacher", "student_alone", "student_kd"):
        assert report[row]["val_perplexity"] == pytest.approx(
            math.exp(report[row]["val_loss"]), rel=1e-6)
    assert "perplexity" in capsys.readouterr().out
    if example == "hf_causal_lm":  # TensorDictDataset: the cache note says why it is live
        assert "a dataset of dicts" in report["cache"]


def test_train_on_a_stock_model_through_the_cli(examples, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *HF_ARGS, "--epochs", "8", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_accuracy"] >= 0.9
    assert "validation accuracy" in capsys.readouterr().out


def test_doctor_on_a_stock_model(examples, tmp_path, capsys):
    assert main(["doctor", *HF_ARGS, "--steps", "3", "--no-profile", "--no-compile-check",
                 "--out", str(tmp_path / "doctor")]) == 0
    report = json.loads((tmp_path / "doctor" / "doctor.json").read_text())
    assert report["measured"]["samples_per_second"] > 0
    assert report["measured"]["flops_per_sample"] > 0


def test_target_on_the_loss_stops_the_run(examples, tmp_path):
    out = tmp_path / "run"
    assert main(["train", *HF_ARGS, "--epochs", "20", "--set", "train.target=val_loss<=0.3",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] < 20 and summary["val_loss"] <= 0.3
    assert "val_loss<=0.3 met" in summary["stop_reason"]


@pytest.mark.slow
def test_bench_on_a_stock_model_then_train_with_its_plan(examples, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", *HF_ARGS, "--budget-s", "25", "--out", str(out),
                 "--keep-batch-size"]) == 0
    table = capsys.readouterr().out
    assert "baseline" in table and "winner (*)" in table
    assert main(["train", *HF_ARGS, "--plan", str(out / "plan.yaml"), "--epochs", "8",
                 "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["val_accuracy"] >= 0.9


@pytest.mark.slow
def test_two_process_launch_on_a_stock_model(tmp_path):
    for strategy in ("ddp", "fsdp"):
        out = tmp_path / strategy
        done = subprocess.run(
            [sys.executable, "-m", "leantrain", "launch", "--nproc", "2", "--", "train",
             *HF_ARGS, "--epochs", "8", "--set", f"plan.distributed={strategy}",
             "--set", "plan.device=cpu", "--out", str(out)],
            cwd=EXAMPLES, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["val_accuracy"] >= 0.8, strategy


# ---------------------------------------------------------------- one clear line each

BROKEN = '''
import torch
from torch import nn
from leantrain.data.loaders import TensorDictDataset
import hf_sequence_classification as ex

class Hidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 8)
    def forward(self, input_ids, attention_mask=None):
        return {"last_hidden_state": self.embed(input_ids)}

def hidden():
    return Hidden()

def ids(extra=None, labels=None):
    x = torch.randint(4, 64, (64, 8))
    values = {"input_ids": x, "attention_mask": torch.ones_like(x),
              "labels": labels if labels is not None else torch.zeros(64, dtype=torch.long)}
    values.update(extra or {})
    return TensorDictDataset(values), TensorDictDataset(values)

def plain():
    return ids()

def with_idx():
    return ids({"idx": torch.arange(64)})

def five_labels():
    return ids(labels=torch.arange(64) % 5)

def bad_collate():
    train, val, pad = ex.data()
    def collate(samples):
        if any(len(s["input_ids"]) == 16 for s in samples):
            raise ValueError("no room for 16 tokens")
        return pad(samples)
    return train, val, collate
'''


@pytest.fixture
def broken(tmp_path):
    (tmp_path / "broken.py").write_text(BROKEN)
    return tmp_path


def _first_long_sample() -> int:
    """The dataset index of the first 16-token sample in the first training batch."""
    from leantrain.data.loaders import epoch_order

    sys.path.insert(0, str(EXAMPLES))
    train = _import("hf_sequence_classification").data()[0]
    first_batch = epoch_order(len(train), 0, 0, shuffle=True)[:64].tolist()  # seed 0, epoch 0
    return next(i for i in first_batch if len(train[i]["input_ids"]) == 16)


@pytest.mark.parametrize("model, data, fragment", [
    ("broken:hidden", "broken:plain", "has neither logits nor a loss"),
    ("hf_sequence_classification:model", "broken:with_idx",
     "batch key 'idx' is not a parameter of the model's forward; it takes:"),
    ("hf_sequence_classification:model", "broken:five_labels",
     "labels out of range: found 0..4, but the model outputs 2 classes"),
    ("hf_sequence_classification:model", "broken:bad_collate",
     "collate failed at sample"),
])
def test_each_mismatch_is_one_line_and_exit_2_with_nothing_written(broken, model, data,
                                                                   fragment):
    out = broken / "run"
    env_path = f"{EXAMPLES}"
    done = subprocess.run([sys.executable, "-m", "leantrain", "train", "--model", model,
                           "--data", data, "--set", "data.num_workers=0", "--out", str(out),
                           "--no-progress"], cwd=broken, capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "PYTHONPATH": env_path})
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("leantrain: error:") and fragment in last, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not out.exists()
    if data == "broken:bad_collate":
        assert f"(dataset index {_first_long_sample()})" in last
