"""Attention heads for structured pruning: which layers produce heads, and keeping the
attention modules' own head counts in step with their pruned projections.

Torch-Pruning removes whole heads when it is told how many heads each projection holds
(`num_heads`); the attention module's attributes (head count, widths, the split of a fused
q/k/v projection) must then be updated, or its reshapes fail (`shape '[64, 32, -1, 32]' is
invalid`). Two layouts are known, which cover BERT/RoBERTa/ViT-style encoders and GPT-2-style
decoders: separate `query`/`key`/`value` Linear layers (`num_attention_heads`,
`attention_head_size`, `all_head_size`), and one fused `c_attn` projection split in three
(`num_heads`, `head_dim`, `split_size`). GPT-2's `Conv1D` (a Linear with its weight stored
transposed) is first converted to `nn.Linear`, which the dependency graph understands.

The residual stream (the hidden size shared by embeddings, LayerNorms and every block) is kept
whole: the layers that write into it are not pruned at their outputs, so each block keeps its
interface and only heads and MLP channels go.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LeantrainError

HEADS_KEY = "__heads__"  # state_dict entry beside an attention module: its head count
LINEAR_KEY = "__leantrain__.conv1d_as_linear"  # marks a model whose Conv1D became Linear


@dataclass
class Attention:
    name: str
    module: nn.Module
    projections: list[nn.Linear]  # the layers whose outputs are heads
    fused: bool  # one projection holding q, k and v


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace every Hugging Face `Conv1D` (y = x W + b, W of shape (in, out)) by the equal
    `nn.Linear` (weight W transposed); returns how many were replaced."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not _is_conv1d(child):
                continue
            weight = child.weight
            linear = nn.Linear(weight.shape[0], weight.shape[1], bias=child.bias is not None,
                               device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(weight.t())
                if child.bias is not None:
                    linear.bias.copy_(child.bias)
            setattr(parent, name, linear)
            replaced += 1
    if replaced:
        model._leantrain_conv1d_as_linear = True  # save_pruned records it for load_pruned
    return replaced


def find(model: nn.Module) -> list[Attention]:
    """The attention modules of a known layout; a module that looks like attention (it has a
    head count) in an unknown layout is an error naming it."""
    found = []
    for name, module in model.named_modules():
        qkv = [getattr(module, k, None) for k in ("query", "key", "value")]
        if all(isinstance(p, nn.Linear) for p in qkv) and hasattr(module, "num_attention_heads"):
            found.append(Attention(name, module, qkv, fused=False))
        elif isinstance(getattr(module, "c_attn", None), nn.Linear) and hasattr(module,
                                                                                "num_heads"):
            if getattr(module, "is_cross_attention", False):
                raise LeantrainError(f"cannot prune the heads of {name}: cross-attention "
                                     "(q_attn) is not handled")
            found.append(Attention(name, module, [module.c_attn], fused=True))
        elif hasattr(module, "num_attention_heads") and any(
                isinstance(c, nn.Linear) for c in module.children()):
            raise LeantrainError(f"cannot prune the heads of {name} ({type(module).__name__}): "
                                 "leantrain knows separate query/key/value layers and GPT-2's "
                                 "fused c_attn")
    return found


def heads_of(attention: Attention) -> int:
    module = attention.module
    return module.num_heads if attention.fused else module.num_attention_heads


def num_heads(attentions: list[Attention]) -> dict[nn.Module, int]:
    """Torch-Pruning's `num_heads`: each head-producing projection and its head count."""
    return {p: heads_of(a) for a in attentions for p in a.projections}


def set_heads(attention: Attention, heads: int) -> None:
    """Bring the module's attributes in line with its (pruned) projections' widths."""
    module, width = attention.module, attention.projections[0].out_features
    if attention.fused:
        module.num_heads, module.split_size = heads, width // 3
        module.head_dim = module.split_size // heads
    else:
        module.num_attention_heads, module.all_head_size = heads, width
        module.attention_head_size = width // heads


def residual_writers(model: nn.Module, attentions: list[Attention]) -> list[nn.Linear]:
    """The Linear layers whose outputs have the residual stream's width (the first embedding's
    dimension), except the head projections: not pruned at their outputs, so every block keeps
    its interface."""
    embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if embedding is None:
        return []
    heads = {id(p) for a in attentions for p in a.projections}
    return [m for m in model.modules() if isinstance(m, nn.Linear) and
            m.out_features == embedding.embedding_dim and id(m) not in heads]
