"""Whether a compression stage is worth applying, judged against the stage before it.

A stage is **harmful** when it makes the model slower (latency at batch 64, compiled where the
stage is measured compiled) or bigger (file), or costs more than `max_drop`: accuracy points
where the task has an accuracy, else a relative rise of the validation loss (regression,
language models, a model's own loss); **not
worth it** when it makes the model neither smaller nor faster by `MIN_GAIN`; otherwise
**keep**. Speed is judged on the paired, interleaved rounds of the stage against the model
before it (`measure.latency.paired_speedup`): faster or slower by `MIN_GAIN` only when the
whole 95% interval is. Two single latency figures (the fallback) count as equal within
`MIN_GAIN`.
"""

from __future__ import annotations

from typing import Any

MIN_GAIN = 0.05  # a smaller file or a lower latency counts from 5%
KEEP, NOT_WORTH_IT, HARMFUL = "keep", "not worth it", "harmful"


def _latency(stage: dict[str, Any]) -> tuple[float, str]:
    """The stage's latency to judge by: compiled when measured compiled (that is how int8
    pays on CPU), else eager."""
    if stage.get("latency_compiled_b64_ms") is not None:
        return stage["latency_compiled_b64_ms"], "compiled b64"
    return stage["latency_b64_ms"], "b64"


def _before_latency(stage: dict[str, Any], before: dict[str, Any]) -> float:
    if stage.get("latency_compiled_b64_ms_before") is not None:
        return stage["latency_compiled_b64_ms_before"]
    return before["latency_b64_ms"]


def _speed(stage: dict[str, Any], before: dict[str, Any]) -> tuple[bool, bool, str]:
    """(faster, slower, how much) by MIN_GAIN: from the paired rounds' interval when the stage
    was paired with the model before it (faster or slower only when the whole interval is),
    else from the two latency figures."""
    paired = stage.get("speedup_b64")
    if paired is not None:
        low, high = paired["interval"] or (1.0, 1.0)  # no interval: neither, beyond noise
        text = (f"{paired['ratio']:.2f}x the speed of the stage before (95% "
                + (f"{low:.2f}-{high:.2f}" if paired["interval"] else "n/a")
                + f", {paired['rounds']} paired rounds, {paired['kind']})")
        return low > 1 / (1 - MIN_GAIN), high < 1 / (1 + MIN_GAIN), text
    latency, kind = _latency(stage)
    was = _before_latency(stage, before)
    return latency < was * (1 - MIN_GAIN), latency > was * (1 + MIN_GAIN), \
        f"{latency:.2f} ms vs {was:.2f} ms ({kind})"


def judge(stage: dict[str, Any], before: dict[str, Any], max_drop: float) -> tuple[str, str]:
    """(verdict, reason) of `stage` against `before`."""
    faster, slower, speed = _speed(stage, before)
    harms = []
    if slower:
        harms.append(f"slower: {speed}")
    if stage["file_bytes"] > before["file_bytes"] * (1 + MIN_GAIN):
        harms.append(f"bigger: {stage['file_bytes']:,} vs {before['file_bytes']:,} bytes")
    drop, quality = _quality_cost(stage, before)
    if drop > max_drop:
        harms.append(f"{quality} {drop:.1%}, more than --max-drop {max_drop:.1%}")
    if harms:
        return HARMFUL, "; ".join(harms)
    smaller = stage["file_bytes"] < before["file_bytes"] * (1 - MIN_GAIN)
    if not (faster or smaller):
        return NOT_WORTH_IT, f"neither {MIN_GAIN:.0%} smaller nor faster ({speed})"
    gains = ([f"faster: {speed}"] if faster else []) + \
        ([f"{before['file_bytes'] / stage['file_bytes']:.2f}x smaller file"] if smaller else [])
    change = f"accuracy {-drop:+.1%}" if quality.startswith("accuracy") else \
        f"validation loss {drop:+.1%}"
    return KEEP, ", ".join(gains) + "; " + change


def _quality_cost(stage: dict[str, Any], before: dict[str, Any]) -> tuple[float, str]:
    """What the stage cost in quality, and how it is counted: accuracy points lost, or the
    validation loss's relative rise where the task has no accuracy."""
    if stage.get("val_accuracy") is not None and before.get("val_accuracy") is not None:
        return before["val_accuracy"] - stage["val_accuracy"], "accuracy falls"
    rise = stage["val_loss"] / max(before["val_loss"], 1e-12) - 1
    return rise, "validation loss rises"


def judge_all(stages: list[dict[str, Any]], max_drop: float) -> list[dict[str, Any]]:
    """Each stage after the first with its `verdict` and `why` (the first is the reference)."""
    stages[0]["verdict"], stages[0]["why"] = "reference", "the trained model"
    for before, stage in zip(stages, stages[1:], strict=False):
        stage["verdict"], stage["why"] = judge(stage, before, max_drop)
    return stages
