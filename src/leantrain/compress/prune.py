"""Pruning: unstructured masks (no speed-up) and structured channel removal (a smaller model).

Unstructured magnitude pruning (torch.nn.utils.prune) zeroes the smallest weights. Dense
kernels still multiply the zeros, so it saves no time and, while masked, stores each weight
twice (`weight_orig` and `weight_mask`); `finalize` folds the masks back into plain weights.
It is here for sparsity studies and as the first half of a sparse-kernel pipeline.

Structured pruning removes whole channels, with Torch-Pruning's dependency graph keeping
coupled layers consistent (a conv's output channels, the BatchNorm after it, the next
layer's input channels). The result is an ordinary, smaller dense model: fewer multiply-adds
and lower latency on any hardware. Its state_dict no longer fits the original class at the
original width; `save_pruned` / `load_pruned` store and restore the pruned shapes,
weights-only.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from ..checkpoint import atomic_save, load_checkpoint
from ..errors import LeantrainError, one_line
from . import attention

SCHEDULES = ("one-shot", "iterative", "gradual")
IMPORTANCES = ("magnitude", "taylor")
PRUNABLE = (nn.Conv2d, nn.Linear)


def check_ratio(ratio: float) -> None:
    if not 0 < ratio < 1:
        raise LeantrainError(f"pruning ratio must be in (0, 1), got {ratio}")


def prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PRUNABLE)]


def output_layer(model: nn.Module) -> nn.Module:
    """The last Conv2d/Linear: it produces the classes, so its outputs are never pruned."""
    layers = prunable(model)
    if not layers:
        raise LeantrainError("nothing to prune: the model has no Conv2d or Linear layer")
    return layers[-1][1]


# ------------------------------------------------------------------ unstructured


def schedule_amounts(amount: float, schedule: str, steps: int) -> list[float]:
    """Cumulative sparsity after each step.

    one-shot: all at once. iterative: the same fraction of what is left at every step.
    gradual: Zhu & Gupta's cubic ramp, s_t = s·(1 − (1 − t/n)³), fast early, slow late.
    """
    check_ratio(amount)
    if schedule not in SCHEDULES:
        raise LeantrainError(f"schedule {schedule!r}: allowed {', '.join(SCHEDULES)}")
    if schedule == "one-shot":
        return [amount]
    if steps < 1:
        raise LeantrainError(f"schedule steps must be >= 1, got {steps}")
    if schedule == "iterative":
        keep = (1 - amount) ** (1 / steps)
        return [1 - keep ** (t + 1) for t in range(steps)]
    return [amount * (1 - (1 - (t + 1) / steps) ** 3) for t in range(steps)]


def prune_unstructured(model: nn.Module, amount: float, scope: str = "layer",
                       schedule: str = "one-shot", steps: int = 3,
                       finetune: Callable[[nn.Module, int], Any] | None = None) -> list[float]:
    """Mask the smallest-magnitude weights of every Conv2d/Linear (`scope` "layer": the same
    fraction in each; "global": one threshold across all), following `schedule`, calling
    `finetune(model, step)` after every step. Returns the cumulative sparsity per step.
    Leaves the masks on (call `finalize` to make the weights plain)."""
    targets = [(m, "weight") for _, m in prunable(model)]
    if not targets:
        raise LeantrainError("nothing to prune: the model has no Conv2d or Linear layer")
    if scope not in ("layer", "global"):
        raise LeantrainError(f"scope {scope!r}: allowed layer, global")
    done = 0.0
    for step, target in enumerate(schedule_amounts(amount, schedule, steps)):
        fraction = (target - done) / (1 - done)  # torch prunes a fraction of what is left
        if scope == "global":
            torch_prune.global_unstructured(targets, torch_prune.L1Unstructured,
                                            amount=fraction)
        else:
            for module, name in targets:
                torch_prune.l1_unstructured(module, name, amount=fraction)
        done = target
        if finetune is not None:
            finetune(model, step)
    return schedule_amounts(amount, schedule, steps)


def finalize(model: nn.Module) -> nn.Module:
    """Fold every pruning mask into its weight: no `_orig`/`_mask` entries remain."""
    for _, module in prunable(model):
        if torch_prune.is_pruned(module):
            for hook in list(module._forward_pre_hooks.values()):
                if isinstance(hook, torch_prune.BasePruningMethod):
                    torch_prune.remove(module, hook._tensor_name)
    return model


def sparsity(model: nn.Module) -> float:
    """Share of exactly-zero weights over all Conv2d/Linear weights."""
    weights = [m.weight for _, m in prunable(model)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


# ------------------------------------------------------------------ structured


def _importance(name: str):
    import torch_pruning as tp

    if name == "magnitude":
        return tp.importance.MagnitudeImportance(p=2)
    if name == "taylor":
        return tp.importance.TaylorImportance()
    raise LeantrainError(f"importance {name!r}: allowed {', '.join(IMPORTANCES)}")


def check_structured(model: nn.Module) -> None:
    """Refuse, before any work, what `prune_channels` would refuse before tracing (adapters,
    experts, an attention layout it cannot keep consistent); checked on a copy, the model
    untouched."""
    refuse_unprunable(model)
    probe = copy.deepcopy(model)
    attention.conv1d_to_linear(probe)  # (as prune_channels sees GPT-2's Conv1D)
    attention.refuse_unknown(probe, attention.find(probe))


def refuse_unprunable(model: nn.Module) -> None:
    """Layers whose channels Torch-Pruning cannot remove consistently, refused in one line
    that says what they are: a LoRA adapter wrapped around a layer (pruning the base would
    leave its adapter's shapes behind), and mixture-of-experts weights held as one 3-D tensor
    per layer (transformers 5 runs the experts by grouped matmuls, which the dependency graph
    does not know)."""
    for name, module in model.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
            raise LeantrainError(
                f"cannot prune {name}: a LoRA adapter (PEFT) wraps it, and pruning its base "
                "would leave the adapter's shapes behind; merge the adapters first "
                "(model.merge_and_unload()) and prune the merged model")
        experts = [p for p in module.parameters(recurse=False) if p.dim() == 3]
        if experts and ("expert" in type(module).__name__.lower()
                        or hasattr(module, "num_experts")):  # (a ViT's class token is 3-D)
            raise LeantrainError(
                f"cannot prune {name} ({type(module).__name__}): mixture-of-experts weights "
                f"held as one 3-D tensor ({experts[0].shape[0]} experts) and run by grouped "
                "matmuls; structured pruning removes channels of Linear and Conv2d layers only")


def prune_channels(model: nn.Module, example_inputs: torch.Tensor, ratio: float,
                   importance: str = "magnitude", steps: int = 1,
                   finetune: Callable[[nn.Module, int], Any] | None = None,
                   gradient_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
                   | None = None) -> nn.Module:
    """Remove `ratio` of the channels of every prunable layer except the output layer, in
    `steps` equal steps, calling `finetune(model, step)` after each.

    In a transformer (`attention.find`), ceil(ratio x heads) whole heads of every attention
    module go in the first step, and `ratio` of each MLP's channels; the residual stream
    keeps its width.

    Taylor importance scores channels by |weight × gradient|: `gradient_batches()` yields the
    (inputs, labels) whose cross-entropy gradient it uses at each step.
    """
    import torch_pruning as tp

    check_ratio(ratio)
    if steps < 1:
        raise LeantrainError(f"pruning steps must be >= 1, got {steps}")
    keep = output_layer(model)
    attention.conv1d_to_linear(model)  # GPT-2's Conv1D: a Linear the graph understands
    if len(prunable(model)) < 2:
        raise LeantrainError("nothing to prune: the only Conv2d/Linear layer is the output "
                             "layer, whose outputs are the classes")
    if importance == "taylor" and gradient_batches is None:
        raise LeantrainError("taylor importance needs batches to take gradients on")
    refuse_unprunable(model)
    found = attention.find(model)
    attention.refuse_unknown(model, found)  # before tracing: refused in seconds, no hang
    heads = [a for a in found if not a.fused]  # Torch-Pruning removes these heads itself
    fused = [a for a in found if a.fused]
    if fused:  # removed here, before tracing: the graph cannot map through the q/k/v split
        if importance == "taylor":
            _gradients(model, gradient_batches)
        for a in fused:
            attention.prune_fused_heads(a, ratio, taylor=importance == "taylor")
        model.zero_grad(set_to_none=True)
    extra: dict[str, Any] = {}
    if heads:  # a transformer: whole heads and MLP channels go, the residual stream stays
        extra = {"num_heads": attention.num_heads(heads), "prune_num_heads": True,
                 "prune_head_dims": False, "head_pruning_ratio": ratio}
    outputs = [keep, *(h for h in output_heads(model, example_inputs) if h is not keep)]
    ignored = [*outputs, *attention.residual_writers(model, found),
               *(a.projections[0] for a in fused)] if found else outputs
    config = getattr(model, "config", None)
    cached = getattr(config, "use_cache", None)
    if cached:  # a KV cache concatenates keys of unknown width: the graph cannot be traced
        config.use_cache = False
    # heads are removed in one step: over several, Torch-Pruning rounds each step's share of
    # heads up and can remove all of a small model's (2 heads, 50% in 2 steps: none left);
    # the fine-tuning still runs after each of the `steps`
    pruning_steps = 1 if heads else steps
    try:
        with warnings.catch_warnings():
            # a ViT's class token and position table are bare Parameters on the residual
            # stream, which is never pruned here: Torch-Pruning's warning about them misleads
            warnings.filterwarnings("ignore", "Unwrapped parameters detected")
            pruner = tp.pruner.MetaPruner(
                model, example_inputs, importance=_importance(importance),
                pruning_ratio=ratio, iterative_steps=pruning_steps, ignored_layers=ignored,
                output_transform=_logits, **extra)
    except Exception as exc:  # the dependency graph could not be traced: a pruning failure
        raise LeantrainError(f"pruning could not trace the model ({one_line(exc)})") from exc
    finally:
        if cached:
            config.use_cache = cached
    interface = _interface(model) if found else None
    for step in range(steps):
        if step < pruning_steps:
            if importance == "taylor":
                _gradients(model, gradient_batches)
            pruner.step()
            if interface is not None:
                _check_interface(model, interface)
            for a in heads:
                left = pruner.num_heads[a.projections[0]]
                if left < 1:
                    raise LeantrainError(f"pruning {ratio:.0%} removed every head of {a.name}; "
                                         "lower the ratio")
                attention.set_heads(a, left)
        model.zero_grad(set_to_none=True)
        if finetune is not None:
            finetune(model, step)
    return model


def _interface(model: nn.Module) -> tuple[dict[str, tuple], list[list[str]]]:
    """What pruning a transformer must leave as it was: the width of every embedding and
    normalization layer (the residual stream), and which parameters are one tensor (tied
    weights, such as an LM head sharing the token embedding)."""
    widths = {name: tuple(m.weight.shape) for name, m in model.named_modules()
              if (isinstance(m, nn.Embedding) or type(m).__name__.endswith("Norm"))
              and isinstance(getattr(m, "weight", None), torch.Tensor)}
    shared: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(name)
    return widths, [names for names in shared.values() if len(names) > 1]


def _check_interface(model: nn.Module, interface: tuple[dict[str, tuple], list[list[str]]]
                     ) -> None:
    """Refuse, naming the layer, a pruning that cut the residual stream or untied weights."""
    widths, ties = interface
    modules = dict(model.named_modules())
    for name, shape in widths.items():
        now = tuple(modules[name].weight.shape)
        if now != shape:
            raise LeantrainError(f"pruning changed the residual stream at {name} ({shape} -> "
                                 f"{now}): refused, nothing written")
    for names in ties:
        if len({id(model.get_parameter(n)) for n in names}) > 1:
            raise LeantrainError(f"pruning untied {' and '.join(names)}: refused, nothing "
                                 "written")


def _gradients(model: nn.Module, gradient_batches) -> None:
    """Fresh cross-entropy gradients for Taylor importance."""
    model.zero_grad()
    for x, y in gradient_batches():
        nn.functional.cross_entropy(model(x), y).backward()


def _logits(out: Any) -> Any:
    """What the dependency graph is traced from: a ModelOutput's logits, else every tensor
    the model returned (a custom model's loss terms too, so a head only they read is in the
    graph), a 0-d one as a 1x1 (the graph counts an output's channels along dim 1)."""
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, torch.Tensor):
        return out.reshape(1, 1) if out.dim() == 0 else out
    if isinstance(out, Mapping):
        out = list(out.values())
    return [_logits(o) for o in out] if isinstance(out, (tuple, list)) else out


def output_heads(model: nn.Module, example_inputs: Any) -> list[nn.Module]:
    """The prunable layers that the model's outputs read first, found by walking each
    output's autograd graph back: their outputs are what the model returns (the classes, a
    regression value, an auxiliary head that only a loss term reads), so their width stays."""
    made: dict[Any, nn.Module] = {}

    def record(module: nn.Module, _inputs: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            made.setdefault(out.grad_fn, module)

    hooks = [m.register_forward_hook(record) for _, m in prunable(model)]
    try:
        with torch.enable_grad():
            out = model(**example_inputs) if isinstance(example_inputs, Mapping) \
                else model(example_inputs)
    finally:
        for hook in hooks:
            hook.remove()
    found, seen = [], set()
    stack = [t.grad_fn for t in _flat(_logits(out)) if t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        if fn in made:
            if made[fn] not in found:
                found.append(made[fn])
            continue
        stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
    return found


def _flat(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)] if isinstance(out, (tuple, list)) else []


def channel_counts(model: nn.Module) -> dict[str, int]:
    """Output channels (Conv2d) or features (Linear) per prunable layer."""
    return {n: m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            for n, m in prunable(model)}


# ------------------------------------------------------------------ saving a pruned model


def save_pruned(model: nn.Module, path: str | Path) -> None:
    """A plain state_dict (tensors only: loadable weights-only) whose shapes are the pruned
    ones, with each attention module's head count, and a mark when Conv1D became Linear."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for found in attention.find(model):
        state[f"{found.name}.{attention.HEADS_KEY}"] = torch.tensor(attention.heads_of(found))
    if getattr(model, "_leantrain_conv1d_as_linear", False):
        state[attention.LINEAR_KEY] = torch.tensor(1)
    atomic_save(state, path)


def _resize(module: nn.Module, name: str, shape: torch.Size) -> None:
    current = getattr(module, name)
    fresh = torch.empty(shape, dtype=current.dtype, device=current.device)
    if isinstance(current, nn.Parameter):
        setattr(module, name, nn.Parameter(fresh, requires_grad=current.requires_grad))
    else:
        module._buffers[name] = fresh


def _fix_attributes(module: nn.Module) -> None:
    """Make a resized layer's size attributes agree with its new weight."""
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Conv2d) and weight is not None:
        depthwise = module.groups == module.in_channels and module.groups > 1
        module.out_channels = weight.shape[0]
        module.in_channels = weight.shape[0] if depthwise else weight.shape[1] * module.groups
        if depthwise:
            module.groups = weight.shape[0]
    elif isinstance(module, nn.Linear) and weight is not None:
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.num_features = module.running_mean.shape[0]


def load_pruned(model: nn.Module, path: str | Path) -> nn.Module:
    """Shrink a freshly built (unpruned) model to the saved shapes, then load the weights."""
    state = load_checkpoint(path)
    if state.pop(attention.LINEAR_KEY, None) is not None:
        attention.conv1d_to_linear(model)
    suffix = f".{attention.HEADS_KEY}"
    heads = {key[:-len(suffix)]: int(state.pop(key)) for key in list(state)
             if key.endswith(suffix)}
    modules = dict(model.named_modules())
    for key, tensor in state.items():
        owner, _, name = key.rpartition(".")
        module = modules.get(owner)
        if module is None or not hasattr(module, name):
            raise LeantrainError(f"{path}: entry {key!r} has no place in this model; was it "
                                 "pruned from another architecture?")
        if getattr(module, name) is not None and getattr(module, name).shape != tensor.shape:
            _resize(module, name, tensor.shape)
    for module in model.modules():
        _fix_attributes(module)
    for found in attention.find(model):
        if found.name in heads:
            attention.set_heads(found, heads[found.name])
    # torchao's quantized weights are tensor subclasses: they replace the float parameters
    # (assigned) rather than being copied into them, which torch cannot do
    quantized = any(type(t) not in (torch.Tensor, nn.Parameter) for t in state.values())
    try:
        model.load_state_dict(state, assign=quantized)
    except RuntimeError as exc:
        raise LeantrainError(f"{path} does not fit this model: {exc}") from exc
    return model
