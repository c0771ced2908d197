"""The bench layer: timed trials of plans through the trainer's real step (`search`, `trials`),
the batch-size and learning-rate finders, and doctor's profile. It sits above the run layer
(it drives `Trainer.steps` over a `Run`) and below the commands.

The names below are imported on first use, so `bench.tolerances` costs the CLI no torch.
"""

import importlib

_EXPORTS = {"BatchSizeResult": "batch_size", "find_batch_size": "batch_size",
            "LRFinderResult": "lr_finder", "find_lr": "lr_finder",
            "BenchResult": "search", "run_bench": "search"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
