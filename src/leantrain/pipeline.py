"""Pipeline parallelism with torch.distributed.pipelining: the model's repeated blocks split
into stages, one process (or, interleaved, two stage copies) each, micro-batches flowing
through them by one of torch's schedules.

Stages are cut from the model the user brought, not rewritten per family. The one list of
repeated blocks (the units FSDP2 shards, `distributed.blocks`) is split into contiguous,
balanced ranges. A probe forward and backward finds which other parameters feed the first
block (embeddings, learned positions: the first stage's) and which feed the loss from the
last block's output (final norm, head: the last stage's; a head tied to the embedding is
both). On each process the model keeps only its stages' blocks (under their own names, so a
checkpoint's keys are the whole model's) and its parameters; the others become zero-stride
buffers (no memory), since the model's own forward still runs around them. A stage calls
the model's forward, unchanged, on the micro-batch: on every stage but the first a hook
swaps the first block's input for the activation received from the stage before, and on
every stage but the last a hook ends the forward at its last block's output, which is sent
on. The last stage's forward returns the micro-batch's loss, computed as one process would.

A tied embedding and head live on the first and the last stage as two copies: their
gradients are summed across the two after each step, so both copies take the same step.

The schedules' micro-batches are the gradient-accumulation steps of one process (one
concept, one setting): with `plan.grad_accum` M the loader's batch is M micro-batches, and
the losses equal one process accumulating M batches (tests/test_pipeline.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import LeantrainError

_SHAPES_KEPT = 8  # schedules kept for batches of different shapes (padded lengths, eval)
SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "interleaved-zero-bubble")
INTERLEAVED = ("interleaved-1f1b", "interleaved-zero-bubble")


def stages_per_rank(schedule: str) -> int:
    return 2 if schedule in INTERLEAVED else 1


def block_list(model: nn.Module) -> tuple[nn.Module, str, list[nn.Module]]:
    """(parent, attribute, blocks) of the model's one list of repeated blocks: its outermost
    ModuleList (a MoE block's experts, a block's sublayers lie inside it; the blocks
    activation checkpointing wraps). One line when there is none, or several (an
    encoder-decoder's encoder and decoder stacks)."""
    lists = {name: m for name, m in model.named_modules() if isinstance(m, nn.ModuleList)}
    outer = [n for n in lists if not any(n.startswith(f"{o}.") for o in lists if o != n)]
    if len(outer) != 1:
        found = ", ".join(outer) or "none"
        raise LeantrainError(f"plan.parallel.pp: pipeline stages split one list of repeated "
                             f"blocks; {type(model).__name__} has {len(outer)} (lists: "
                             f"{found}): train it with FSDP2 or tensor parallel instead")
    name = outer[0]
    parent_name, _, attr = name.rpartition(".")
    return model.get_submodule(parent_name), attr, list(lists[name])


def stage_ranges(blocks: int, stages: int) -> list[range]:
    """Contiguous block ranges, balanced: the first `blocks % stages` stages take one more."""
    size, extra = divmod(blocks, stages)
    out, start = [], 0
    for s in range(stages):
        end = start + size + (s < extra)
        out.append(range(start, end))
        start = end
    return out


def check(model: nn.Module, pp: int, schedule: str, microbatches: int) -> None:
    """Refusals before any process trains: no one list of blocks, too few blocks for the
    stages, too few micro-batches for the schedule."""
    stages = pp * stages_per_rank(schedule)
    blocks = block_list(model)[2]
    if len(blocks) < stages:
        raise LeantrainError(f"plan.parallel.pp={pp} with {schedule} makes {stages} stages, "
                             f"but {type(model).__name__} has {len(blocks)} blocks: each stage "
                             "needs one at least")
    if schedule in INTERLEAVED and microbatches % pp:
        raise LeantrainError(f"plan.parallel.pp_schedule={schedule} runs micro-batches in "
                             f"rounds of pp ({pp}): plan.grad_accum ({microbatches}) must be a "
                             "multiple of it")
    if schedule == "1f1b" and microbatches < pp:
        raise LeantrainError(f"plan.parallel.pp_schedule=1f1b keeps every stage busy with a "
                             f"micro-batch: plan.grad_accum ({microbatches}) must be at least "
                             f"pp ({pp}); more shrink the pipeline's idle share")


@dataclass
class StageShares:
    params: list[float]  # each stage's share of the model's parameter bytes
    produced: list[float]  # its share of the bytes the model's layers produce in a forward
    sent: int  # the bytes of the activation one stage sends the next (and its gradient back)


def stage_shares(model: nn.Module, call: Callable[[nn.Module], Any], stages: int
                 ) -> StageShares:
    """Each stage's share of the model's parameters and of its activations, and the bytes
    sent between stages, from `call(model)` (one micro-batch) run once without gradients:
    a block's layers are its stage's, and a layer outside the blocks is the stage that runs
    it (before the first block: the first stage's; after the last: the last stage's; a tied
    embedding and head: both hold it, so the shares may sum past 1). What a memory estimate
    scales one process's probe by, per stage."""
    _, _, blocks = block_list(model)
    stage_of = {i: s for s, r in enumerate(stage_ranges(len(blocks), stages)) for i in r}
    where, produced, used, sent = [0], [0] * stages, {}, [0]

    def entering(index: int):
        def hook(module, args, kwargs):
            where[0] = stage_of[index]
            hidden = _hidden_of(args, kwargs)[0]
            sent[0] = max(sent[0], hidden.numel() * hidden.element_size())
        return hook

    def record(module, args, output):
        produced[where[0]] += sum(t.numel() * t.element_size() for t in _tensors_in(output))
        for p in module.parameters(recurse=False):
            used.setdefault(id(p), set()).add(where[0])

    hooks = [b.register_forward_pre_hook(entering(i), with_kwargs=True)
             for i, b in enumerate(blocks)]
    hooks += [m.register_forward_hook(record) for m in model.modules()
              if not any(True for _ in m.children())]
    try:
        with torch.no_grad():
            call(model)
    finally:
        for h in hooks:
            h.remove()
    held = [0] * stages
    for i, block in enumerate(blocks):
        for p in block.parameters():
            used[id(p)] = {stage_of[i]}
    for p in model.parameters():  # (a parameter no layer called, a learned position: first)
        for s in used.get(id(p), {0}):
            held[s] += p.numel() * p.element_size()
    total_held, total_produced = max(sum(p.numel() * p.element_size()
                                         for p in model.parameters()), 1), max(sum(produced), 1)
    return StageShares([h / total_held for h in held], [a / total_produced for a in produced],
                       sent[0])


def _tensors_in(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors_in(v)]
    return []


def in_flight(schedule: str, pp: int, rank: int, microbatches: int) -> int:
    """The micro-batches whose activations a rank holds at once under `schedule` (each on
    one of its stages): GPipe runs every forward before any backward; 1F1B holds pp - rank
    (the first stage waits longest for its first backward); the interleaved schedules warm
    up a round of pp on each of their 2 stages plus 2 for each rank after this one, as
    torch's schedules do."""
    if schedule == "gpipe":
        return microbatches
    if schedule == "1f1b":
        return min(microbatches, pp - rank)
    return min(2 * microbatches, pp + 2 * (pp - 1 - rank) + 1)


@contextlib.contextmanager
def _unwrapped_errors():
    """torch's stage wraps whatever a stage's forward raises in a RuntimeError: the cause is
    what the run handles (a LeantrainError's one line, an out-of-memory error's recovery)."""
    try:
        yield
    except RuntimeError as exc:
        cause = exc.__cause__
        if isinstance(cause, (LeantrainError, torch.OutOfMemoryError)):
            raise cause from None
        raise


class _StageExit(Exception):  # noqa: N818 (a control-flow signal, not an error)
    """Ends a stage's forward at its last block, carrying the activation to send on."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


def _hidden_of(args: tuple, kwargs: dict) -> tuple[torch.Tensor, str | int]:
    if args and isinstance(args[0], torch.Tensor):
        return args[0], 0
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"], "hidden_states"
    raise LeantrainError("plan.parallel.pp: a block's first input is not a tensor (nor a "
                         "hidden_states tensor): stages can pass tensors only")


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise LeantrainError(f"plan.parallel.pp: a block returns {type(output).__name__}, not a "
                         "tensor (or a tuple starting with one): stages can pass tensors only")


@dataclass(frozen=True)
class Roles:
    """Which parameters (by name) are used before the first block and after the last."""

    before: frozenset[str]
    after: frozenset[str]


def find_roles(model: nn.Module, call: Callable[[nn.Module], Any], stages: int) -> Roles:
    """The parameters the first block's input depends on, and those the loss depends on
    from the last block's output on, from `call(model) -> loss` run whole and split at the
    block list; checked that every parameter outside the blocks has a stage and that the
    model, run stage by stage (`_staged_loss`), gives the loss it gives whole. Frozen
    parameters are asked too (a LoRA model's base embedding still has a stage). Call it on
    a batch of a row or two: the whole model runs."""
    parent, attr, blocks = block_list(model)
    params = dict(model.named_parameters())
    names, tensors = list(params), list(params.values())
    seen: dict[str, torch.Tensor] = {}

    def keep_input(module, args, kwargs):
        seen["input"] = _hidden_of(args, kwargs)[0]

    def cut_output(module, args, kwargs, output):
        hidden = _first_tensor(output)
        cut = hidden.detach().requires_grad_(True)
        return cut if isinstance(output, torch.Tensor) else (cut, *output[1:])

    frozen = [p for p in tensors if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        used = torch.autograd.grad(call(model), tensors, allow_unused=True)
        hooks = [blocks[0].register_forward_pre_hook(keep_input, with_kwargs=True),
                 blocks[-1].register_forward_hook(cut_output, with_kwargs=True)]
        try:
            loss = call(model)
        finally:
            for h in hooks:
                h.remove()
        source = seen["input"]
        before = torch.autograd.grad(source.float().sum(), tensors, allow_unused=True,
                                     retain_graph=True) if source.requires_grad else \
            [None] * len(tensors)
        after = torch.autograd.grad(loss, tensors, allow_unused=True)
    finally:
        for p in frozen:
            p.requires_grad_(False)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    for name, p, u, b, a in zip(names, tensors, used, before, after, strict=True):
        if id(p) in in_blocks and (b is not None or a is not None):
            raise LeantrainError(f"plan.parallel.pp: the parameter {name} is used inside the "
                                 "blocks and outside them: stages cannot split it")
        if id(p) not in in_blocks and u is not None and b is None and a is None:
            raise LeantrainError(f"plan.parallel.pp: the parameter {name} lives outside the "
                                 "blocks but is handed to them (not before the first or after "
                                 "the last): stages cannot place it; train the model with "
                                 "FSDP2 or tensor parallel instead")
    roles = Roles(frozenset(n for n, g in zip(names, before, strict=True) if g is not None),
                  frozenset(n for n, g in zip(names, after, strict=True) if g is not None))
    outside = {n: p for n, p in params.items() if id(p) not in in_blocks}
    _check_staged(model, call, parent, attr, blocks, stages, roles, outside)
    return roles


def _check_staged(model: nn.Module, call: Callable[[nn.Module], Any], parent: nn.Module,
                  attr: str, blocks: list[nn.Module], stages: int, roles: Roles,
                  outside: dict[str, nn.Parameter]) -> None:
    """One line when the model, run stage by stage in this process as the pipeline will run
    it (each stage's parameters outside the blocks zero but its own), gives another loss
    than whole: a forward that uses a parameter between its blocks, numbers its blocks by
    their place in the loop (a per-layer setting read by index), or carries a second output
    from block to block cannot be cut at its blocks. Both in eval mode and on the same seed
    (dropout)."""
    whole, original = _seeded(model, call), getattr(parent, attr)
    listed = _OwnedBlocks(dict(enumerate(blocks)), len(blocks))
    setattr(parent, attr, listed)
    hidden = None
    try:
        for s, stage in enumerate(stage_ranges(len(blocks), stages)):
            listed.active = list(stage)
            hooks = []
            if hidden is not None:
                hooks.append(blocks[stage[0]].register_forward_pre_hook(
                    _swap_in(hidden), with_kwargs=True, prepend=True))
            if s < stages - 1:
                hooks.append(blocks[stage[-1]].register_forward_hook(_leave))
            kept = (roles.before if s == 0 else set()) | \
                (roles.after if s == stages - 1 else set())
            try:
                with _zeroed([p for n, p in outside.items() if n not in kept]):
                    staged = _seeded(model, call)
            except _StageExit as done:
                hidden = done.hidden
            finally:
                listed.active = []
                for h in hooks:
                    h.remove()
    finally:
        setattr(parent, attr, original)
    if not torch.allclose(staged.float(), whole.float(), rtol=1e-4, atol=1e-6):
        raise LeantrainError(f"plan.parallel.pp: run stage by stage, the model's loss is "
                             f"{staged.item():.6g}, not its {whole.item():.6g} run whole: its "
                             "forward does not run its blocks as a plain list (a parameter "
                             "used between blocks, a per-block setting read by the loop's "
                             "position such as config.layer_types' sliding windows, a second "
                             "output carried between blocks); another pp or schedule may cut "
                             "where such a pattern repeats, else train it with FSDP2 or "
                             "tensor parallel")


@contextlib.contextmanager
def _zeroed(params: list[nn.Parameter]):
    """The parameters read as zeros meanwhile, as on a stage that does not hold them."""
    kept = [p.data for p in params]
    for p in params:
        p.data = torch.zeros_like(p)
    try:
        yield
    finally:
        for p, data in zip(params, kept, strict=True):
            p.data = data


def _seeded(model: nn.Module, call: Callable[[nn.Module], Any]) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return call(model).detach()
    finally:
        model.train(was)


def _swap_in(hidden: torch.Tensor):
    """A forward pre-hook giving a block `hidden` as its input (positional or keyword)."""
    def swap(module, args, kwargs):
        _, where = _hidden_of(args, kwargs)
        if where == 0:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, where: hidden}
    return swap


def _leave(module, args, output):
    """A forward hook ending the model's forward at this block, with its output."""
    raise _StageExit(_first_tensor(output))


class _OwnedBlocks(nn.ModuleList):
    """The blocks this process holds, under their indices in the whole list (checkpoint keys
    stay the whole model's), iterating over those of the stage running now only."""

    def __init__(self, owned: dict[int, nn.Module], total: int):
        super().__init__()
        for index, block in owned.items():
            self.add_module(str(index), block)
        self.total = total
        self.active: list[int] = []

    def _running(self) -> list[nn.Module]:
        if not self.active:  # the model called whole, not as a stage: it would be wrong
            raise LeantrainError("this process holds pipeline stages of the model: it runs "
                                 "through the pipeline's schedule only")
        return [self._modules[str(i)] for i in self.active]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._running())

    def __len__(self) -> int:
        return len(self.active)

    def __getitem__(self, index):
        if isinstance(index, slice):  # (Llama's `layers[: num_hidden_layers]`)
            keep = set(range(self.total)[index])
            return [self._modules[str(i)] for i in self.active if i in keep]
        index = range(self.total)[index]
        if str(index) in self._modules:
            return self._modules[str(index)]
        # another process's block: a forward that reads one for its structure (torch's
        # TransformerEncoder checks `layers[0]`) gets this stage's first, alike (repeated)
        return self._running()[0]


def _drop_parameter(model: nn.Module, name: str) -> None:
    """The parameter becomes a zero-stride buffer of its shape (no memory, not saved): the
    model's forward still reads it on the stages that do not own it."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    p = owner._parameters.pop(attr)
    zero = torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape)
    owner.register_buffer(attr, zero, persistent=False)


class StageModule(nn.Module):
    """One stage: what torch's PipelineStage runs. Its parameters are exactly the stage's
    (torch's zero-bubble schedules compute their gradients apart); the model is shared, not
    a child."""

    def __init__(self, pipeline: Pipeline, index: int, blocks: list[nn.Module],
                 extra: list[str]):
        super().__init__()
        self.index, self.blocks, self.extra_names = index, nn.ModuleList(blocks), extra
        object.__setattr__(self, "pipeline", pipeline)
        self.refresh()

    def refresh(self) -> None:
        """The stage's parameters outside its blocks, as the model holds them now (FSDP2
        replaces a model's parameters with sharded ones)."""
        params = dict(self.pipeline.model.named_parameters())
        self.extra = nn.ParameterList([params[n] for n in self.extra_names])

    def forward(self, *received: torch.Tensor, **leaves: Any) -> torch.Tensor:
        if self.index == 0:  # (the first stage is handed the rows' numbers: `_inputs`)
            received = ()
        return self.pipeline.run_stage(self, received, leaves)


class Pipeline:
    """This process's stages of the model, and the schedule that runs them."""

    def __init__(self, model: nn.Module, roles: Roles, pp: int, rank: int, schedule: str,
                 microbatches: int, device: torch.device,
                 call: Callable[[nn.Module, Any], tuple[torch.Tensor, Any]], group=None,
                 pipelines: list[list[int]] | None = None):
        """`rank`: this process's place in its pipeline (0 .. pp - 1), whose processes are
        `group`; `pipelines`: the global ranks of every pipeline of the job, stage by stage,
        in one order on every process (one pipeline per data-parallel and tensor-parallel
        coordinate)."""
        self.model, self.pp, self.rank, self.device = model, pp, rank, device
        self.schedule_name, self.microbatches, self.call, self.group = \
            schedule, microbatches, call, group
        parent, attr, blocks = block_list(model)
        self.stages = pp * stages_per_rank(schedule)
        self.ranges = stage_ranges(len(blocks), self.stages)
        self.mine = [s for s in range(self.stages) if s % pp == rank]
        self.last_rank = (self.stages - 1) % pp
        self.tallies: list[Any] = []
        self._spec = None  # (the batch's structure, for the stages to rebuild it)
        self.flops_per_sample: float | None = None  # the whole model's, counted before the cut
        owned = {i: blocks[i] for s in self.mine for i in self.ranges[s]}
        self.owned_blocks = _OwnedBlocks(owned, len(blocks))
        setattr(parent, attr, self.owned_blocks)
        keep = set()
        if 0 in self.mine:
            keep |= roles.before
        if self.stages - 1 in self.mine:
            keep |= roles.after
        unique = dict(model.named_parameters())
        kept = {id(unique[n]) for n in keep} | {id(p) for b in owned.values()
                                                 for p in b.parameters()}
        for name, p in list(model.named_parameters(remove_duplicate=False)):
            if id(p) not in kept:  # (every alias of it: a tied head too)
                _drop_parameter(model, name)
        # a tied embedding and head: one tensor per end, on two processes; their gradients
        # are summed after each step (every process joins in making the group)
        self.tied = sorted(roles.before & roles.after)
        self.tied_group = None
        if self.tied and self.last_rank != 0:
            import torch.distributed as dist

            pipelines = pipelines or [list(range(pp))]
            groups = [dist.new_group([ranks[0], ranks[self.last_rank]]) for ranks in pipelines]
            me = dist.get_rank()
            self.tied_group = next(g for g, ranks in zip(groups, pipelines, strict=True)
                                   if me in ranks)
        self.modules = [StageModule(self, s, [owned[i] for i in self.ranges[s]],
                                    self._extra(s, roles)) for s in self.mine]
        self._schedules: dict[tuple, Any] = {}

    def _extra(self, stage: int, roles: Roles) -> list[str]:
        """The stage's parameters outside the blocks: the first's before them, the last's
        after them."""
        names = (roles.before if stage == 0 else frozenset()) | \
            (roles.after if stage == self.stages - 1 else frozenset())
        return sorted(names)

    def refresh(self) -> None:
        """After the model's parameters were replaced (sharded by FSDP2)."""
        for module in self.modules:
            module.refresh()

    @property
    def counted_elsewhere(self) -> set[int]:
        """The parameters a norm over every stage counts on the first stage's process only
        (a tied head's copy on the last)."""
        if self.tied_group is None or 0 in self.mine:
            return set()
        params = dict(self.model.named_parameters())
        return {id(params[n]) for n in self.tied}

    def _schedule(self, inputs: dict[str, Any], training: bool):
        """The schedule for micro-batches of these shapes: torch's stages size their buffers
        from the first micro-batch they see, so each shape has its own (every process sees
        the same batches, so all make the same ones; a new shape costs one micro-batch's
        forward to learn the activations' shapes). The last few are kept."""
        key = (training, *(tuple(t.shape) for t in (*inputs["args"],
                                                    *inputs["kwargs"].values())
                           if isinstance(t, torch.Tensor)))
        if key not in self._schedules:
            if len(self._schedules) >= _SHAPES_KEPT:
                self._schedules.pop(next(iter(self._schedules)))
            self._schedules[key] = self._new_schedule()
        return self._schedules[key]

    def _new_schedule(self):
        from torch.distributed import pipelining as pl

        stages = [pl.PipelineStage(m, m.index, self.stages, self.device, group=self.group)
                  for m in self.modules]
        kind = {"gpipe": pl.ScheduleGPipe, "1f1b": pl.Schedule1F1B,
                "interleaved-1f1b": pl.ScheduleInterleaved1F1B,
                "interleaved-zero-bubble": pl.ScheduleInterleavedZeroBubble}[self.schedule_name]
        first = stages if self.schedule_name in INTERLEAVED else stages[0]
        return kind(first, n_microbatches=self.microbatches, loss_fn=self._loss,
                    scale_grads=False)

    @contextlib.contextmanager
    def _cut(self, stage: StageModule, received: tuple[torch.Tensor, ...]):
        """The model's forward over this stage's blocks only: the first block's input
        replaced by the activation received, the forward ended at the last block."""
        blocks = list(self.ranges[stage.index])
        self.owned_blocks.active = blocks
        hooks = []
        if received:  # (before FSDP2's pre-hook: it then sees the block's real input)
            hooks.append(self.owned_blocks[blocks[0]].register_forward_pre_hook(
                _swap_in(received[0]), with_kwargs=True, prepend=True))
        if stage.index != self.stages - 1:
            hooks.append(self.owned_blocks[blocks[-1]].register_forward_hook(_leave))
        try:
            yield
        finally:
            self.owned_blocks.active = []
            for h in hooks:
                h.remove()

    def _loss(self, output: torch.Tensor, target: Any) -> torch.Tensor:
        """The last stage's output is the micro-batch's loss already; scaled as one process
        scales a micro-batch it accumulates (the schedule's own scaling is off)."""
        return output / self.microbatches

    def run_stage(self, stage: StageModule, received: tuple, leaves: dict[str, Any]
                  ) -> torch.Tensor:
        from torch.utils._pytree import tree_unflatten

        batch = tree_unflatten([leaves[f"leaf{i}"] for i in range(len(leaves))], self._spec)
        with self._cut(stage, received):
            try:
                loss, tally = self.call(self.model, batch)
            except _StageExit as done:
                return done.hidden
        self.tallies.append(tally)
        return loss

    def _inputs(self, batch: Any) -> dict[str, Any]:
        """The batch as the schedule's keyword arguments, one per tensor (it splits only
        those into micro-batches; the batch is rebuilt in each stage), the rows' numbers as
        the positional argument (torch splits keywords only where there is one) and as the
        loss target (the last stage's output is the loss already)."""
        from torch.utils._pytree import tree_flatten

        from .data.loaders import batch_size

        leaves, self._spec = tree_flatten(batch)
        rows = torch.arange(batch_size(batch), device=self.device)
        return {"args": (rows,), "target": rows,
                "kwargs": {f"leaf{i}": leaf for i, leaf in enumerate(leaves)}}

    def train_step(self, batch: Any) -> list[Any]:
        """Forward and backward of one step's batch (`microbatches` micro-batches) through
        the schedule; the tied parameters' gradients summed. Returns the last stage's
        per-micro-batch tallies on the process that holds it, else [] (the first step also
        runs a micro-batch to learn the activations' shapes: its tally is not counted)."""
        self.tallies = []
        inputs = self._inputs(batch)
        with _unwrapped_errors():
            self._schedule(inputs, True).step(*inputs["args"], target=inputs["target"],
                                              return_outputs=False, **inputs["kwargs"])
        self.sync_tied()
        return self.tallies[-self.microbatches:] if self.tallies else []

    def eval_step(self, batch: Any) -> list[Any]:
        self.tallies = []
        inputs = self._inputs(batch)
        with _unwrapped_errors():
            self._schedule(inputs, False).eval(*inputs["args"], target=inputs["target"],
                                               return_outputs=False, **inputs["kwargs"])
        return self.tallies[-self.microbatches:] if self.tallies else []

    def sync_tied(self) -> None:
        """Sum the gradients of a tied parameter's two copies (first and last stage)."""
        if self.tied_group is None or not (0 in self.mine or self.stages - 1 in self.mine):
            return
        import torch.distributed as dist

        params = dict(self.model.named_parameters())
        for name in self.tied:
            p = params[name]
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad  # (FSDP2)
            dist.all_reduce(grad, group=self.tied_group)



