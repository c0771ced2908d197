"""The run's model in the layout the Hugging Face ecosystem loads: beside `model.pt` (a plain
state_dict for `load_state_dict`), a Hugging Face model gets `pretrained/` (config and
safetensors, for `AutoModel...from_pretrained(DIR)`) and a PEFT model `adapter/` (the
adapter's config and weights, for `PeftModel.from_pretrained(base, DIR)`). A LoRA run's
`model.pt` holds the whole PEFT state dict, frozen base included, which PEFT cannot read.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from ..checkpoint import atomic_folder
from .step import plain_module

log = logging.getLogger(__name__)

PRETRAINED_DIR = "pretrained"
ADAPTER_DIR = "adapter"


def is_peft(model: nn.Module) -> bool:
    return hasattr(plain_module(model), "peft_config")


def folder_name(model: nn.Module) -> str | None:
    """`adapter` for a PEFT model, `pretrained` for a Hugging Face model, else None."""
    model = plain_module(model)
    if is_peft(model):
        return ADAPTER_DIR
    if callable(getattr(model, "save_pretrained", None)) and hasattr(model, "config"):
        return PRETRAINED_DIR
    return None


def _user_class(model: nn.Module) -> type:
    """The model's own class: FSDP2 makes a sharded model an instance of a class of its own
    (FSDPLlamaForCausalLM, subclassing FSDPModule and the model's), which no one loads."""
    cls = type(model)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # (a torch without distributed)
        return cls
    if isinstance(model, FSDPModule):
        return next((b for b in cls.__bases__ if b is not FSDPModule), cls)
    return cls


def write_pretrained(model: nn.Module, weights: dict[str, Any], out_dir: Path) -> str | None:
    """The model's `save_pretrained` folder in `out_dir`, from `weights` (the full state_dict,
    as gathered for model.pt), written whole or not at all; returns its name, or None for a
    model with no `save_pretrained`."""
    name = folder_name(model)
    if name is None:
        return None
    plain = plain_module(model)
    atomic_folder(out_dir / name, lambda tmp: plain.save_pretrained(str(tmp), state_dict=weights))
    how = "PeftModel.from_pretrained(base_model, DIR)" if name == ADAPTER_DIR \
        else f"{_user_class(plain).__name__}.from_pretrained(DIR)"
    log.info("%s: load it with %s", out_dir / name, how)
    return name
