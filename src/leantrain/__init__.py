"""leantrain: faster, smaller, cheaper PyTorch training, with every gain measured.

The public API is small: `fit` trains with a plan, `TrainConfig`/`load_config` describe a run,
`resolve_plan` shows what a plan would do here, `evaluate` scores a model, `prepare` applies
the plan to a hand-written loop, and each technique under `leantrain.techniques` is a plain
function usable in such a loop.

The names are imported on first use, so the command line's `--help` imports no torch.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "TrainConfig": "config", "load_config": "config", "LeantrainError": "errors",
    "resolve_plan": "run.plan", "build": "run.plan", "fit": "run.fit",
    "evaluate": "run.step", "prepare": "run.prepare", "TensorDictDataset": "data.loaders",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
