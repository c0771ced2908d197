"""How `bench` switches a technique on: a Variant is a config fragment over the baseline plan.

A technique module lists its variants in VARIANTS (e.g. precision: bf16, fp16). A module with
none (it changes what is learned, or buys memory rather than speed) says why in BENCH_NOTE, so
the bench can list it instead of dropping it silently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"plan": {"precision": "bf16"}}
    lossless: bool = True
    # for techniques that change the model itself; such a trial is measured but cannot be
    # written to a plan file, which holds config values only
    wrap_model: Callable[[nn.Module], nn.Module] | None = None

    def keys(self) -> set[str]:
        """The dotted config keys this variant sets: variants sharing one cannot be combined."""
        out: set[str] = set()

        def walk(node: dict[str, Any], prefix: str) -> None:
            for key, value in node.items():
                if isinstance(value, dict):
                    walk(value, f"{prefix}{key}.")
                else:
                    out.add(f"{prefix}{key}")

        walk(self.overrides, "")
        return out or {f"model:{self.name}"}
