"""Tensor parallelism as a plan: which layers of a model are split across the ranks of the job
mesh's `tp` dimension, applied with torch's DTensor `parallelize_module`.

Megatron's split: a column-parallel projection (each rank computes some of the output
features: attention heads, MLP channels) feeds a row-parallel one (each rank holds the matching
input features and the partial outputs are summed, one all-reduce per pair), so a block's
weights and most of its activations are split `tp` ways. Everything else (norms, positions) is
replicated, and every rank of a tensor-parallel group sees the same batch.

The plan comes from the user's hook (`plan.parallel.tp_plan = "module:fn"`: `fn(model, mesh)`
splits the model over the `tp` mesh itself, with torch's `parallelize_module`), else from the
model: a Hugging Face model's own `_tp_plan` (Llama, Mistral, Qwen2, Gemma and the other
families that declare one; grouped-query attention needs the key/value heads to divide by
`tp`), else one derived from a BERT-style encoder's structure (`BERT_STYLE`). A model with
none is refused in one line naming it. Checked before any process trains: each split layer's
features, and the attention heads, must divide by `tp`.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from torch import nn

from .errors import LeantrainError


def _styles() -> dict[str, Any]:
    """Hugging Face's style names -> torch's parallel styles."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {
        "colwise": ColwiseParallel(),
        "rowwise": RowwiseParallel(),
        # the head: logits gathered, so the loss sees every class
        "colwise_gather_output": ColwiseParallel(output_layouts=Replicate()),
        "colwise_rep": ColwiseParallel(output_layouts=Replicate()),
        # the embedding: the vocabulary split, the looked-up vectors summed
        "embedding_rowwise": RowwiseParallel(input_layouts=Replicate()),
        "rowwise_rep": RowwiseParallel(input_layouts=Replicate()),
    }


STYLE_NAMES = ("colwise", "rowwise", "colwise_gather_output", "colwise_rep",
               "embedding_rowwise", "rowwise_rep")


# BERT-style encoders (BERT, RoBERTa, ELECTRA, XLM-R...): Hugging Face declares no plan for
# them, but their attention reshapes to (..., -1, head size), so each rank's share of the
# heads computes as the whole does. Derived from the modules' names, first match wins.
BERT_STYLE = {"*.attention.self.query": "colwise", "*.attention.self.key": "colwise",
              "*.attention.self.value": "colwise", "*.attention.output.dense": "rowwise",
              "*.intermediate.dense": "colwise", "*.output.dense": "rowwise"}


def hf_plan(model: nn.Module) -> dict[str, str] | None:
    """The model's plan: module name pattern -> style. Hugging Face's `_tp_plan` (which the
    causal-LM classes extend with their head), else one derived from the structure of a
    BERT-style encoder; None when there is neither."""
    plan = getattr(model, "_tp_plan", None)
    if plan:
        return dict(plan)
    config = getattr(model, "config", None)
    base = getattr(config, "base_model_tp_plan", None)
    if base:
        prefix = getattr(model, "base_model_prefix", "")
        inner = prefix and getattr(model, prefix, None) is not None
        return {(f"{prefix}.{k}" if inner else k): v for k, v in base.items()}
    names = [name for name, _ in model.named_modules()]
    if any(fnmatch.fnmatchcase(name, "*.attention.self.query") for name in names):
        return dict(BERT_STYLE)
    return None


def _tied(model: nn.Module) -> set[str]:
    """Names of modules whose weight is shared with another module (a tied head and
    embedding): split apart they would no longer be one tensor, so they stay whole."""
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            if id(weight) in seen:
                tied |= {name, seen[id(weight)]}
            seen.setdefault(id(weight), name)
    return tied


def layer_plan(model: nn.Module, tp: int) -> dict[str, str]:
    """module name -> style for every module the model's plan splits, checked for `tp`: one
    line naming what cannot be split (no plan, a style torch has no equivalent for, features
    or heads that do not divide by `tp`)."""
    patterns = hf_plan(model)
    name = type(model).__name__
    if not patterns:
        raise LeantrainError(
            f"plan.parallel.tp={tp}: {name} declares no tensor-parallel plan (a Hugging Face "
            "model's _tp_plan: Llama, Mistral, Qwen2 and other families have one); give your "
            "own (plan.parallel.tp_plan=module:fn, fn(model, mesh)), or train it with FSDP2 "
            "alone (plan.parallel.tp=1, plan.distributed=fsdp)")
    _check_heads(model, tp)
    tied = _tied(model)
    found: dict[str, str] = {}
    for module_name, module in model.named_modules():
        style = next((s for p, s in patterns.items() if fnmatch.fnmatchcase(module_name, p)),
                     None)
        if style is None or module_name in tied:
            continue
        if style not in STYLE_NAMES:
            raise LeantrainError(f"plan.parallel.tp={tp}: {name}'s plan splits {module_name} "
                                 f"as {style!r}, which leantrain does not apply (it applies "
                                 f"{', '.join(STYLE_NAMES)})")
        _check_divisible(module_name, module, style, tp)
        found[module_name] = style
    if not found:
        raise LeantrainError(f"plan.parallel.tp={tp}: {name}'s tensor-parallel plan matches "
                             "none of its modules")
    return found


def _check_heads(model: nn.Module, tp: int) -> None:
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    if isinstance(heads, int) and (heads % tp or kv % tp):
        grouped = f" and {kv} key/value heads (grouped-query)" if kv != heads else ""
        raise LeantrainError(f"plan.parallel.tp={tp}: the model's {heads} attention heads"
                             f"{grouped} must divide by tp: each rank computes whole heads")


def _check_divisible(module_name: str, module: nn.Module, style: str, tp: int) -> None:
    if isinstance(module, nn.Embedding):
        size, what = module.num_embeddings, "vocabulary entries"
    elif isinstance(module, nn.Linear):
        size, what = (module.out_features, "output features") if style.startswith("colwise") \
            else (module.in_features, "input features")
    else:
        raise LeantrainError(f"plan.parallel.tp={tp}: {module_name} is a "
                             f"{type(module).__name__}; the plan may split Linear and Embedding "
                             "layers only")
    if size % tp:
        raise LeantrainError(f"plan.parallel.tp={tp}: {module_name}'s {size} {what} do not "
                             "divide by tp")


def split_share(model: nn.Module, tp: int) -> float:
    """The share of the model's parameter bytes in the layers its plan splits (checked for
    `tp` as a launch would check it)."""
    modules = dict(model.named_modules())
    split = {id(p) for name in layer_plan(model, tp) for p in modules[name].parameters()}
    sizes = {id(p): p.numel() * p.element_size() for p in model.parameters()}
    return sum(sizes[i] for i in split if i in sizes) / max(sum(sizes.values()), 1)


def apply(model: nn.Module, mesh, plan: dict[str, str], hook: str | None = None) -> None:
    """Split the planned layers across the `tp` mesh dimension, in place (their parameters
    become DTensors: build the optimizer afterwards); with a `hook` ("module:fn"), the user's
    function splits them."""
    if hook is not None:
        from .imports import import_object, user_code

        split = import_object(hook, "plan.parallel.tp_plan")
        with user_code(f"plan.parallel.tp_plan {hook}"):
            split(model, mesh)
        return
    from torch.distributed.tensor.parallel import parallelize_module

    styles = _styles()
    parallelize_module(model, mesh, {name: styles[style] for name, style in plan.items()})
