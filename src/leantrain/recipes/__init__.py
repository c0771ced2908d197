"""Named, ready-to-run setups: a model builder plus the config that trains it well."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..compress.separable import to_separable
from ..errors import LeantrainError
from .models import SmallCNN


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    build_model: Callable[[int], nn.Module]  # num_classes -> model
    config: dict[str, Any] = field(default_factory=dict)


RECIPES = {
    r.name: r
    for r in [
        Recipe(
            "digits-cnn",
            "SmallCNN on scikit-learn's digits (32×32), SGD+nesterov, one-cycle, 8 epochs",
            lambda num_classes: SmallCNN(1, num_classes),
            {"data": {"source": "digits"}},
        ),
        Recipe(
            "digits-separable",
            "digits-cnn with its 3×3 convs (past the first) depthwise-separable, MobileNet "
            "style (BatchNorm + ReLU between depthwise and pointwise)",
            lambda num_classes: to_separable(SmallCNN(1, num_classes), norm=True,
                                             activation=True)[0],
            {"data": {"source": "digits"}},
        ),
    ]
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise LeantrainError(f"unknown recipe {name!r}; available: {', '.join(RECIPES)}")
    return RECIPES[name]
