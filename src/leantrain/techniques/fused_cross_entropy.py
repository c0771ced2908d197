"""Fused linear cross-entropy: a language model's output projection and its loss in one
chunked kernel (Liger Kernel), so the logits are never materialised.

For a causal LM the logits are batch x sequence x vocabulary: at a 128 k vocabulary and 8 k
tokens per micro-batch, 4 GiB in bf16 and as much again for their gradient, often the largest
tensor of the step. Liger's `LigerFusedLinearCrossEntropy` computes the projection and the loss
chunk by chunk and writes the hidden states' gradient in the same pass. That frees memory
(bigger micro-batches) and saves a round trip through HBM; on small vocabularies it can be
slower than the unfused pair, so measure it (`leantrain bench` lists it). Lossless up to float
rounding. Training forwards return no logits (the step's token accuracy is then not tallied);
evaluation computes them as usual.

It applies to the Hugging Face causal LMs Liger patches (Llama, Mistral, Qwen, Gemma, Phi,
...; `liger_kernel.transformers.monkey_patch`), instance by instance, and only the loss: RoPE,
RMSNorm and SwiGLU stay as the model has them. Its kernels are Triton kernels for CUDA GPUs.
Optional dependency: `pip install "leantrain[liger]"`. "auto" (the default) is off by this rule
and taken where `run.defaults` measured it faster on the run (CUDA, Liger installed, a causal LM
Liger patches).
"""

from __future__ import annotations

import inspect

from torch import nn

from ..config import PlanConfig
from .base import Context, Outcome, switch
from .variant import Variant

NAME = "fused_cross_entropy"
LOSSLESS = True
VARIANTS = (Variant("Liger fused linear cross-entropy",
                    {"plan": {"fused_cross_entropy": True}}),)


def _patches() -> dict:
    """Liger's patch function per Hugging Face model type."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return MODEL_TYPE_TO_APPLY_LIGER_FN


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def check(ctx: Context, value: bool = True) -> tuple[bool, str]:
    if ctx.device.type != "cuda":
        return False, (f"Liger's kernels are Triton kernels for CUDA GPUs; this device is "
                       f"{ctx.device.type}")
    try:
        patches = _patches()
    except ImportError as exc:
        return False, f"liger-kernel is not installed (pip install 'leantrain[liger]'): {exc}"
    kind = _model_type(ctx.model)
    if kind is None:
        return False, ("Liger patches Hugging Face causal LMs by their config.model_type; "
                       "this model has none")
    if kind not in patches:
        return False, f"Liger has no fused cross-entropy for model type {kind!r}"
    return True, f"Liger's fused linear cross-entropy for {kind}"


def decide(ctx: Context, plan: PlanConfig) -> tuple[bool, Outcome]:
    """The rule for "auto" is off: whether it pays depends on the vocabulary and the batch, so
    it is measured (`run.defaults`; the bench lists it too)."""
    return switch(NAME, plan.fused_cross_entropy, False, check(ctx))


def apply_fused_cross_entropy(model: nn.Module) -> nn.Module:
    """Patch this model instance's forward to Liger's fused loss (nothing else), in place."""
    patch = _patches()[_model_type(model)]
    accepted = inspect.signature(patch).parameters
    others = {k: False for k in accepted if k not in ("model", "fused_linear_cross_entropy")
              and accepted[k].default is True}  # Liger's other kernels default to on
    patch(model=model, fused_linear_cross_entropy=True, **others)
    return model
