"""A stock Hugging Face BART (an encoder-decoder) with targets shorter than its sources.

Each sample is a dict of an unpadded source (`input_ids`, 6 to 12 tokens) and target
(`labels`, the source's first 3 to 5 tokens); `pad_pairs` pads sources with the pad token and
an attention mask, targets with -100. An encoder-decoder builds its decoder inputs from its
labels, so leantrain always calls it with them (in training, evaluation, under a custom loss
and when distilling): the task is `seq2seq`, scored per target token. The task is synthetic, so
the example needs no download.

    leantrain train --model hf_seq2seq:model --data hf_seq2seq:data \\
        --set optim.name=adamw --set optim.lr=3e-3 --set train.epochs=8
    python hf_seq2seq.py

(run from this folder; tests/test_your_model.py trains it through fit, bench and train and
checks that it learns; the docs' snippet test runs the command).
"""

import torch
from torch.utils.data import Dataset

VOCAB, PAD, END = 20, 0, 2


class Prefix(Dataset):
    """Sources of 6 to 12 tokens; each target is its source's first 3 to 5 tokens."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.samples = []
        for _ in range(n):
            length = int(torch.randint(6, 13, (1,), generator=g))
            source = torch.randint(3, VOCAB, (length,), generator=g)
            keep = int(torch.randint(3, 6, (1,), generator=g))
            self.samples.append((source, source[:keep].clone()))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        source, target = self.samples[index]
        return {"input_ids": source, "labels": target}


def pad_pairs(samples: list[dict]) -> dict:
    """Sources padded with PAD and an attention mask; targets padded with -100."""
    sources = max(len(s["input_ids"]) for s in samples)
    targets = max(len(s["labels"]) for s in samples)
    ids = torch.full((len(samples), sources), PAD, dtype=torch.long)
    labels = torch.full((len(samples), targets), -100, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(samples):
        ids[row, :len(s["input_ids"])] = s["input_ids"]
        mask[row, :len(s["input_ids"])] = 1
        labels[row, :len(s["labels"])] = s["labels"]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def model(width: int = 32):
    from transformers import BartConfig, BartForConditionalGeneration

    return BartForConditionalGeneration(BartConfig(
        vocab_size=VOCAB, d_model=width, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=2 * width,
        decoder_ffn_dim=2 * width, max_position_embeddings=32, pad_token_id=PAD,
        bos_token_id=1, eos_token_id=END, decoder_start_token_id=END, forced_eos_token_id=None))


def student():
    """A narrower BART to distil `model()` into (`leantrain distill --student-model`)."""
    return model(width=24)


def data():
    return Prefix(320, seed=0), Prefix(64, seed=1), pad_pairs


if __name__ == "__main__":
    from leantrain import fit, load_config

    train, val, collate = data()
    cfg = load_config(None, ["optim.name=adamw", "optim.lr=3e-3", "train.epochs=8"])
    summary = fit(model(), train, val, cfg, collate_fn=collate)
    print(f"accuracy per target token {summary['val_accuracy']:.1%} (chance: 6%)")
