"""Your model, nothing silently wrong: the shapes users bring, each asserted to learn.

A padded causal LM without labels (padding is never a target), an encoder-decoder with targets
shorter than its sources (its decoder fed from the labels, in training, evaluation and
distillation), a model that names its loss terms (trained on their sum, said so), and the one
meaning of "loss" (a model's own loss on the validation set is the validation loss).
"""

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leantrain import fit, load_config
from leantrain.losses.distillation import DistillationLoss
from leantrain.run.step import lm_targets

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))  # the examples users read are the models tested here
import hf_padded_causal_lm as padded_lm  # noqa: E402
import hf_seq2seq as seq2seq  # noqa: E402
import named_losses  # noqa: E402


def _cfg(*extra):
    return load_config(None, ["optim.name=adamw", "optim.lr=3e-3", "schedule.name=constant",
                              "plan.precision=fp32", "train.monitor_interval_s=0",
                              "data.batch_size=16", *extra])


def _seeded(build, *args):
    torch.manual_seed(0)
    return build(*args)


# ------------------------------------------------------------------ a padded causal LM


def _real_token_accuracy(model, data) -> float:
    """Next-token accuracy on real tokens only, computed here, not by leantrain."""
    model.eval()
    hits = total = 0
    with torch.no_grad():
        for i in range(0, len(data), 32):
            batch = padded_lm.pad_right([data[j] for j in range(i, min(i + 32, len(data)))])
            logits = model(**batch).logits
            guess, target = logits[:, :-1].argmax(-1), batch["input_ids"][:, 1:]
            real = batch["attention_mask"][:, 1:].bool()
            hits += int(((guess == target) & real).sum())
            total += int(real.sum())
    return hits / total


def test_targets_without_labels_mask_what_the_attention_mask_excludes():
    ids = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 3, 4, 5]])
    mask = (ids != 0).long()
    assert lm_targets({"input_ids": ids, "attention_mask": mask}, None).tolist() == \
        [[5, 6, 7, -100, -100], [-100, -100, 3, 4, 5]]
    assert lm_targets({"input_ids": ids}, pad_token_id=0).tolist() == \
        [[5, 6, 7, -100, -100], [-100, -100, 3, 4, 5]]
    assert lm_targets({"input_ids": ids}, pad_token_id=None).tolist() == ids.tolist()


def test_a_padded_causal_lm_without_labels_learns_the_real_tokens_not_the_padding():
    train, val, pad = padded_lm.data()
    model = _seeded(padded_lm.model)
    summary = fit(model, train, val, _cfg("train.epochs=4"), collate_fn=pad,
                  progress_bar=False)
    assert summary["task"] == "causal-lm"
    real = _real_token_accuracy(model, val)
    # the reported accuracy is the accuracy on real tokens: padding is no target
    assert summary["val_accuracy"] == pytest.approx(real, abs=1e-6)
    assert real > 0.8  # counting, learnt (chance is 1 in 24)
    assert summary["loss"] == "the model's own loss, in training and validation"


# ------------------------------------------------------------------ an encoder-decoder


class DecoderInputs:
    """Records the input ids each call of a BART's decoder received."""

    def __init__(self, model):
        self.seen = []
        model.model.decoder.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.seen.append(kwargs.get("input_ids", args[0] if args else None))


def _shifted(labels):
    from transformers.models.bart.modeling_bart import shift_tokens_right

    return shift_tokens_right(labels, seq2seq.PAD, seq2seq.END)


def test_an_encoder_decoder_with_shorter_targets_is_fed_from_its_labels_and_learns():
    train, val, pad = seq2seq.data()
    model = _seeded(seq2seq.model)
    seen = DecoderInputs(model)
    summary = fit(model, train, val, _cfg("train.epochs=8"), collate_fn=pad,
                  progress_bar=False)
    assert summary["task"] == "seq2seq"
    # every call, training and validation, built its decoder inputs from the targets (3 to 5
    # tokens), never from the source (6 to 12)
    assert seen.seen and all(ids.shape[1] <= 5 for ids in seen.seen)
    assert summary["val_accuracy"] > 0.6  # copying 3-5 tokens out of 17 (chance 6%)


def test_a_custom_loss_on_an_encoder_decoder_still_feeds_the_decoder_its_labels():
    train, val, pad = seq2seq.Prefix(64, 0), seq2seq.Prefix(32, 1), seq2seq.pad_pairs
    model = _seeded(seq2seq.model)
    seen = DecoderInputs(model)
    calls = []  # (what the decoder read in the forward just before, the loss's labels)

    def loss_fn(logits, labels, inputs, *extras):
        assert torch.equal(inputs["labels"], labels)  # the loss sees what the model was given
        calls.append((seen.seen[-1], labels))
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)

    fit(model, train, val, _cfg("train.epochs=1", "data.batch_size=32"), loss_fn=loss_fn,
        collate_fn=pad, progress_bar=False)
    assert calls and all(torch.equal(read, _shifted(labels)) for read, labels in calls)


def test_distilling_an_encoder_decoder_runs_the_teacher_on_the_labels_too():
    train, val, pad = seq2seq.data()
    teacher = _seeded(seq2seq.model)
    fit(teacher, train, val, _cfg("train.epochs=6"), collate_fn=pad, progress_bar=False)
    seen = DecoderInputs(teacher)
    kd = DistillationLoss(teacher, temperature=1.0, alpha=0.5, task="seq2seq")
    calls = []  # (what the teacher's decoder read, the labels of that step)

    def loss_fn(logits, labels, inputs, *extras):
        loss = kd(logits, labels, inputs, *extras)
        calls.append((seen.seen[-1], labels))
        return loss

    summary = fit(_seeded(seq2seq.student), train, val, _cfg("train.epochs=8"),
                  loss_fn=loss_fn, collate_fn=pad, progress_bar=False)
    assert calls and all(torch.equal(read, _shifted(labels)) for read, labels in calls)
    assert summary["task"] == "seq2seq" and summary["val_accuracy"] > 0.3  # chance: 6%
    assert summary["loss"].startswith("your loss_fn")


# ------------------------------------------------------------------ named loss terms


def _terms(model, data):
    model.eval()
    with torch.no_grad():
        out = model(**data.tensors)
    return float(out["loss_cls"]), float(out["loss_aux"])


def test_named_loss_terms_are_trained_on_their_sum_and_the_summary_says_so(caplog):
    train, val = named_losses.data()
    model = _seeded(named_losses.model)
    before = _terms(model, val)
    with caplog.at_level(logging.WARNING, logger="leantrain"):
        summary = fit(model, train, val, _cfg("train.epochs=6"), progress_bar=False)
    after = _terms(model, val)
    assert after[0] < 0.75 * before[0] and after[1] < 0.1 * before[1]  # both terms learnt
    assert "loss_cls, loss_aux" in summary["loss"]
    assert any("loss_cls + loss_aux" in r.getMessage() for r in caplog.records)
    assert summary["val_loss"] == pytest.approx(sum(after), rel=1e-4)


# ------------------------------------------------------------------ one loss, one meaning


class ScaledLoss(nn.Module):
    """A classifier whose own loss is 2 x cross-entropy + 0.5: not the task's loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = 2 * F.cross_entropy(logits, labels) + 0.5
        return out


def test_the_validation_loss_of_a_model_with_its_own_loss_is_that_loss_on_the_val_set():
    train, val = named_losses.pairs(256, 0), named_losses.pairs(100, 1)
    model = ScaledLoss()
    summary = fit(model, train, val, _cfg("train.epochs=2", "data.eval_batch_size=32"),
                  progress_bar=False)
    model.eval()
    with torch.no_grad():
        own = float(model(**val.tensors)["loss"])  # the whole set at once: its mean
    assert summary["val_loss"] == pytest.approx(own, rel=1e-5)
    assert summary["loss"] == "the model's own loss, in training and validation"


# ------------------------------------------------------------------ through the commands


@pytest.mark.parametrize("example, task", [("hf_padded_causal_lm", "causal-lm"),
                                           ("hf_seq2seq", "seq2seq"),
                                           ("named_losses", "classification")])
def test_bench_then_train_with_its_plan_on_each_shape(example, task, tmp_path, monkeypatch):
    from leantrain.cli import main

    monkeypatch.chdir(EXAMPLES)
    args = ["--model", f"{example}:model", "--data", f"{example}:data", "--set",
            "optim.name=adamw", "--set", "optim.lr=3e-3", "--no-progress"]
    assert main(["bench", *args, "--budget-s", "8", "--out", str(tmp_path / "bench")]) == 0
    out = tmp_path / "run"
    assert main(["train", *args, "--plan", str(tmp_path / "bench" / "plan.yaml"),
                 "--set", "train.max_steps=5", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == task and summary["steps"] == 5
