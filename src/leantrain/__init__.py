"""leantrain: faster, smaller, cheaper PyTorch training, with every gain measured.

The public API is small: `fit` trains with a plan, `TrainConfig`/`load_config` describe a run,
`resolve_plan` shows what a plan would do here, and each technique under
`leantrain.techniques` is a plain function usable in a hand-written loop.
"""

__version__ = "0.1.0"

from .config import TrainConfig, load_config  # noqa: E402
from .errors import LeantrainError  # noqa: E402
from .plan import resolve_plan  # noqa: E402
from .trainer import evaluate, fit  # noqa: E402

__all__ = ["LeantrainError", "TrainConfig", "evaluate", "fit", "load_config", "resolve_plan"]
