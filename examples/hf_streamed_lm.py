"""A stock Hugging Face GPT-2 on a stream: windows of bytes read file by file, never all held.

The datasets are `IterableDataset`s (no length), the type streaming libraries hand out: the
run's length is `train.max_steps`; under `leantrain launch` and with loader workers, each
rank and worker keeps its own share of every epoch (leantrain splits the stream); a resume
continues at the batch it stopped at.

    leantrain train --model hf_streamed_lm:model --data hf_streamed_lm:data \\
        --set optim.name=adamw --set optim.lr=3e-3 --set train.max_steps=200 \\
        --set data.num_workers=2

(run from this folder; the docs' snippet runs it on tiny settings).
"""

import torch
from torch.utils.data import IterableDataset

from leantrain.data.text import stdlib_sources

CONTEXT = 32


class ByteWindows(IterableDataset):
    """Windows of CONTEXT bytes, file after file: the file being read is all it holds."""

    def __init__(self, files):
        self.files = files

    def __iter__(self):
        for path in self.files:
            data = path.read_bytes()
            for start in range(0, len(data) - CONTEXT + 1, CONTEXT):
                window = torch.frombuffer(bytearray(data[start:start + CONTEXT]),
                                          dtype=torch.uint8)
                yield {"input_ids": window.long()}


def data():
    files = stdlib_sources()
    return ByteWindows(files[2:]), ByteWindows(files[:2])  # two files held out


def model():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=2,
                                      n_positions=CONTEXT, bos_token_id=0, eos_token_id=0))
