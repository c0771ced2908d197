"""Feature distillation (FitNets-style hints): the student's chosen hidden states are pulled
towards the teacher's, through a learned projection where their widths differ.

    loss_features = weight x mean over pairs of MSE(projection(student_h), teacher_h)

Forward hooks capture each named layer's output (a tensor, or the first tensor of a tuple or
ModelOutput, as Hugging Face layers return). The projection maps the student's channels to the
teacher's: a Linear over the last dimension for (batch, features) and (batch, time, features)
states, a 1x1 convolution over dimension 1 for (batch, channels, height, width) maps. The other
dimensions must agree (same sequence length, same spatial size).

The projections are training-only parameters. For the run they are registered on the
student's root module as parameters named `PROJECTIONS_*` (parameters, not a submodule: an
`nn.Sequential` would run a new child as one more layer), so the trainer's optimizer,
checkpoints and resume cover them with no change to the trainer, and `detach_projections`
removes them afterwards.
The loss reads the projections of the student instance that ran last (a forward pre-hook on
its root notes it): the trainer's measured-default trials train deep copies of the student,
hooks included, and each copy must train its own projections, never the original's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LeantrainError

PROJECTIONS = "leantrain_feature_projection"  # prefix of the student's projection parameters


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """`STUDENT=TEACHER[,...]` (a name alone: the same layer name in both) -> pairs."""
    pairs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        student, _, teacher = item.partition("=")
        if not student.strip() or (_ and not teacher.strip()):
            raise LeantrainError(f"--feature-layers {text!r}: each item is STUDENT=TEACHER or "
                                 "one layer name")
        pairs.append((student.strip(), (teacher or student).strip()))
    if not pairs:
        raise LeantrainError("--feature-layers is empty: give STUDENT=TEACHER layer names")
    return pairs


def check_weight(weight: float) -> None:
    if not weight > 0:
        raise LeantrainError(f"--feature-weight must be > 0, got {weight!r}")


def check_layers(student: nn.Module, teacher: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Every named layer exists: else an error naming it (and a few names that do exist)."""
    for role, model, names in (("student", student, [s for s, _ in pairs]),
                               ("teacher", teacher, [t for _, t in pairs])):
        known = dict(model.named_modules())
        for name in names:
            if name not in known:
                some = ", ".join(n for n in list(known)[1:6])
                raise LeantrainError(f"--feature-layers: the {role} has no layer {name!r} "
                                     f"(its layers include {some}, ...)")


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, Mapping) else out \
        if isinstance(out, (tuple, list)) else ()
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise LeantrainError(f"a feature layer returned a {type(out).__name__} with no tensor")


class _Capture:
    """Forward hooks keeping the latest output of each named layer."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.outputs: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self.handles = [modules[n].register_forward_hook(self._keep(n)) for n in names]

    def _keep(self, name: str):
        def hook(module, args, out):
            self.outputs[name] = _first_tensor(out)
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _projection(student: torch.Tensor, teacher: torch.Tensor, pair: tuple[str, str]
                ) -> nn.Module:
    """Linear over the last dimension, or 1x1 conv over dimension 1 for 4-D maps."""
    conv = student.dim() == 4
    channel = 1 if conv else -1
    s_shape, t_shape = list(student.shape), list(teacher.shape)
    del s_shape[channel], t_shape[channel]
    if student.dim() != teacher.dim() or s_shape != t_shape:
        raise LeantrainError(
            f"--feature-layers {pair[0]}={pair[1]}: the student's {tuple(student.shape)} and "
            f"the teacher's {tuple(teacher.shape)} differ beyond the channel dimension")
    width_in, width_out = student.shape[channel], teacher.shape[channel]
    if conv:
        return nn.Conv2d(width_in, width_out, kernel_size=1)
    return nn.Linear(width_in, width_out)


class FeatureMatch:
    """Captures the paired layers' outputs and scores their distance; call `loss()` after a
    student forward and a teacher forward on the same batch."""

    def __init__(self, student: nn.Module, teacher: nn.Module, pairs: list[tuple[str, str]],
                 weight: float = 1.0):
        check_weight(weight)
        check_layers(student, teacher, pairs)
        self.pairs, self.weight = pairs, weight
        self.student = _Capture(student, [s for s, _ in pairs])
        self.teacher = _Capture(teacher, [t for _, t in pairs])
        self.ran: nn.Module = student  # the student instance whose forward ran last

        # a plain function, not a bound method: deepcopy shares functions but would copy a
        # method's object, and the copy's note would land in a copy of this match
        def note_root(module: nn.Module, args) -> None:
            self.ran = module

        self.student.handles.append(student.register_forward_pre_hook(note_root))

    def attach_projections(self, student: nn.Module) -> None:
        """Size the projections from one forward of each model (which must have just run on
        the same batch) and register their parameters on the student's root."""
        reference = next(student.parameters())
        for pair in self.pairs:
            s, t = self.student.outputs.get(pair[0]), self.teacher.outputs.get(pair[1])
            if s is None or t is None:
                missing = pair[0] if s is None else pair[1]
                raise LeantrainError(f"--feature-layers: layer {missing!r} did not run in the "
                                     "model's forward")
            layer = _projection(s, t, pair).to(reference.device)
            for kind, parameter in layer.named_parameters():
                student.register_parameter(_name(pair, kind), parameter)

    def loss(self) -> torch.Tensor:
        terms = []
        for pair in self.pairs:
            weight = getattr(self.ran, _name(pair, "weight"))
            bias = getattr(self.ran, _name(pair, "bias"))
            s = self.student.outputs[pair[0]].to(weight.dtype)
            t = self.teacher.outputs[pair[1]].detach().clone().float()  # out of inference mode
            projected = F.conv2d(s, weight, bias) if weight.dim() == 4 else F.linear(s, weight,
                                                                                      bias)
            terms.append(F.mse_loss(projected.float(), t))
        return self.weight * torch.stack(terms).mean()

    def remove_hooks(self) -> None:
        self.student.remove()
        self.teacher.remove()


def _name(pair: tuple[str, str], kind: str) -> str:
    """The student's parameter holding one projection's weight or bias."""
    return f"{PROJECTIONS}_{pair[0]}_to_{pair[1]}_{kind}".replace(".", "_")


def detach_projections(student: nn.Module) -> nn.Module:
    """The student without its training-only projections."""
    for name in [n for n, _ in student.named_parameters(recurse=False)
                 if n.startswith(PROJECTIONS)]:
        delattr(student, name)
    return student
