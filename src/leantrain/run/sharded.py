"""A distributed run's checkpoint: every rank writes and reads only its own shards.

A run on several processes checkpoints through `torch.distributed.checkpoint` (DCP): the model
and optimizer state as each rank holds it (FSDP2's shards, DDP's replicas written once), keyed
by parameter name, so no rank gathers the full state at a save and none loads it whole at a
resume. What is small (schedule, progress, RNG and partial sums per rank, the config's
fingerprint) is written by rank 0 beside it in `state.pt`, with the SHA-256 of every shard
file (each rank hashes what it wrote; at a resume each hashes a share of the files).

A checkpoint is a folder `checkpoints/step-NNNNNNNN`, made complete under a temporary name and
renamed, then named in `checkpoints/latest` (written atomically): a kill at any instant leaves
the previous checkpoint loadable. The last `keep` are kept (`train.keep_checkpoints`).

DCP stores every tensor by name and global shape, so a checkpoint loads into another layout:
2 processes to 1 or 4, DDP to FSDP2 and back; the model and the optimizer are resharded
exactly (the caller says what is lost: the ranks' random streams and the data order's bits).
"""

from __future__ import annotations

import logging
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..checkpoint import atomic_save, atomic_write_text, load_checkpoint, sha256_file
from ..distributed import DistContext
from ..errors import LeantrainError, one_line

log = logging.getLogger(__name__)

FOLDER, LATEST, STATE = "checkpoints", "latest", "state.pt"


def wanted(dist: DistContext) -> bool:
    """Runs on several processes checkpoint in shards; one process keeps its single file."""
    return dist.active and dist.world_size > 1


def latest(out_dir: Path) -> Path | None:
    """The run's last complete sharded checkpoint, None when it has none."""
    pointer = out_dir / FOLDER / LATEST
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    folder = pointer.parent / name
    if "/" in name or name.startswith(".") or not (folder / STATE).is_file():
        raise LeantrainError(f"{pointer} names {name[:60]!r}, which is not a complete "
                             f"checkpoint in {pointer.parent}")
    return folder


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer)


def _contiguous(state: Any) -> Any:
    """The state with every strided shard made an even split. DCP writes a rank's shard as
    one block of the whole tensor, and tensor parallel's fused q/k/v projection is held
    strided (rank r holds its part of each of q, k and v: three blocks); as an even split
    it is written, and read back, in the model's own order."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if isinstance(state, dict):
        return {k: _contiguous(v) for k, v in state.items()}
    if not isinstance(state, DTensor):
        return state
    names = state.device_mesh.mesh_dim_names or ()
    if "tp" in names and isinstance(state.placements[names.index("tp")], _StridedShard):
        return state.redistribute(placements=[Shard(p.dim) if isinstance(p, _StridedShard)
                                              else p for p in state.placements])
    return state


def _as_held(loaded: Any, held: Any) -> Any:
    """`loaded` (read through `_contiguous`) in the placements of `held`, the state as the
    rank holds it."""
    from torch.distributed.tensor import DTensor

    if isinstance(loaded, dict):
        return {k: _as_held(v, held[k]) for k, v in loaded.items()}
    if isinstance(loaded, DTensor) and loaded.placements != held.placements:
        return loaded.redistribute(placements=held.placements)
    return loaded


@dataclass
class Pending:
    """A save whose shards are still being written in the background (`save(...,
    asynchronous=True)`): `commit()` waits for them, then hashes, writes rank 0's state and
    names the checkpoint in `latest`. Every rank calls it before the next save and at the
    end; a kill before it leaves the previous checkpoint the latest."""

    future: Any
    tmp: Path
    name: str
    small: dict[str, Any]
    dist: DistContext
    step: int
    keep: int

    def commit(self) -> Path:
        self.future.result()  # this rank's shards are on disk
        return _commit(self.tmp, self.name, self.small, self.dist, self.step, self.keep)


_background_group: list[Any] = []  # (the job's group, the group async saves talk on)


def save(model: nn.Module, optimizer: torch.optim.Optimizer, small: dict[str, Any],
         out_dir: Path, dist: DistContext, step: int, asynchronous: bool = False,
         keep: int = 2) -> Path | Pending:
    """Every rank calls it: its shards, then rank 0's state and the commit. `asynchronous`:
    the shards are copied now and written by a background thread while training goes on (on
    a process group of their own: a thread's collectives must not interleave with the
    training's on one group); the returned `Pending` commits them. The last `keep` checkpoints
    are kept once it is committed."""
    import torch.distributed as torch_dist
    import torch.distributed.checkpoint as dcp

    root = out_dir / FOLDER
    name = _free_name(root, f"step-{step:08d}")
    tmp = root / f".{name}.tmp"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed at this step before
        tmp.mkdir(parents=True)
    torch_dist.barrier()
    model_state, optimizer_state = _state_dicts(model, optimizer)
    state = _contiguous({"model": model_state, "optimizer": optimizer_state})
    if not asynchronous:
        dcp.save(state, checkpoint_id=str(tmp))
        return _commit(tmp, name, small, dist, step, keep)
    world = torch_dist.group.WORLD
    if not _background_group or _background_group[0][0] is not world:  # (a new job's group)
        _background_group[:] = [(world, torch_dist.new_group(backend="gloo"))]
    future = dcp.async_save(state, checkpoint_id=str(tmp),
                            process_group=_background_group[0][1])
    log.info("checkpoint %s: its shards are being written in the background", name)
    return Pending(future, tmp, name, small, dist, step, keep)


def _commit(tmp: Path, name: str, small: dict[str, Any], dist: DistContext, step: int,
            keep: int) -> Path:
    """Hash each rank's shards; rank 0 writes its state, renames the folder, names it in
    `latest` and removes what it supersedes."""
    import torch.distributed as torch_dist

    root = tmp.parent
    written = sorted(tmp.glob(f"__{dist.rank}_*.distcp")) + \
        ([tmp / ".metadata"] if dist.is_main else [])  # (DCP's coordinator writes it)
    mine = {p.name: sha256_file(p) for p in written}
    hashes = {k: v for part in distributed.gather_objects(mine, dist) for k, v in part.items()}
    if dist.is_main:
        atomic_save({**small, "world_size": dist.world_size, "shards": hashes}, tmp / STATE)
        tmp.rename(root / name)
        atomic_write_text(root / LATEST, name)
        superseded = [p for p in root.glob(f"step-{step:08d}*") if p.name != name]
        for old in superseded + sorted(root.glob("step-*"))[:-keep - len(superseded)]:
            shutil.rmtree(old, ignore_errors=True)  # (this step's older state, then the oldest)
    torch_dist.barrier()
    return root / name


def _free_name(root: Path, name: str) -> str:
    """`name`, or `name-1`, `name-2`... when a checkpoint of this step exists (a run's last
    epoch and its end save at the same step): the one `latest` names is never replaced in
    place, where a kill between removing and renaming would leave it pointing at nothing.
    The suffixes sort after their step and before the next one."""
    found, k = name, 0
    while (root / found).exists():
        k += 1
        found = f"{name}-{k}"
    return found


def load_state(folder: Path) -> dict[str, Any]:
    """Rank 0's small state of the checkpoint in `folder` (its SHA-256 checked)."""
    return load_checkpoint(folder / STATE)


def verify(folder: Path, hashes: dict[str, str], dist: DistContext) -> None:
    """Each rank hashes its share of the shard files (none hashes them all); a difference
    anywhere stops every rank with one line naming the file."""
    if not isinstance(hashes, dict):
        raise LeantrainError(f"{folder / STATE}: holds no shard hashes: not a checkpoint "
                             "leantrain wrote")
    names = sorted(hashes)
    bad = [n for n in names[dist.rank::max(dist.world_size, 1)]
           if not (folder / n).is_file() or sha256_file(folder / n) != hashes[n]]
    found = [b for part in distributed.gather_objects(bad, dist) for b in part]
    if found:
        raise LeantrainError(f"{folder / found[0]} is missing or corrupt: its SHA-256 differs "
                             f"from the one recorded when it was written")


def load(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Read the model and optimizer state into this rank's layout (resharded as needed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    held = dict(zip(("model", "optimizer"), _state_dicts(model, optimizer), strict=True))
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    state = _contiguous(held)
    try:
        with warnings.catch_warnings():  # one process reading a sharded checkpoint (a resume
            warnings.simplefilter("ignore")  # on 1 of 2) is warned of its missing group
            dcp.load(state, checkpoint_id=str(folder))
    except Exception as exc:  # another model or optimizer than the checkpoint's
        raise LeantrainError(f"{folder} cannot be resumed: {one_line(exc)}") from exc
    state = _as_held(state, held)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    # on one of two pipeline stages (each its own parameter names) the groups came back
    # without their numbers (lr, betas, eps; torch 2.13): the run's own, as it built them
    # (the lr is then the schedule's: `state.restore`)
    for group, own in zip(optimizer.param_groups, settings, strict=True):
        for key, value in own.items():
            group.setdefault(key, value)


def model_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The model's full tensors from a sharded checkpoint, read in one process with no group:
    the optimizer's state is never loaded (an export needs the weights only)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    except Exception as exc:
        raise LeantrainError(f"{folder} is not a sharded checkpoint: {one_line(exc)}") from exc
    weights = {key.removeprefix("model."): torch.empty(entry.size, dtype=entry.properties.dtype)
               for key, entry in metadata.state_dict_metadata.items()
               if key.startswith("model.") and isinstance(entry, TensorStorageMetadata)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load({"model": weights}, checkpoint_id=str(folder), no_dist=True)
    return weights
