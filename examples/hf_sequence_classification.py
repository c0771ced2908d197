"""A stock Hugging Face BERT, variable-length token sequences, a padding collator.

The model is `BertForSequenceClassification` returned as is (it computes its own loss from
`labels`); each sample is a dict of unpadded tensors, and `pad` batches them. The task is
synthetic so the example needs no download: does the sequence contain token 3?

    leantrain train --model hf_sequence_classification:model \\
        --data hf_sequence_classification:data --set optim.name=adamw \\
        --set optim.lr=3e-3 --set train.epochs=8
    python hf_sequence_classification.py       # the same through the Python API

(run from this folder; the test suite runs both on tiny settings).
"""

import torch
from torch.utils.data import Dataset

VOCAB, PAD, MARK = 64, 0, 3


class Sentences(Dataset):
    """Random sequences of 4-16 tokens; half of them contain MARK (label 1)."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.samples = []
        for i in range(n):
            length = int(torch.randint(4, 17, (1,), generator=g))
            ids = torch.randint(4, VOCAB, (length,), generator=g)
            label = i % 2
            if label:
                ids[int(torch.randint(0, length, (1,), generator=g))] = MARK
            self.samples.append({"input_ids": ids, "labels": torch.tensor(label)})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.samples[index]


def pad(samples: list[dict]) -> dict:
    """Pad input_ids to the longest sample, with the attention mask that says so."""
    longest = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), longest), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(samples):
        ids[row, :len(s["input_ids"])] = s["input_ids"]
        mask[row, :len(s["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask,
            "labels": torch.stack([s["labels"] for s in samples])}


def model():
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, num_labels=2))


def data():
    return Sentences(512, seed=0), Sentences(128, seed=1), pad


if __name__ == "__main__":
    from leantrain import fit, load_config

    train, val, collate = data()
    cfg = load_config(None, ["optim.name=adamw", "optim.lr=3e-3", "train.epochs=8"])
    summary = fit(model(), train, val, cfg, collate_fn=collate)
    print(f"validation accuracy {summary['val_accuracy']:.1%} (chance: 50%)")
