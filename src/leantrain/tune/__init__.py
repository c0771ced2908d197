"""`leantrain tune`: Optuna studies of a recipe, each trial a real leantrain run."""

DEFAULT_STUDY = "leantrain-tune"  # (here: the parser names it, and must not import torch)
