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

Models whose q, k and v are one projection (GPT-2's `c_attn`, the text-gpt recipe's `qkv`;
the layouts `compress.attention` knows) get a plan derived from that layout: a plain column
split would give rank 0 all of q and half of k, so the fused projection is split in three
parts, each by columns (DTensor's strided shard: rank r holds [q_r, k_r, v_r], and
checkpoints still hold the whole tensor in the model's order), the module's head count is
divided by `tp`, and each block's MLP (a layer widening the residual stream, one narrowing
it back) is split by columns then rows. GPT-2's `Conv1D` (a Linear with its weight stored
(in, out)) is split on the matching dimension of its weight.
"""

from __future__ import annotations

import contextlib
import fnmatch
from typing import Any

from torch import nn

from .errors import LeantrainError


def _styles(sequence: bool = False) -> dict[str, Any]:
    """Hugging Face's style names (and "colwise_fused") -> torch's parallel styles; with
    `sequence`, their sequence-parallel forms (below)."""
    from torch.distributed.tensor import Replicate, Shard

    columns, rows = _column_and_row_styles()
    if sequence:
        # the residual stream between split layers stays a DTensor split over the sequence:
        # a column-parallel layer gathers it, a row-parallel one reduce-scatters into it, the
        # embedding's sum lands in it, and the head's logits stay split over the vocabulary
        # for loss_parallel
        stream = {"input_layouts": Shard(1)}
        into_stream = {"output_layouts": Shard(1), "use_local_output": False}
        return {
            "colwise": columns(**stream),
            "colwise_fused": columns(parts=3, **stream),
            "rowwise": rows(**into_stream),
            "embedding_rowwise": rows(input_layouts=Replicate(), **into_stream),
            "colwise_gather_output": columns(**stream, output_layouts=Shard(-1),
                                             use_local_output=False),
        }
    return {
        "colwise": columns(),
        "rowwise": rows(),
        # q, k and v in one projection: each part split by columns
        "colwise_fused": columns(parts=3),
        # the head: logits gathered, so the loss sees every class
        "colwise_gather_output": columns(output_layouts=Replicate()),
        "colwise_rep": columns(output_layouts=Replicate()),
        # the embedding: the vocabulary split, the looked-up vectors summed
        "embedding_rowwise": rows(input_layouts=Replicate()),
        "rowwise_rep": rows(input_layouts=Replicate()),
    }


STYLE_NAMES = ("colwise", "rowwise", "colwise_fused", "colwise_gather_output", "colwise_rep",
               "embedding_rowwise", "rowwise_rep")


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _column_and_row_styles():
    """torch's column and row styles, taught Hugging Face's Conv1D (its weight is (in, out):
    columns are its weight's dimension 1) and a fused projection's parts (`parts` > 1)."""
    from functools import partial

    from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    from torch.distributed.tensor.placement_types import _StridedShard

    def shard(placements, src_data_rank, name, module, mesh):
        for key, param in list(module.named_parameters(recurse=False)):
            module.register_parameter(key, nn.Parameter(
                distribute_tensor(param, mesh, [placements[key]], src_data_rank=src_data_rank),
                requires_grad=param.requires_grad))

    class Columns(ColwiseParallel):
        def __init__(self, parts: int = 1, **kwargs):
            super().__init__(**kwargs)
            self.parts = parts

        def _apply(self, module, mesh):
            if self.parts == 1 and not _is_conv1d(module):
                return super()._apply(module, mesh)

            def split(dim):  # rank r holds its share of each part, side by side
                return Shard(dim) if self.parts == 1 else \
                    _StridedShard(dim, split_factor=self.parts)

            weight = split(1 if _is_conv1d(module) else 0)
            return distribute_module(
                module, mesh, partial(shard, {"weight": weight, "bias": split(0)},
                                      self.src_data_rank),
                partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                self._local_parts if self.parts > 1 else
                partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))

        @staticmethod
        def _local_parts(module, outputs, mesh):  # [q_r, k_r, v_r]: the rank's own heads
            return outputs.to_local()

    class Rows(RowwiseParallel):
        def _apply(self, module, mesh):
            if not _is_conv1d(module):
                return super()._apply(module, mesh)
            return distribute_module(
                module, mesh, partial(shard, {"weight": Shard(0), "bias": Replicate()},
                                      self.src_data_rank),
                partial(self._prepare_input_fn, self.input_layouts, (Shard(-1),)),
                partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))

    return Columns, Rows


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
    return _fused_plan(model)


def _fused_plan(model: nn.Module) -> dict[str, str] | None:
    """The plan of a model whose attention fuses q, k and v in one projection (GPT-2, the
    text-gpt recipe): that projection split in its parts, the output projection by rows, and
    each block's MLP by columns then rows; None when the model has no fused attention."""
    from .compress import attention

    try:
        fused = [a for a in attention.find(model) if a.fused]
    except LeantrainError:  # (a layout compress cannot prune: none to split here either)
        return None
    if not fused:
        return None
    names = {id(m): name for name, m in model.named_modules()}
    plan = {}
    for found in fused:
        plan[names[id(found.projections[0])]] = "colwise_fused"
        plan[names[id(found.output)]] = "rowwise"
    inside = {id(m) for found in fused for m in found.module.modules()}
    width = attention.residual_width(model)
    for name, module in model.named_modules():
        if id(module) not in inside:
            plan.update({f"{name}.{child}" if name else child: style
                         for child, style in _mlp(module, width).items()})
    return plan


def _features(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a Linear or a Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if _is_conv1d(module):
        return tuple(module.weight.shape)
    return None


def _mlp(module: nn.Module, width: int | None) -> dict[str, str]:
    """A block's MLP: exactly two direct child layers, one widening the residual stream and
    one narrowing it back (child name -> style), else nothing."""
    layers = {name: _features(child) for name, child in module.named_children()}
    layers = {name: f for name, f in layers.items() if f is not None}
    if width is None or len(layers) != 2:
        return {}
    (a, fa), (b, fb) = layers.items()
    if fb[0] == width and fa[1] == width:  # declared narrowing first
        (a, fa), (b, fb) = (b, fb), (a, fa)
    if fa[0] == width == fb[1] and fa[1] == fb[0] != width:
        return {a: "colwise", b: "rowwise"}
    return {}


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
    _check_heads(model, patterns, tp)
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


def _check_heads(model: nn.Module, patterns: dict[str, str], tp: int) -> None:
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    if isinstance(heads, int) and (heads % tp or kv % tp):
        grouped = f" and {kv} key/value heads (grouped-query)" if kv != heads else ""
        raise LeantrainError(f"plan.parallel.tp={tp}: the model's {heads} attention heads"
                             f"{grouped} must divide by tp: each rank computes whole heads")
    modules = dict(model.named_modules())
    for name, style in patterns.items():
        if style == "colwise_fused":
            attention_name = name.rpartition(".")[0]
            count = _head_count(modules[attention_name])
            if count is not None and getattr(modules[attention_name], count) % tp:
                raise LeantrainError(
                    f"plan.parallel.tp={tp}: {attention_name}'s "
                    f"{getattr(modules[attention_name], count)} attention heads must divide "
                    "by tp: each rank computes whole heads")


def _head_count(module: nn.Module) -> str | None:
    """The attribute holding an attention module's head count."""
    from .compress.attention import FUSED_LAYOUTS, HEAD_COUNTS

    names = (*HEAD_COUNTS, *(heads for _, _, heads in FUSED_LAYOUTS))
    return next((n for n in names if isinstance(getattr(module, n, None), int)), None)


def _check_divisible(module_name: str, module: nn.Module, style: str, tp: int) -> None:
    features = _features(module)
    if isinstance(module, nn.Embedding):
        size, what = module.num_embeddings, "vocabulary entries"
    elif features is not None:
        size, what = (features[1], "output features") if style.startswith("colwise") \
            else (features[0], "input features")
        if style == "colwise_fused":
            size, what = size // 3, "output features in each of q, k and v"
    else:
        raise LeantrainError(f"plan.parallel.tp={tp}: {module_name} is a "
                             f"{type(module).__name__}; the plan may split Linear, Conv1D and "
                             "Embedding layers only")
    if size % tp:
        raise LeantrainError(f"plan.parallel.tp={tp}: {module_name}'s {size} {what} do not "
                             "divide by tp")


NORM_NAMES = ("Norm", "RMSNorm", "LayerNorm")  # how modules that normalise are named


def _stream_norms(model: nn.Module, plan: dict[str, str]) -> list[str]:
    """The norms on the residual stream: named as norms, and not beside a column-parallel
    layer (Qwen3's q_norm works on each rank's own heads, inside its attention)."""
    modules = dict(model.named_modules())
    columns = {name.rpartition(".")[0] for name, style in plan.items()
               if style.startswith("colwise")}
    return [name for name, module in modules.items()
            if type(module).__name__.endswith(NORM_NAMES) and name.rpartition(".")[0]
            not in columns]


def check_sequence_parallel(model: nn.Module, plan: dict[str, str], tp: int) -> None:
    """Sequence parallel keeps the residual stream split over the sequence from the
    embedding to the head: the plan must split both, and every other layer with parameters
    must be split by it or be a norm (a layer kept whole would meet a split stream)."""
    styles = set(plan.values())
    name = type(model).__name__
    for style, what in (("embedding_rowwise", "its embedding"),
                        ("colwise_gather_output", "its head")):
        if style not in styles:
            raise LeantrainError(
                f"plan.parallel.sp: sequence parallel runs from the embedding to the head "
                f"split over the ranks, and {name}'s plan does not split {what} (a tied "
                "head and embedding stay whole); train it with plan.parallel.sp=false")
    for module_name, module in model.named_modules():
        if module_name in plan or type(module).__name__.endswith(NORM_NAMES):
            continue  # (a norm inside attention, beside q and k, works on the rank's heads)
        if any(True for _ in module.parameters(recurse=False)):
            raise LeantrainError(
                f"plan.parallel.sp: {module_name} ({type(module).__name__}) is neither split "
                f"by {name}'s plan nor a norm, and sequence parallel would hand it a stream "
                "split over the sequence (mixture-of-experts routers and experts are kept "
                "whole); train it with plan.parallel.sp=false")


def check_sharding(plan: dict[str, str], tp: int, shards: int) -> None:
    """A fused projection's strided split cannot be sharded again by FSDP2 over `shards` > 1
    data-parallel ranks: torch (2.13) composes FSDP2 with even tensor-parallel splits only,
    and the gathered weight would come back in the wrong order."""
    fused = next((name for name, style in plan.items() if style == "colwise_fused"), None)
    if fused and shards > 1:
        raise LeantrainError(
            f"plan.parallel.tp={tp}: {fused} holds q, k and v in one projection, split in "
            f"three parts; FSDP2 cannot shard that split again over {shards} data-parallel "
            f"ranks (torch composes it with even splits only): run tp={tp} on {tp} "
            "processes, or train with FSDP2 alone (plan.parallel.tp=1)")


def split_share(model: nn.Module, tp: int) -> float:
    """The share of the model's parameter bytes in the layers its plan splits (checked for
    `tp` as a launch would check it)."""
    modules = dict(model.named_modules())
    split = {id(p) for name in layer_plan(model, tp) for p in modules[name].parameters()}
    sizes = {id(p): p.numel() * p.element_size() for p in model.parameters()}
    return sum(sizes[i] for i in split if i in sizes) / max(sum(sizes.values()), 1)


def apply(model: nn.Module, mesh, plan: dict[str, str], hook: str | None = None,
          sequence: bool = False) -> None:
    """Split the planned layers across the `tp` mesh dimension, in place (their parameters
    become DTensors: build the optimizer afterwards); with a `hook` ("module:fn"), the user's
    function splits them. `sequence`: sequence parallel (checked by
    `check_sequence_parallel`), the norms on the residual stream split over the sequence and
    the loss computed on logits split over the vocabulary (run it in `loss_parallel()`)."""
    if hook is not None:
        from .imports import import_object, user_code

        split = import_object(hook, "plan.parallel.tp_plan")
        with user_code(f"plan.parallel.tp_plan {hook}"):
            split(model, mesh)
        return
    from torch.distributed.tensor.parallel import parallelize_module

    styles = _styles(sequence)
    layers = {name: styles[style] for name, style in plan.items()}
    if sequence:
        from torch.distributed.tensor.parallel import SequenceParallel

        layers.update({name: SequenceParallel() for name in _stream_norms(model, plan)})
        model.register_forward_hook(_local_loss)
    parallelize_module(model, mesh, layers)
    modules = dict(model.named_modules())
    for name, style in plan.items():
        if style == "colwise_fused":  # the module reshapes by its head count: now its share
            _share_heads(modules[name.rpartition(".")[0]], mesh.size())


def _local_loss(module: nn.Module, args: Any, out: Any) -> Any:
    """The model's own loss as every rank's plain tensor (loss_parallel leaves it a
    replicated DTensor), so the run adds it up as any other; its backward still runs
    through the split logits. The logits stay split over the vocabulary (`tasks.tally` takes
    each rank's best class, then the best of those)."""
    loss = out.get("loss") if hasattr(out, "get") else None
    if loss is not None and hasattr(loss, "to_local"):
        out["loss"] = loss.to_local()
    return out


@contextlib.contextmanager
def loss_parallel(enabled: bool):
    """torch's loss_parallel while a sequence-parallel run trains: cross-entropy on logits
    split over the vocabulary, forward and backward, without gathering them."""
    if not enabled:
        yield
        return
    from torch.distributed.tensor.parallel import loss_parallel as torch_loss_parallel

    with torch_loss_parallel():
        yield


def _share_heads(attention: nn.Module, tp: int) -> None:
    count = _head_count(attention)
    if count is not None:
        setattr(attention, count, getattr(attention, count) // tp)
    if isinstance(getattr(attention, "split_size", None), int):  # GPT-2 splits q, k, v by it
        attention.split_size //= tp
