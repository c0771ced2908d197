"""A stock Hugging Face Llama with grouped-query attention, right-padded batches, no labels.

The batches are what a tokenizer with `padding=True` returns: `input_ids` padded on the right
and an `attention_mask` marking the real tokens, and no `labels`. leantrain takes the
`input_ids` as the targets with every position the mask excludes set to -100, so the model
learns the real tokens, never the padding, and the accuracy counts real tokens only. The task
is synthetic (counting sequences of 3 to 16 tokens: each token is the previous one + 1), so
the example needs no download.

    leantrain train --model hf_padded_causal_lm:model --data hf_padded_causal_lm:data \\
        --set optim.name=adamw --set optim.lr=3e-3 --set train.epochs=4
    python hf_padded_causal_lm.py

(run from this folder; tests/test_your_model.py trains it through fit, bench and train and
checks that it learns; the docs' snippet test runs the command).
"""

import torch
from torch.utils.data import Dataset

VOCAB, PAD = 24, 0


class Counting(Dataset):
    """Unpadded counting sequences of 3 to 16 tokens (`pad_right` pads a batch of them)."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.samples = []
        for _ in range(n):
            length = int(torch.randint(3, 17, (1,), generator=g))
            start = int(torch.randint(1, VOCAB - length, (1,), generator=g))
            self.samples.append(torch.arange(start, start + length))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.samples[index]}


def pad_right(samples: list[dict]) -> dict:
    """Pad on the right to the longest sample, with the attention mask that says so."""
    longest = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), longest), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(samples):
        ids[row, :len(s["input_ids"])] = s["input_ids"]
        mask[row, :len(s["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask}


def model():
    """4 query heads sharing 2 key/value heads (GQA)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=2))


def data():
    return Counting(320, seed=0), Counting(64, seed=1), pad_right


if __name__ == "__main__":
    from leantrain import fit, load_config

    train, val, collate = data()
    cfg = load_config(None, ["optim.name=adamw", "optim.lr=3e-3", "train.epochs=4"])
    summary = fit(model(), train, val, cfg, collate_fn=collate)
    print(f"next-token accuracy on real tokens {summary['val_accuracy']:.1%} (chance: 4%)")
