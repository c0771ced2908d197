"""Named, ready-to-run setups: a model builder plus the config that trains it well.

Importing this module imports no torch (the CLI lists the recipes in `--help`); a recipe's
model modules are imported when it builds its model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import STDLIB, TrainConfig
from ..errors import LeantrainError


def _small_cnn(num_classes: int, cfg: TrainConfig):
    from .models import SmallCNN

    return SmallCNN(1, num_classes)


def _separable_cnn(num_classes: int, cfg: TrainConfig):
    from ..compress.separable import to_separable

    return to_separable(_small_cnn(num_classes, cfg), norm=True, activation=True)[0]


def _gpt(num_classes: int, cfg: TrainConfig):
    from .gpt import GPT

    return GPT(num_classes, cfg.data.context or 128, cfg.gpt.depth, cfg.gpt.width,
               cfg.gpt.heads, cfg.gpt.tie_weights)


# the settings a recipe tuned for its own model: a run of the user's model (--model) keeps the
# recipe's data but not these (config.py's defaults, the evidence-backed ones, apply instead)
TUNED_SECTIONS = ("optim", "schedule", "train")

# the digits recipes' tuned training, explicit (the config defaults are for the user's model)
DIGITS_TRAINING = {"optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True,
                             "weight_decay": 5e-4},
                   "schedule": {"name": "onecycle", "warmup_fraction": 0.25}}


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    build_model: Callable[[int, TrainConfig], Any]  # (num_classes, config) -> nn.Module
    config: dict[str, Any] = field(default_factory=dict)
    text: bool = False  # a language model: builds for any byte-text source (data.context set)

    def untuned(self) -> dict[str, Any]:
        """The recipe's config without the training it tuned for its own model."""
        return {k: v for k, v in self.config.items() if k not in TUNED_SECTIONS}


RECIPES = {
    r.name: r
    for r in [
        Recipe(
            "digits-cnn",
            "SmallCNN on scikit-learn's digits (32×32), SGD+nesterov, one-cycle, 8 epochs",
            _small_cnn,
            {"data": {"source": "digits"}, **DIGITS_TRAINING},
        ),
        Recipe(
            "digits-separable",
            "digits-cnn with its 3×3 convs (past the first) depthwise-separable, MobileNet "
            "style (BatchNorm + ReLU between depthwise and pointwise)",
            _separable_cnn,
            {"data": {"source": "digits"}, **DIGITS_TRAINING},
        ),
        Recipe(
            "text-gpt",
            "a byte-level GPT (by default 1.8 M parameters: 4 blocks, width 192, context 128; "
            "the gpt.* keys size it) on the Python standard library's sources; AdamW, "
            "warmup + cosine, bf16 where native",
            _gpt,
            {"data": {"source": STDLIB, "context": 128, "batch_size": 32,
                      "eval_batch_size": 64, "max_bytes": 2_000_000},
             "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.1},
             "schedule": {"name": "cosine", "warmup_fraction": 0.05},
             "train": {"epochs": 2, "clip_norm": 1.0, "log_every": 20}},
            text=True,
        ),
    ]
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise LeantrainError(f"unknown recipe {name!r}; available: {', '.join(RECIPES)}")
    return RECIPES[name]
