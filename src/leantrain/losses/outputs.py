"""What a model returned, read the one way every caller reads it (the step contract)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import LeantrainError


def read_output(out: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(logits, loss) of a tensor, a tuple (a leading 0-d tensor is a loss), a dict or a
    ModelOutput."""
    if isinstance(out, torch.Tensor):
        return out, None
    if isinstance(out, Mapping):
        return out.get("logits"), out.get("loss")
    if isinstance(out, (tuple, list)):
        found = [t for t in out if isinstance(t, torch.Tensor)]
        if found and found[0].dim() == 0:
            return (found[1] if len(found) > 1 else None), found[0]
        return (found[0] if found else None), None
    raise LeantrainError(f"the model returned a {type(out).__name__}; leantrain reads a tensor, "
                         "a tuple, or a dict/ModelOutput with 'logits' or 'loss'")
