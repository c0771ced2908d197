"""Attention heads for structured pruning: which layers produce heads, and keeping the
attention modules' own head counts in step with their pruned projections.

Torch-Pruning removes whole heads when it is told how many heads each projection holds
(`num_heads`); the attention module's attributes (head count, widths, the split of a fused
q/k/v projection) must then be updated, or its reshapes fail (`shape '[64, 32, -1, 32]' is
invalid`). Three layouts are known, which cover BERT/RoBERTa-style encoders, the newer
`q_proj`/`k_proj`/`v_proj` modules (ViT, Llama-style without grouped keys) and GPT-2-style
decoders: separate `query`/`key`/`value` Linear layers (`num_attention_heads`,
`attention_head_size`, `all_head_size`), separate `q_proj`/`k_proj`/`v_proj` layers
(`num_attention_heads`, a fixed `head_dim`), and one fused projection split in three
(GPT-2's `c_attn` with `num_heads`, `head_dim`, `split_size`; the text-gpt recipe's `qkv`
with `heads`). GPT-2's `Conv1D` (a Linear with its weight stored
transposed) is first converted to `nn.Linear`, which the dependency graph understands.

Torch-Pruning removes the heads of separate projections itself. A fused projection is split
in three inside the model's forward, and the graph's index mapping through that split fails,
so `prune_fused_heads` removes those heads directly: the same rows of q, k and v, the matching
inputs of the output projection (`c_proj`, `proj`), with Torch-Pruning's own layer surgery and the
same count Torch-Pruning would remove (ceil(ratio x heads)).

The residual stream (the hidden size shared by embeddings, LayerNorms and every block) is kept
whole: the layers that write into it are not pruned at their outputs, so each block keeps its
interface and only heads and MLP channels go.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LeantrainError

HEADS_KEY = "__heads__"  # state_dict entry beside an attention module: its head count
LINEAR_KEY = "__leantrain__.conv1d_as_linear"  # marks a model whose Conv1D became Linear


# (fused q/k/v projection, output projection, head-count attribute) of the fused layouts:
# GPT-2's, and leantrain's own GPT recipe's
FUSED_LAYOUTS = (("c_attn", "c_proj", "num_heads"), ("qkv", "proj", "heads"))


HEAD_COUNTS = ("num_attention_heads", "num_heads", "n_heads")  # what modules call theirs
HEAD_WIDTHS = ("head_dim", "attention_head_size")


@dataclass
class Attention:
    name: str
    module: nn.Module
    projections: list[nn.Linear]  # the layers whose outputs are heads (pruning first makes
    # GPT-2's Conv1D a Linear; tensor parallel splits the Conv1D itself)
    heads_attribute: str | None  # the module's head count (None: transformers 5 keeps none)
    output: nn.Linear | None = None  # a fused layout's output projection

    @property
    def fused(self) -> bool:
        """One projection holds q, k and v (each heads x head_dim wide, in that order)."""
        return self.output is not None


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
        separate = _separate_projections(name, module)
        if separate:
            found.append(Attention(name, module, separate, _heads_attribute(module)))
            continue
        fused = _fused_layout(name, module)
        if fused:
            found.append(fused)
    return found


def _heads_attribute(module: nn.Module) -> str | None:
    return next((a for a in HEAD_COUNTS if isinstance(getattr(module, a, None), int)), None)


def _head_width(module: nn.Module) -> int | None:
    """A module's head width: its own attribute (transformers 5 keeps `head_dim` and reshapes
    by -1 heads), else its config's hidden size over its head count."""
    width = next((getattr(module, a) for a in HEAD_WIDTHS
                  if isinstance(getattr(module, a, None), int)), None)
    if width is not None:
        return width
    config = getattr(module, "config", None)
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads",
                                                                  None)
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads \
        else None


def refuse_unknown(model: nn.Module, found: list[Attention]) -> None:
    """An attention module of a layout not known here is refused before any tracing, with
    the reason it is not known: pruned as plain channels, its model would lose width in the
    residual stream (and grouped keys once sent Torch-Pruning's graph search into a hang)."""
    covered = [a.name for a in found]
    for name, module in model.named_modules():
        kind = type(module).__name__
        if not kind.endswith("Attention") or isinstance(module, nn.MultiheadAttention):
            continue  # (Torch-Pruning prunes nn.MultiheadAttention's heads itself)
        if any(name == c or name.startswith(c + ".") or c.startswith(name + ".")
               for c in covered):
            continue  # a known module, or the wrapper around one (BertAttention)
        raise LeantrainError(f"cannot prune {name} ({kind}): {_unknown_because(module)}; "
                             "heads are pruned in query/key/value, q/k/v_proj and fused "
                             "c_attn/qkv layouts only (others would cut the residual stream)")


def _unknown_because(module: nn.Module) -> str:
    """Why an attention module's heads cannot be pruned, in words that are true of it (or of
    the attention inside a wrapper such as T5's layer)."""
    inner = list(module.modules())
    groups = next((g for m in inner if isinstance(g := getattr(m, "num_key_value_groups", 1),
                                                     int) and g > 1), None)
    if groups:
        return f"grouped-query attention ({groups} query heads per key/value head)"
    if any(hasattr(m, "has_relative_attention_bias") for m in inner):
        return "T5-style attention (a learned position bias per head, shared across layers)"
    if any(getattr(m, "is_cross_attention", False) for m in inner):
        return "cross-attention (q_attn) is not handled"
    return "an attention layout not known"


def _fused_layout(name: str, module: nn.Module) -> Attention | None:
    for projection, output, heads in FUSED_LAYOUTS:
        layers = getattr(module, projection, None), getattr(module, output, None)
        if all(isinstance(p, nn.Linear) or _is_conv1d(p) for p in layers) and isinstance(
                getattr(module, heads, None), int):
            if getattr(module, "is_cross_attention", False):
                raise LeantrainError(f"cannot prune the heads of {name}: cross-attention "
                                     "(q_attn) is not handled")
            return Attention(name, module, [layers[0]], heads, output=layers[1])
    return None


def _separate_projections(name: str, module: nn.Module) -> list[nn.Linear]:
    """The q, k, v Linear layers of an attention module with separate projections (none if
    it has another layout). The head count is the module's own attribute where it keeps one,
    else the q projection's width over the head width (transformers 5 modules keep only
    `head_dim`, and the config's)."""
    if _heads_attribute(module) is None and _head_width(module) is None:
        return []
    for names in (("query", "key", "value"), ("q_proj", "k_proj", "v_proj")):
        layers = [getattr(module, n, None) for n in names]
        if all(isinstance(p, nn.Linear) for p in layers):
            # grouped keys: not a layout known here (`refuse_unknown` says why, when pruning;
            # saving or quantizing such a model needs no head counts)
            return layers if len({p.out_features for p in layers}) == 1 else []
    return []


def heads_of(attention: Attention) -> int:
    if attention.heads_attribute is not None:
        return getattr(attention.module, attention.heads_attribute)
    return attention.projections[0].out_features // _head_width(attention.module)


def head_dim(attention: Attention) -> int:
    return attention.projections[0].out_features // (heads_of(attention) *
                                                     (3 if attention.fused else 1))


def num_heads(attentions: list[Attention]) -> dict[nn.Module, int]:
    """Torch-Pruning's `num_heads`: each head-producing projection and its head count."""
    return {p: heads_of(a) for a in attentions for p in a.projections}


def set_heads(attention: Attention, heads: int) -> None:
    """Bring the module's attributes in line with its (pruned) projections' widths."""
    module, width = attention.module, attention.projections[0].out_features
    names = {attention.heads_attribute, *HEAD_COUNTS} - {None}
    for name in names:  # (each count a module keeps: Whisper's cross-attention reads num_heads)
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, heads)
    if hasattr(module, "split_size"):  # GPT-2: q, k and v are split by width
        module.split_size = width // 3
        module.head_dim = module.split_size // heads
    if hasattr(module, "all_head_size"):  # BERT-style; q_proj-style keep a fixed head_dim
        module.all_head_size, module.attention_head_size = width, width // heads


def residual_width(model: nn.Module) -> int | None:
    """The residual stream's width: the config's `hidden_size`, else the first embedding's."""
    width = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(width, int):
        return width
    embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    return None if embedding is None else embedding.embedding_dim


def residual_writers(model: nn.Module, attentions: list[Attention]) -> list[nn.Module]:
    """The Linear and Conv2d layers (a ViT's patch embedding) whose outputs have the residual
    stream's width, except the head projections: not pruned at their outputs, so every block
    keeps its interface."""
    width = residual_width(model)
    if width is None:
        return []
    heads = {id(p) for a in attentions for p in a.projections}
    return [m for m in model.modules() if id(m) not in heads and (
        isinstance(m, nn.Linear) and m.out_features == width
        or isinstance(m, nn.Conv2d) and m.out_channels == width)]


def heads_to_remove(heads: int, ratio: float) -> int:
    """As Torch-Pruning counts them for one attention module: ceil(ratio x heads)."""
    return math.ceil(ratio * heads)


def _head_rows(attention: Attention, head: int) -> torch.Tensor:
    """The output rows of the fused q/k/v projection that belong to `head` (in q, k and v)."""
    width, dim = attention.projections[0].out_features // 3, head_dim(attention)
    return torch.cat([torch.arange(part * width + head * dim, part * width + (head + 1) * dim)
                      for part in range(3)])


def _head_columns(attention: Attention, head: int) -> torch.Tensor:
    """The input columns of the output projection that take `head`'s values."""
    dim = head_dim(attention)
    return torch.arange(head * dim, (head + 1) * dim)


def _score(weight: torch.Tensor, taylor: bool, dim: int) -> torch.Tensor:
    """Magnitude (squared weights) or Taylor (|weight x gradient|) importance, summed along
    `dim`: per output row with dim=1, per input column with dim=0."""
    value = (weight * weight.grad).abs() if taylor and weight.grad is not None else weight ** 2
    return value.detach().sum(dim=dim)


def head_importance(attention: Attention, taylor: bool = False) -> torch.Tensor:
    """One score per head: its q/k/v rows of the fused projection and its input columns of
    the output projection."""
    rows = _score(attention.projections[0].weight, taylor, dim=1)
    columns = _score(attention.output.weight, taylor, dim=0)
    return torch.stack([rows[_head_rows(attention, h)].sum()
                        + columns[_head_columns(attention, h)].sum()
                        for h in range(heads_of(attention))])


def prune_fused_heads(attention: Attention, ratio: float, taylor: bool = False) -> int:
    """Remove the least important ceil(ratio x heads) heads of a fused q/k/v attention;
    returns the heads left."""
    import torch_pruning as tp

    heads = heads_of(attention)
    removed = heads_to_remove(heads, ratio)
    if removed >= heads:
        raise LeantrainError(f"pruning {ratio:.0%} removed every head of {attention.name}; "
                             "lower the ratio")
    if removed == 0:
        return heads
    weakest = torch.topk(head_importance(attention, taylor), removed, largest=False).indices
    rows = torch.cat([_head_rows(attention, int(h)) for h in weakest]).tolist()
    columns = torch.cat([_head_columns(attention, int(h)) for h in weakest]).tolist()
    tp.prune_linear_out_channels(attention.projections[0], rows)
    tp.prune_linear_in_channels(attention.output, columns)
    set_heads(attention, heads - removed)
    return heads - removed
