"""Data parallel (DDP) and sharded (FSDP2) training on torch.distributed.

A process started by torchrun (or `leantrain launch`, which wraps it) finds RANK, LOCAL_RANK
and WORLD_SIZE in its environment; `DistContext.from_env` reads them and `setup` joins the
process group: NCCL on GPUs (one GPU per local rank), gloo on CPU. A plain process gets a
context of world size 1, and every function here is then a no-op, so the trainer has one code
path.

A run on several processes checkpoints in shards (`run.sharded`, torch.distributed.checkpoint);
one process writes a single file of full state. Either loads into the other's layout.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .errors import LeantrainError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    launched: bool = False  # started by torchrun (any world size, 1 included)
    # tensor and pipeline parallel: groups of `pp x tp` consecutive ranks share one batch
    tp: int = 1
    pp: int = 1
    mesh: Any = None  # the job's DeviceMesh (dp_replicate, dp_shard, pp, tp), when it has one
    data_group: Any = None  # the ranks that see different batches (None: the world)

    @property
    def active(self) -> bool:
        return self.launched

    @property
    def data_rank(self) -> int:
        """This rank's place among the ranks that see different batches."""
        return self.rank // (self.tp * self.pp)

    @property
    def data_world(self) -> int:
        return self.world_size // (self.tp * self.pp)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_env() -> DistContext:
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", "0"))
        except ValueError as exc:
            raise LeantrainError(f"torch.distributed environment is malformed: {exc}") from exc
        return DistContext(rank, local, world, "WORLD_SIZE" in os.environ)


def refuse_unlaunched_tasks(env: dict[str, str]) -> None:
    """A process a cluster started as one of several tasks, without torchrun, would train
    alone at world size 1 beside the others: refused, naming the way that works."""
    if "WORLD_SIZE" in env:
        return
    tasks = env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS")
    if tasks and tasks.isdigit() and int(tasks) > 1 and "SLURM_PROCID" in env:
        raise LeantrainError(
            f"this is task {env['SLURM_PROCID']} of {tasks} that srun started, without torchrun:"
            " each would train alone; run one launcher per node (srun --ntasks-per-node=1 "
            "leantrain launch --nproc GPUS_PER_NODE -- train ...), which reads SLURM's nodes")
    nodes = env.get("PET_NNODES", "1")
    if nodes not in ("1", "1:1"):
        raise LeantrainError(f"this pod is one of a PyTorchJob of {nodes} nodes (PET_NNODES) "
                             "but was not started by torchrun: run leantrain launch --nproc "
                             "GPUS_PER_NODE -- train ..., which reads the PET_* variables")


def die_with_launcher() -> None:
    """Linux: this rank gets SIGTERM when its launcher dies, even by SIGKILL.

    torchrun starts each rank in a session of its own, so without this a killed launcher
    leaves its ranks running (holding GPUs) until a collective times out.
    """
    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def rank_device(ctx: DistContext, device: torch.device) -> torch.device:
    """One GPU per local rank under torchrun; other devices unchanged."""
    if ctx.active and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def setup(ctx: DistContext, device: torch.device, timeout_s: float) -> None:
    """Join the process group (once) on this rank's device.

    `timeout_s` bounds every collective: a rank whose peer died fails after it, never hangs.
    """
    if not ctx.active:
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        store, rank, world = next(dist.rendezvous("env://", timeout=timedelta(seconds=timeout_s)))
        # a job torchrun restarted meets in the same store: the failed attempt's keys (gloo's
        # peer addresses) must not be read as this one's, so each attempt has its own prefix
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"leantrain/{attempt}", store),
                                rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The units FSDP2 shards one by one: a Hugging Face model's transformer blocks (the
    classes it names in `_no_split_modules`), else the entries of containers, or the top
    children."""
    named = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in named]
    if blocks:
        return blocks
    for child in model.children():
        if isinstance(child, (nn.ModuleList, nn.Sequential)) or (
                hasattr(child, "layers") and isinstance(child.layers, nn.ModuleList)):
            inner = child.layers if hasattr(child, "layers") else child
            # (every entry, a module listed twice too, which `_unshared` keeps with the root;
            # not iteration: a pipeline's list runs the stage's blocks only)
            entries = list(inner._modules.values())
            blocks += [m for m in entries if any(True for _ in m.parameters())]
        elif any(True for _ in child.parameters()):
            blocks.append(child)
    return blocks


def replica_groups(replicate: int, shard: int | str, strategy: str | None, world: int,
                   tp: int = 1) -> int:
    """How many hybrid-sharding replicas `plan.parallel` asks for (1: FSDP2 over every
    data-parallel process, or DDP), checked against the strategy, the tensor-parallel degree
    and the number of processes: dp_replicate x dp_shard x tp must be the world."""
    if tp > 1 and strategy != "fsdp":
        here = f"this run is {strategy}" if strategy else "this is one process"
        raise LeantrainError(f"plan.parallel.tp={tp} splits layers across processes: it needs "
                             f"leantrain launch and FSDP2 (plan.distributed=fsdp or auto; {here})")
    if world % tp:
        raise LeantrainError(f"plan.parallel.tp ({tp}) must divide the {world} processes")
    data = world // tp
    if replicate == 1 and (shard == "auto" or (strategy == "fsdp" and shard == data)):
        return 1
    if strategy != "fsdp":
        here = f"this run is {strategy}" if strategy else \
            "this is one process: pass --set plan.parallel.dp_replicate=1"
        raise LeantrainError("plan.parallel.dp_replicate and dp_shard lay out FSDP2's shards "
                             f"under leantrain launch with plan.distributed=fsdp ({here})")
    shards = data // replicate
    if data % replicate or shard not in ("auto", shards):
        tensor = f" x tp ({tp})" if tp > 1 else ""
        raise LeantrainError(f"plan.parallel: dp_replicate ({replicate}) x dp_shard ({shard})"
                             f"{tensor} must equal the {world} processes")
    return replicate


def with_mesh(ctx: DistContext, device: torch.device, replicas: int, tp: int, pp: int = 1
              ) -> DistContext:
    """The context with the job's DeviceMesh, when the layout needs one (hybrid sharding,
    pipeline or tensor parallel): named dimensions dp_replicate (when > 1), dp_shard, pp and
    tp (when > 1), tp innermost, so a tensor-parallel group is consecutive ranks (one node).
    Sums of metrics then run over the data-parallel ranks only: a tensor-parallel group's
    ranks computed one batch's loss together and would count it `tp` times."""
    if not ctx.active or (replicas == 1 and tp == 1 and pp == 1):
        return ctx
    from dataclasses import replace

    from torch.distributed.device_mesh import init_device_mesh

    shape = {"dp_replicate": replicas, "dp_shard": ctx.world_size // replicas // tp // pp,
             "pp": pp, "tp": tp}
    names = tuple(n for n, size in shape.items() if size > 1 or n == "dp_shard")
    mesh = init_device_mesh(device.type, tuple(shape[n] for n in names), mesh_dim_names=names)
    group, shares = None, tp * pp
    if shares > 1:  # every rank creates every group (a collective), keeps its own
        groups = [dist.new_group(list(range(t, ctx.world_size, shares))) for t in range(shares)]
        group = groups[ctx.rank % shares]
    return replace(ctx, tp=tp, pp=pp, mesh=mesh, data_group=group)


def pipelines(ctx: DistContext) -> list[list[int]]:
    """The global ranks of every pipeline of the job (the mesh's pp dimension, stage by
    stage), in one order on every process."""
    mesh = ctx.mesh
    axis = mesh.mesh_dim_names.index("pp")
    return mesh.mesh.movedim(axis, -1).reshape(-1, mesh.size(axis)).tolist()


def data_mesh(ctx: DistContext):
    """The mesh FSDP2 shards over: the data-parallel dimensions of the job's mesh (None: all
    the processes, FSDP2's default)."""
    if ctx.mesh is None:
        return None
    names = ctx.mesh.mesh_dim_names
    return ctx.mesh[("dp_replicate", "dp_shard")] if "dp_replicate" in names else \
        ctx.mesh["dp_shard"]


def wrap(model: nn.Module, strategy: str | None, device: torch.device,
         precision: str = "fp32", mesh=None) -> nn.Module:
    """The module the training step calls: DDP around the model, or the model FSDP2-sharded.

    FSDP2 shards in place (parameters become DTensors), so build the optimizer afterwards.
    Under bf16 it gathers the parameters in bf16 for compute and reduces the gradients in
    fp32 (`mixed_precision`): half the bytes of an fp32 all-gather, as torchtitan does.
    On a 2-D `mesh` (`data_mesh`: dp_replicate x dp_shard) it shards within each replica
    group and all-reduces the gradients between the groups (hybrid sharding): all-gathers stay
    within a group (a node), only the gradient all-reduce crosses them. A tensor-parallel
    model is sharded over the data-parallel dimensions only.
    """
    if strategy in (None, "pp"):  # (a pipeline's stages step their own parameters)
        return model
    if strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    policy = mixed_precision(precision, model)
    options: dict[str, Any] = {"mp_policy": policy} if policy is not None else {}
    if mesh is not None:
        options["mesh"] = mesh
    for block in _unshared(blocks(model)):
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def _unshared(units: list[nn.Module]) -> list[nn.Module]:
    """The units that share no parameter with another: a tied embedding and head (the
    text-gpt recipe's) cannot be sharded as two FSDP2 groups (it failed at the first
    forward), so they stay with the root's group, which holds both."""
    owners: dict[int, int] = {}
    for unit in units:
        for p in unit.parameters():
            owners[id(p)] = owners.get(id(p), 0) + 1
    return [u for u in units if all(owners[id(p)] == 1 for p in u.parameters())]


def mixed_precision(precision: str, model: nn.Module):
    """FSDP2's MixedPrecisionPolicy for the plan's precision (None: fp32 parameters, autocast
    alone). Not for a model with BatchNorm: its running statistics stay fp32 buffers, which
    batch_norm refuses beside bf16 weights (the digits CNN failed so on 2 ranks)."""
    if precision != "bf16" or any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                  for m in model.modules()):
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def gradient_sync(step_model: nn.Module, strategy: str | None, sync: bool):
    """A context for one micro-batch's backward: no gradient all-reduce unless `sync`.

    Gradient accumulation only needs the reduced gradient at the optimizer step.
    """
    if strategy == "ddp" and not sync:
        return step_model.no_sync()
    if strategy == "fsdp":
        step_model.set_requires_gradient_sync(sync)
    return nullcontext()


def all_reduce_sum(tensors: list[torch.Tensor], ctx: DistContext, everywhere: bool = False
                   ) -> list[torch.Tensor]:
    """Sums across the data-parallel ranks, or `everywhere` (a flag every rank must see);
    copies: the inputs keep their per-rank values."""
    if not ctx.active:
        return tensors
    out = []
    for t in tensors:
        t = t.clone()
        dist.all_reduce(t, group=None if everywhere else ctx.data_group)
        out.append(t)
    return out


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    if not ctx.active:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, strategy: str | None
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Unsharded model and optimizer state (a collective under FSDP2: call it on every rank)."""
    if strategy != "fsdp":
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=options),
            get_optimizer_state_dict(model, optimizer, options=options))


def full_model_state(model: nn.Module, strategy: str | None,
                     ctx: DistContext | None = None) -> dict[str, Any]:
    """The model's unsharded weights on the CPU, the optimizer left alone (a collective under
    FSDP2 and pipeline parallel, `ctx` the run's: call it on every rank)."""
    if strategy == "pp":
        return _stages_state(model, ctx)
    if strategy != "fsdp":
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))


def _stages_state(model: nn.Module, ctx: DistContext) -> dict[str, Any]:
    """Under pipeline parallel: the union of the first pipeline's stages' weights, on rank 0
    (others: {}). A stage FSDP2 shards is gathered whole first (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    own = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    sent = {k: v.cpu() for k, v in own.items()} if ctx.data_rank == 0 else {}
    parts: list[Any] = [None] * ctx.world_size if ctx.rank == 0 else []
    dist.gather_object(sent, parts if ctx.rank == 0 else None, dst=0)
    whole: dict[str, Any] = {}
    for part in parts:
        whole.update(part)
    return whole


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, strategy: str | None,
                    model_state: dict[str, Any], optimizer_state: dict[str, Any]) -> None:
    if strategy != "fsdp":
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def teardown(ctx: DistContext, succeeded: bool) -> None:
    """Leave the process group while the interpreter is whole.

    After a successful command the ranks first meet at a barrier, so none exits while a peer
    still talks to it, and garbage is collected, so objects holding the group (DDP's reducer
    in a reference cycle) free its threads now rather than during interpreter shutdown: a
    rank once aborted at exit with "terminate called without an active exception".
    """
    if not (ctx.active and dist.is_initialized()):
        return
    if succeeded:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()
