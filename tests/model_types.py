"""Small datasets and models of the task types the step contract infers (used by the tests,
in-process and as `--model`/`--data` MOD:FN targets)."""

import torch
from torch import nn
from torch.utils.data import TensorDataset
from transformers import BertConfig, BertForTokenClassification

from leantrain.data.loaders import TensorDictDataset


def _x(n, seed):
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))

def regression():
    return tuple(TensorDataset(x, x @ torch.linspace(-1, 1, 8)) for x in (_x(512, 0), _x(128, 1)))

def multilabel():
    return tuple(TensorDataset(x, (x[:, :4] > 0).float()) for x in (_x(512, 0), _x(128, 1)))

def mlp_1():
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))

def mlp_4():
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))

def _tagged(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, 12), generator=g)
    labels = (ids >= 32).long()
    pad = torch.arange(12) >= torch.randint(6, 13, (n,), generator=g)[:, None]
    ids[pad], labels[pad] = 0, -100
    return TensorDictDataset(input_ids=ids, attention_mask=(~pad).long(), labels=labels)

def tagged():
    return _tagged(512, 0), _tagged(128, 1)

def tagger():
    return BertForTokenClassification(BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16, num_labels=2))
