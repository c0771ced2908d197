"""Learning-rate range test: raise the LR exponentially each step and watch the loss.

The loss falls slowly while the LR is too small, fastest in a useful range, then blows up. The
sweep stops early once the smoothed loss passes `DIVERGE` times its best (or is not finite), so
it spends no steps on a model that has already diverged. The suggestion is the LR where the
smoothed loss falls fastest per decade of LR, found before the loss minimum: always a point of
the sweep. The LR at the minimum divided by ten (a common alternative) is reported as well.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from ..config import TrainConfig, config_from_dict, merge
from ..data import DataBundle
from ..errors import LeantrainError
from ..run.plan import build
from ..run.trainer import Trainer

DIVERGE = 4.0
SMOOTHING = 0.9  # EMA factor (bias-corrected)
RULE = ("steepest descent of the smoothed loss against log(lr), before the loss minimum")


@dataclass
class LRFinderResult:
    lrs: list[float]
    losses: list[float]  # raw, per step
    smoothed: list[float]
    suggestion: float
    rule: str
    min_loss_lr: float
    stopped_early: bool
    stop_reason: str
    lr_min: float
    lr_max: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def suggest(lrs: list[float], smoothed: list[float]) -> float:
    """The LR of steepest descent before the minimum (an LR of the sweep itself)."""
    lowest = min(range(len(smoothed)), key=smoothed.__getitem__)
    if lowest < 2:
        return lrs[lowest]
    slopes = [(smoothed[i + 1] - smoothed[i - 1]) / (math.log(lrs[i + 1]) - math.log(lrs[i - 1]))
              for i in range(1, lowest)]
    return lrs[1 + min(range(len(slopes)), key=slopes.__getitem__)]


def find_lr(build_model: Callable[[], nn.Module], bundle: DataBundle, cfg: TrainConfig,
            overrides: dict[str, Any] | None = None, lr_min: float = 1e-5, lr_max: float = 10.0,
            steps: int = 100) -> LRFinderResult:
    """Sweep from `lr_min` to `lr_max` over at most `steps` optimizer steps (the real step)."""
    if not 0 < lr_min < lr_max:
        raise LeantrainError(f"the LR sweep needs 0 < lr_min < lr_max, got {lr_min}, {lr_max}")
    if steps < 5:
        raise LeantrainError(f"the LR sweep needs at least 5 steps, got {steps}")
    run_cfg = config_from_dict(merge(cfg.to_dict(), overrides or {}))
    trainer = Trainer(build(run_cfg, build_model(), bundle.train, bundle.val,
                            measure_loader=False, collate_fn=bundle.collate_fn),
                      progress_bar=False)

    def lr_at(step: int) -> float:
        return lr_min * (lr_max / lr_min) ** (step / (steps - 1))

    lrs, losses, smoothed, stop_reason = [], [], [], "reached lr_max"
    avg = 0.0
    generator = trainer.steps(lr_at=lr_at)
    try:
        for step, (_, loss) in zip(range(steps), generator, strict=False):
            value = float(loss.detach())  # a host sync per step: fine for a short sweep
            avg = SMOOTHING * avg + (1 - SMOOTHING) * value  # EMA, bias-corrected below
            if not math.isfinite(value) or not math.isfinite(avg):
                stop_reason = f"loss not finite at lr {lr_at(step):.3g}"
                break  # kept out of the curve: a non-finite point has no place on it
            lrs.append(lr_at(step))
            losses.append(value)
            smoothed.append(avg / (1 - SMOOTHING ** (step + 1)))
            if smoothed[-1] > DIVERGE * min(smoothed):
                stop_reason = f"loss diverged ({DIVERGE:g}x its best) at lr {lrs[-1]:.3g}"
                break
    finally:
        generator.close()
    if len(losses) < 3:
        raise LeantrainError(f"the LR sweep diverged within {len(losses)} steps from "
                             f"lr_min={lr_min:g}; lower --lr-min")
    lowest = min(range(len(smoothed)), key=smoothed.__getitem__)
    return LRFinderResult(lrs, losses, smoothed, suggest(lrs, smoothed), RULE,
                          lrs[lowest] / 10, stop_reason != "reached lr_max", stop_reason,
                          lr_min, lr_max)
