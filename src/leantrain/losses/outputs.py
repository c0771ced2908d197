"""What a model returned, read the one way every caller reads it (the step contract)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import LeantrainError


def loss_terms(out: Mapping) -> list[str]:
    """The names of an output's loss terms other than `loss`: scalar tensors named like a loss
    ("loss_img", "contrastive_loss", "aux_loss")."""
    return [k for k, v in out.items() if k != "loss" and isinstance(v, torch.Tensor)
            and v.dim() == 0 and v.is_floating_point() and "loss" in k.lower()]


def read_output(out: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(logits, loss) of a tensor (a 0-d floating-point one is a loss: the diffusers
    training-script style), a tuple (a leading 0-d tensor is a loss), a dict or a
    ModelOutput. A dict without `loss` but with loss terms (`loss_terms`) trains on their
    sum: a model that names its losses is trained on all of them, never on its logits alone."""
    if isinstance(out, torch.Tensor):
        if out.dim() == 0 and out.is_floating_point():
            return None, out
        return out, None
    if isinstance(out, Mapping):
        own = out.get("loss")
        if own is None:
            terms = loss_terms(out)
            own = sum(out[k] for k in terms) if terms else None
        return out.get("logits"), own
    if isinstance(out, (tuple, list)):
        found = [t for t in out if isinstance(t, torch.Tensor)]
        if found and found[0].dim() == 0:
            return (found[1] if len(found) > 1 else None), found[0]
        return (found[0] if found else None), None
    raise LeantrainError(f"the model returned a {type(out).__name__}; leantrain reads a tensor, "
                         "a tuple, or a dict/ModelOutput with 'logits' or 'loss'")
