import pytest
import torch
from conftest import mlp, tiny_cnn

from leantrain import env
from leantrain.config import PlanConfig
from leantrain.errors import LeantrainError
from leantrain.run import plan as run_plan
from leantrain.run.plan import resolve_plan


@pytest.fixture
def three_gpus(monkeypatch):
    monkeypatch.setattr(env, "cuda_free_memory", lambda: [2 * 2**30, 9 * 2**30, 5 * 2**30])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_auto_picks_the_gpu_with_most_free_memory(three_gpus):
    choice = run_plan.select_device("auto")
    assert choice.device == torch.device("cuda", 1) and "most free memory" in choice.reason


def test_cuda_visible_devices_means_the_user_chose(three_gpus, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert run_plan.select_device("auto").device == torch.device("cuda", 0)


def test_cpu_when_no_gpu(monkeypatch):
    monkeypatch.setattr(env, "cuda_free_memory", lambda: [])
    monkeypatch.setattr(env, "mps_available", lambda: False)
    assert run_plan.select_device("auto").device.type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_explicit_cuda_without_gpu_is_an_error_not_a_fallback():
    with pytest.raises(LeantrainError, match="has 0 CUDA device"):
        run_plan.select_device("cuda")
    with pytest.raises(LeantrainError, match="not a device"):
        run_plan.select_device("tpu9")


def test_plan_reports_every_technique_with_a_reason():
    plan = resolve_plan(PlanConfig(device="cpu"), tiny_cnn())
    names = [o.name for o in plan.outcomes]
    assert names == ["device", "precision", "channels_last", "compile", "compile_mode",
                     "cudnn_benchmark", "tf32", "optimizer_impl", "optimizer_states",
                     "optimizer_offload", "grad_accum",
                     "activation_checkpointing", "fused_cross_entropy", "distributed"]
    assert all(o.detail for o in plan.outcomes)
    assert plan.channels_last is True
    assert plan.precision == ("bf16" if env.bf16_supported(torch.device("cpu"))[0] else "fp32")


def test_auto_skips_what_cannot_help_and_explicit_requests_fail_loudly():
    plan = resolve_plan(PlanConfig(device="cpu"), mlp())
    cl = next(o for o in plan.outcomes if o.name == "channels_last")
    assert not cl.applied and "no 2-D convolutions" in cl.detail
    with pytest.raises(LeantrainError, match="plan.channels_last: cannot be applied"):
        resolve_plan(PlanConfig(device="cpu", channels_last=True), mlp())
    with pytest.raises(LeantrainError, match="plan.precision 'fp16'"):
        resolve_plan(PlanConfig(device="cpu", precision="fp16"), mlp())
    with pytest.raises(LeantrainError, match="plan.tf32"):
        resolve_plan(PlanConfig(device="cpu", tf32=True), mlp())
