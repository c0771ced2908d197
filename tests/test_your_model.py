"""Your model, nothing silently wrong: the shapes users bring, each asserted to learn.

A padded causal LM without labels (padding is never a target), an encoder-decoder with targets
shorter than its sources (its decoder fed from the labels, in training, evaluation and
distillation), a model that names its loss terms (trained on their sum, said so), and the one
meaning of "loss" (a model's own loss on the validation set is the validation loss).
"""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from leantrain import fit, load_config
from leantrain.losses.distillation import DistillationLoss
from leantrain.run.step import lm_targets

PAD = 0


def _cfg(*extra):
    return load_config(None, ["optim.name=adamw", "optim.lr=3e-3", "schedule.name=constant",
                              "plan.precision=fp32", "train.monitor_interval_s=0",
                              "data.batch_size=16", *extra])


# ------------------------------------------------------------------ a padded causal LM


class Counting(Dataset):
    """Counting sequences (each token the last + 1) of 3 to 16 tokens: a causal LM learns them
    from the first token on. Unpadded samples: `pad_right` pads a batch as a tokenizer does."""

    def __init__(self, n: int, seed: int, vocab: int = 24):
        g = torch.Generator().manual_seed(seed)
        self.samples = []
        for _ in range(n):
            length = int(torch.randint(3, 17, (1,), generator=g))
            start = int(torch.randint(1, vocab - length, (1,), generator=g))
            self.samples.append(torch.arange(start, start + length))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return {"input_ids": self.samples[i]}


def pad_right(samples):
    longest = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), longest), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(samples):
        ids[row, :len(s["input_ids"])] = s["input_ids"]
        mask[row, :len(s["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask}


def llama(vocab: int = 24):
    """A grouped-query (GQA) Llama: 4 query heads share 2 key/value heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=2))


def _real_token_accuracy(model, data) -> float:
    """Next-token accuracy on real tokens only, computed here, not by leantrain."""
    model.eval()
    hits = total = 0
    with torch.no_grad():
        for i in range(0, len(data), 32):
            batch = pad_right([data[j] for j in range(i, min(i + 32, len(data)))])
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
    train, val = Counting(320, 0), Counting(64, 1)
    model = llama()
    summary = fit(model, train, val, _cfg("train.epochs=4"), collate_fn=pad_right,
                  progress_bar=False)
    assert summary["task"] == "causal-lm"
    real = _real_token_accuracy(model, val)
    # the reported accuracy is the accuracy on real tokens: padding is no target
    assert summary["val_accuracy"] == pytest.approx(real, abs=1e-6)
    assert real > 0.8  # counting, learnt (chance is 1 in 24)
    assert summary["loss"] == "the model's own loss, in training and validation"


# ------------------------------------------------------------------ an encoder-decoder


class Prefix(Dataset):
    """Sources of 6 to 12 tokens; the target is the source's first 3 to 5 tokens (a copy),
    so targets are shorter than sources, both of varying length."""

    def __init__(self, n: int, seed: int, vocab: int = 20):
        g = torch.Generator().manual_seed(seed)
        self.samples = []
        for _ in range(n):
            length = int(torch.randint(6, 13, (1,), generator=g))
            source = torch.randint(3, vocab, (length,), generator=g)
            keep = int(torch.randint(3, 6, (1,), generator=g))
            self.samples.append((source, source[:keep].clone()))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        source, target = self.samples[i]
        return {"input_ids": source, "labels": target}


def pad_pairs(samples):
    """Sources padded with PAD and an attention mask; targets padded with -100."""
    batch = pad_right([{"input_ids": s["input_ids"]} for s in samples])
    longest = max(len(s["labels"]) for s in samples)
    labels = torch.full((len(samples), longest), -100, dtype=torch.long)
    for row, s in enumerate(samples):
        labels[row, :len(s["labels"])] = s["labels"]
    return {**batch, "labels": labels}


def bart(width: int = 32, vocab: int = 20):
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(
        vocab_size=vocab, d_model=width, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=2 * width,
        decoder_ffn_dim=2 * width, max_position_embeddings=32, pad_token_id=PAD,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None))


class DecoderInputs:
    """Records the input ids each call of a BART's decoder received."""

    def __init__(self, model):
        self.seen = []
        model.model.decoder.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.seen.append(kwargs.get("input_ids", args[0] if args else None))


def _shifted(labels):
    from transformers.models.bart.modeling_bart import shift_tokens_right

    return shift_tokens_right(labels, PAD, 2)


def test_an_encoder_decoder_with_shorter_targets_is_fed_from_its_labels_and_learns():
    train, val = Prefix(320, 0), Prefix(64, 1)
    model = bart()
    seen = DecoderInputs(model)
    summary = fit(model, train, val, _cfg("train.epochs=8"), collate_fn=pad_pairs,
                  progress_bar=False)
    assert summary["task"] == "seq2seq"
    # every call, training and validation, built its decoder inputs from the targets (3 to 5
    # tokens), never from the source (6 to 12)
    assert seen.seen and all(ids.shape[1] <= 5 for ids in seen.seen)
    assert summary["val_accuracy"] > 0.6  # copying 3-5 tokens out of 17 (chance 6%)


def test_a_custom_loss_on_an_encoder_decoder_still_feeds_the_decoder_its_labels():
    train, val = Prefix(64, 0), Prefix(32, 1)
    model = bart()
    seen = DecoderInputs(model)
    calls = []  # (what the decoder read in the forward just before, the loss's labels)

    def loss_fn(logits, labels, inputs, *extras):
        assert torch.equal(inputs["labels"], labels)  # the loss sees what the model was given
        calls.append((seen.seen[-1], labels))
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)

    fit(model, train, val, _cfg("train.epochs=1", "data.batch_size=32"), loss_fn=loss_fn,
        collate_fn=pad_pairs, progress_bar=False)
    assert calls and all(torch.equal(read, _shifted(labels)) for read, labels in calls)


def test_distilling_an_encoder_decoder_runs_the_teacher_on_the_labels_too():
    train, val = Prefix(320, 0), Prefix(64, 1)
    teacher = bart(width=32)
    fit(teacher, train, val, _cfg("train.epochs=6"), collate_fn=pad_pairs, progress_bar=False)
    seen = DecoderInputs(teacher)
    student = bart(width=24)
    kd = DistillationLoss(teacher, temperature=1.0, alpha=0.5, task="seq2seq")
    calls = []  # (what the teacher's decoder read, the labels of that step)

    def loss_fn(logits, labels, inputs, *extras):
        loss = kd(logits, labels, inputs, *extras)
        calls.append((seen.seen[-1], labels))
        return loss

    summary = fit(student, train, val, _cfg("train.epochs=8"), loss_fn=loss_fn,
                  collate_fn=pad_pairs, progress_bar=False)
    assert calls and all(torch.equal(read, _shifted(labels)) for read, labels in calls)
    assert summary["task"] == "seq2seq" and summary["val_accuracy"] > 0.3  # chance: 6%
    assert summary["loss"].startswith("your loss_fn")


# ------------------------------------------------------------------ named loss terms


class TwoTerms(nn.Module):
    """Returns logits and two named loss terms, no `loss`: a classification term and an
    auxiliary regression term on a second head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
        self.classes, self.aux = nn.Linear(32, 3), nn.Linear(32, 1)

    def forward(self, x, labels=None):
        h = self.body(x)
        logits = self.classes(h)
        out = {"logits": logits}
        if labels is not None:
            out["loss_cls"] = F.cross_entropy(logits, labels)
            out["loss_aux"] = F.mse_loss(self.aux(h).squeeze(-1), x.sum(-1))
        return out


class Pairs(Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.y = (self.x[:, 0] > 0).long() + (self.x[:, 1] > 0).long()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _terms(model, data):
    model.eval()
    with torch.no_grad():
        batch = {"x": data.x, "labels": data.y}
        out = model(**batch)
    return float(out["loss_cls"]), float(out["loss_aux"])


def test_named_loss_terms_are_trained_on_their_sum_and_the_summary_says_so(caplog):
    train, val = Pairs(512, 0), Pairs(128, 1)
    model = TwoTerms()
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
    train, val = Pairs(256, 0), Pairs(100, 1)
    model = ScaledLoss()
    summary = fit(model, train, val, _cfg("train.epochs=2", "data.eval_batch_size=32"),
                  progress_bar=False)
    model.eval()
    with torch.no_grad():
        own = float(model(val.x, val.y)["loss"])  # the whole set at once: its mean
    assert summary["val_loss"] == pytest.approx(own, rel=1e-5)
    assert summary["loss"] == "the model's own loss, in training and validation"
