"""Liger's fused linear cross-entropy (`plan.fused_cross_entropy`): refused with the reason
where it cannot run (off CUDA, without liger-kernel, on a model type Liger does not patch),
and, where it can, the model's loss patched and nothing else."""

import sys
import types

import pytest
import torch
from conftest import refused_on_this_machine

pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from leantrain.config import PlanConfig  # noqa: E402
from leantrain.errors import LeantrainError  # noqa: E402
from leantrain.run.plan import resolve_plan  # noqa: E402
from leantrain.techniques import REGISTRY, fused_cross_entropy  # noqa: E402
from leantrain.techniques.base import Context  # noqa: E402


def _llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=2))


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2))


def _cuda(model) -> Context:
    return Context(torch.device("cuda"), model, "adamw")


@pytest.fixture
def fake_liger(monkeypatch):
    """Liger's patch table, as liger-kernel ships it (llama there, gpt2 not), recording calls."""
    calls = []

    def apply_liger_kernel_to_llama(rope=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True, rms_norm=True, swiglu=True,
                                    model=None):
        calls.append({"rope": rope, "cross_entropy": cross_entropy, "rms_norm": rms_norm,
                      "fused_linear_cross_entropy": fused_linear_cross_entropy,
                      "swiglu": swiglu, "model": model})

    patch = types.ModuleType("liger_kernel.transformers.monkey_patch")
    patch.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": apply_liger_kernel_to_llama}
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", patch)
    return calls


def test_off_cuda_it_is_refused_naming_the_reason_and_the_bench_lists_it():
    ok, why = fused_cross_entropy.check(Context(torch.device("cpu"), _llama()))
    assert not ok and "Triton kernels for CUDA GPUs; this device is cpu" in why
    with pytest.raises(LeantrainError, match="plan.fused_cross_entropy: cannot be applied"):
        resolve_plan(PlanConfig(device="cpu", fused_cross_entropy=True), _llama())
    assert REGISTRY["fused_cross_entropy"].VARIANTS[0].overrides == {
        "plan": {"fused_cross_entropy": True}}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a CUDA GPU")
def test_asking_for_it_here_exits_2_with_one_line(tmp_path, capsys):
    why = refused_on_this_machine(capsys, tmp_path, "--set", "plan.fused_cross_entropy=true")
    assert "Triton kernels for CUDA GPUs" in why


def test_without_liger_installed_the_reason_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # import fails
    ok, why = fused_cross_entropy.check(_cuda(_llama()))
    assert not ok and "pip install 'leantrain[liger]'" in why


def test_only_model_types_liger_patches_qualify(fake_liger):
    assert fused_cross_entropy.check(_cuda(_llama()))[0]
    ok, why = fused_cross_entropy.check(_cuda(_gpt2()))
    assert not ok and "model type 'gpt2'" in why
    ok, why = fused_cross_entropy.check(_cuda(torch.nn.Linear(4, 4)))
    assert not ok and "config.model_type" in why


def test_applying_it_patches_the_loss_of_this_instance_and_nothing_else(fake_liger):
    model = _llama()
    assert fused_cross_entropy.apply_fused_cross_entropy(model) is model
    (call,) = fake_liger
    assert call["model"] is model and call["fused_linear_cross_entropy"]
    assert not (call["rope"] or call["rms_norm"] or call["swiglu"] or call["cross_entropy"])
