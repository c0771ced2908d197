"""A stock Hugging Face GPT-2 learning bytes of text: a causal language model.

The batches are dicts with `input_ids` only: the model is given them as `labels` too and
computes its own next-token loss; leantrain reports next-token accuracy and perplexity. The
text is the Python standard library's own sources (on every machine; no download).

    leantrain train --model hf_causal_lm:model --data hf_causal_lm:data \\
        --set optim.name=adamw --set optim.lr=3e-3 --set train.max_steps=200
    python hf_causal_lm.py

(run from this folder; the test suite runs both on tiny settings).
"""

from leantrain.data.loaders import TensorDictDataset
from leantrain.data.text import load_text

CONTEXT = 32


def model():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=2,
                                      n_positions=CONTEXT, bos_token_id=0, eos_token_id=0))


def student():
    """A quarter-width GPT-2 to distil `model()` into (`leantrain distill --student-model`)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=32, n_layer=1, n_head=2,
                                      n_positions=CONTEXT, bos_token_id=0, eos_token_id=0))


def data(max_bytes: int = 200_000):
    """Windows of CONTEXT bytes (their next-byte targets come from the model's shift)."""
    train, val, _ = load_text("python-stdlib", CONTEXT, 0.1, max_bytes)
    return (TensorDictDataset(input_ids=train.tensors[0]),
            TensorDictDataset(input_ids=val.tensors[0]))


if __name__ == "__main__":
    from leantrain import fit, load_config

    train, val = data()
    cfg = load_config(None, ["optim.name=adamw", "optim.lr=3e-3", "train.max_steps=300"])
    summary = fit(model(), train, val, cfg)
    print(f"validation perplexity {summary['val_perplexity']:.1f} (uniform bytes: 256)")
