"""Gradient clipping by global norm.

Rescales all gradients when their joint L2 norm exceeds `max_norm`, which keeps one bad batch
from throwing the weights far off (common with high learning rates, transformers, fp16).
Changes the update only when the norm is above the threshold; costs one reduction per step.
With a GradScaler the gradients are unscaled first, or the threshold would be meaningless.
"""

from __future__ import annotations

import torch
from torch import nn

NAME = "clip_norm"
LOSSLESS = False
VARIANTS = ()
BENCH_NOTE = "a stability aid that costs a reduction per step; not a speed-up to rank"


def clip_gradients(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    max_norm: float,
    scaler: torch.amp.GradScaler | None = None,
    stages=None,
) -> torch.Tensor:
    """Clip in place; returns the pre-clip total norm as a device tensor (no host sync).
    `stages`: the pipeline (`pipeline.Pipeline`) whose other processes hold the rest of the
    model."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    parameters = [p for p in model.parameters() if p.grad is not None]
    if stages is not None:
        return _clip_across_stages(parameters, max_norm, stages)
    groups = _by_mesh(parameters)
    if len(groups) <= 1:
        return nn.utils.clip_grad_norm_(parameters, max_norm)
    return _clip_across_meshes(groups, max_norm)


def _clip_across_stages(parameters: list[nn.Parameter], max_norm: float, stages
                        ) -> torch.Tensor:
    """Pipeline stages hold disjoint parameters: their squared norms summed over the stages'
    processes (a tied embedding and head, held by two stages, counted once), then every
    gradient scaled by the one coefficient, as one process would."""
    import torch.distributed as dist

    counted = [p for p in parameters if id(p) not in stages.counted_elsewhere]
    local = _joined_norm(_by_mesh(counted)) if counted else \
        torch.zeros((), device=parameters[0].grad.device if parameters else "cpu")
    squared = local.float() ** 2
    dist.all_reduce(squared, group=stages.group)
    total = squared.sqrt()
    _scale(_by_mesh(parameters), total, max_norm)
    return total


def _by_mesh(parameters: list[nn.Parameter]) -> dict[object, list[torch.Tensor]]:
    """Gradients grouped by the device mesh they are sharded on (None: plain tensors)."""
    groups: dict[object, list[torch.Tensor]] = {}
    for p in parameters:
        groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p.grad)
    return groups


def _clip_across_meshes(groups: dict, max_norm: float) -> torch.Tensor:
    """A tensor-parallel model under FSDP2 holds its split layers on the 2-D (data, tensor)
    mesh and the rest (norms, a tied embedding) on the data mesh, and torch cannot stack norms
    of two meshes: each group's norm is reduced over its own mesh (a replicated weight counted
    once), the groups' norms joined, and every gradient scaled by the one coefficient."""
    total = _joined_norm(groups)
    _scale(groups, total, max_norm)
    return total


def _joined_norm(groups: dict) -> torch.Tensor:
    """The norm of gradients grouped by mesh (`_by_mesh`): each group's reduced over its
    own mesh, then joined (a pipeline stage of a tensor-parallel model holds both kinds)."""
    norms = [_whole(nn.utils.get_total_norm(grads)) for grads in groups.values()]
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


def _whole(norm: torch.Tensor) -> torch.Tensor:
    """A norm over gradients sharded on a mesh (a DTensor), reduced over it."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _scale(groups: dict, total: torch.Tensor, max_norm: float) -> None:
    """Every gradient (grouped by mesh: `_by_mesh`) by torch's clip_grad_norm_ coefficient
    for the total norm."""
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for mesh, grads in groups.items():
        factor = coef if mesh is None else _replicated(coef, mesh)
        for grad in grads:
            grad.mul_(factor)


def _replicated(value: torch.Tensor, mesh) -> torch.Tensor:
    """`value` (the same on every rank) as a DTensor of `mesh`, which its gradients can
    multiply by."""
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(value, mesh, [Replicate()] * mesh.ndim, run_check=False)
