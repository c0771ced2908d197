"""Each runtime technique: lossless ones match the plain path within a stated tolerance."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import blobs, mlp, tiny_cnn
from torch import nn

from leantrain.config import OptimConfig, ScheduleConfig
from leantrain.errors import LeantrainError
from leantrain.techniques import (
    PLANNED,
    REGISTRY,
    accumulation,
    clipping,
    cudnn_benchmark,
    precision,
    schedules,
    tf32,
)
from leantrain.techniques.base import Context
from leantrain.techniques.compile import apply_compile, unwrap
from leantrain.techniques.init import init_weights
from leantrain.techniques.memory_format import apply_channels_last, to_channels_last
from leantrain.techniques.optimizer import build_optimizer
from leantrain.techniques.optimizer import check as optimizer_check
from leantrain.techniques.schedules import build_scheduler, lr_multiplier

CPU = torch.device("cpu")
CPU_CTX = Context(CPU, tiny_cnn())


def test_registry_follows_the_contract():
    for name, module in REGISTRY.items():
        assert module.NAME == name
        assert isinstance(module.LOSSLESS, bool)
        assert module.VARIANTS or module.BENCH_NOTE, f"{name}: how does the bench treat it?"
        assert module.__doc__ and len(module.__doc__) > 100, f"{name} needs a docstring"
    for module in PLANNED:  # the techniques the plan decides: one check, one decide
        assert callable(module.check) and callable(module.decide)


def _train_losses(model, opt, steps=5, cl=False):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 1, 12, 12, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    losses = []
    for _ in range(steps):
        inp = to_channels_last(x) if cl else x
        loss = F.cross_entropy(model(inp), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_channels_last_is_lossless():
    plain = tiny_cnn()
    fast = apply_channels_last(copy.deepcopy(plain))
    assert fast[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(4, 1, 12, 12)
    torch.testing.assert_close(fast(to_channels_last(x)), plain(x), rtol=1e-5, atol=1e-5)
    a = _train_losses(plain, torch.optim.SGD(plain.parameters(), lr=0.1))
    b = _train_losses(fast, torch.optim.SGD(fast.parameters(), lr=0.1), cl=True)
    assert a == pytest.approx(b, rel=1e-5)


def test_to_channels_last_passes_other_ranks_through():
    x = torch.randn(3, 4)
    assert to_channels_last(x) is x


@pytest.mark.parametrize("name", ["sgd", "adamw", "adam"])
@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_optimizer_impls_match_for_loop(name, impl):
    if not optimizer_check(CPU_CTX, impl)[0]:
        pytest.skip(f"{impl} not available on CPU in this torch")
    cfg = OptimConfig(name=name, lr=0.05)
    ref, fast = tiny_cnn(), tiny_cnn()
    a = _train_losses(ref, build_optimizer(ref.parameters(), cfg, "for-loop"))
    b = _train_losses(fast, build_optimizer(fast.parameters(), cfg, impl))
    assert a == pytest.approx(b, rel=1e-5)
    for p, q in zip(ref.parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_grad_accumulation_equals_large_batch_gradient():
    x, y = blobs(64)
    big, small = mlp(), mlp()
    F.cross_entropy(big(x), y).backward()
    accum = 4
    for chunk_x, chunk_y in zip(x.chunk(accum), y.chunk(accum), strict=True):
        accumulation.scale_loss(F.cross_entropy(small(chunk_x), chunk_y), accum).backward()
    for p, q in zip(big.parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


def test_step_boundaries():
    assert [accumulation.is_step_boundary(i, 3, i == 6) for i in range(7)] == [
        False, False, True, False, False, True, True]


def test_clipping_bounds_the_norm_and_returns_the_original():
    model = mlp()
    x, y = blobs(32)
    (F.cross_entropy(model(x), y) * 100).backward()
    before = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    total = clipping.clip_gradients(model, opt, max_norm=1.0)
    after = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))
    torch.testing.assert_close(total, before)
    assert after.item() == pytest.approx(1.0, rel=1e-4)
    grads = [p.grad.clone() for p in model.parameters()]
    clipping.clip_gradients(model, opt, max_norm=1e6)  # below threshold: unchanged
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)


def test_bf16_autocast_close_to_fp32_and_fp16_needs_a_gpu():
    ok, reason = precision.check(CPU_CTX, "fp16")
    assert not ok and "GPU" in reason
    assert precision.make_grad_scaler(CPU, "bf16") is None
    model, x = tiny_cnn(), torch.randn(8, 1, 12, 12)
    with precision.autocast(CPU, "bf16"):
        low = model(x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), model(x), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("scheme", ["kaiming", "xavier", "orthogonal", "dirac"])
def test_init_schemes_reinitialise_and_zero_biases(scheme):
    model = tiny_cnn()
    before = model[0].weight.clone()
    init_weights(model, scheme)
    assert not torch.equal(before, model[0].weight)
    assert all(torch.all(m.bias == 0) for m in model.modules() if isinstance(m, nn.Conv2d))


def test_dirac_init_makes_a_conv_an_identity():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    init_weights(conv, "dirac")
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(conv(x), x)


def test_orthogonal_init_gives_orthonormal_rows():
    layer = init_weights(nn.Linear(16, 8), "orthogonal")
    torch.testing.assert_close(layer.weight @ layer.weight.T, torch.eye(8), atol=1e-5, rtol=0)


def test_unknown_init_scheme():
    with pytest.raises(LeantrainError, match="not one of"):
        init_weights(mlp(), "lecun")


@pytest.mark.parametrize("name", ["constant", "step", "cosine", "onecycle", "wsd"])
def test_schedules_warm_up_then_follow_their_shape(name):
    cfg = ScheduleConfig(name=name, warmup_fraction=0.1, step_size=30, gamma=0.5)
    m = [lr_multiplier(s, cfg, 100, 10) for s in range(100)]
    assert m[:10] == sorted(m[:10]) and m[9] == pytest.approx(1.0)  # linear warmup to 1
    if name == "constant":
        assert set(m[10:]) == {1.0}
    elif name == "step":
        assert m[39] == 1.0 and m[40] == 0.5 and m[70] == 0.25
    elif name != "wsd":
        assert m[10:] == sorted(m[10:], reverse=True)
        assert m[-1] < 1e-3
    if name == "onecycle":
        assert m[0] == pytest.approx(1 / 25 + (1 - 1 / 25) / 10)
    if name == "wsd":  # the peak held until the last 20% of steps, then linear to zero
        assert set(m[10:81]) == {1.0} and m[81] < 1 and m[-1] == pytest.approx(1 / 20)
    assert max(m) <= 1.0  # optim.lr is the peak: no schedule exceeds it


def test_the_schedule_is_described_and_the_default_says_where_it_comes_from():
    assert schedules.describe(ScheduleConfig()) == ("constant: no warm-up, then the peak lr "
                                                    "throughout (the default, from "
                                                    "benchmarks/schedules.py)")
    assert schedules.describe(ScheduleConfig(name="wsd", warmup_fraction=0.05)) == \
        "wsd: 5% linear warm-up, then the peak lr, linear decay to zero over the last 20%"


def test_scheduler_state_resumes_exactly():
    cfg = ScheduleConfig(name="cosine", warmup_fraction=0.2)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = build_scheduler(opt, cfg, 50, 5)
    for _ in range(17):
        opt.step()
        sched.step()
    state_opt, state_sched = opt.state_dict(), sched.state_dict()
    opt2 = torch.optim.SGD(mlp().parameters(), lr=1.0)
    sched2 = build_scheduler(opt2, cfg, 50, 5)
    opt2.load_state_dict(state_opt)
    sched2.load_state_dict(state_sched)
    for _ in range(5):
        opt.step()
        sched.step()
        opt2.step()
        sched2.step()
    assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]


def test_backend_flags_are_cuda_only_and_restored():
    ok, reason = tf32.check(CPU_CTX)
    assert not ok and "CUDA" in reason
    assert not cudnn_benchmark.check(CPU_CTX)[0]
    saved = torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32
    with cudnn_benchmark.enabled(not saved[0]), tf32.enabled(not saved[1]):
        assert torch.backends.cudnn.benchmark is (not saved[0])
        assert torch.backends.cuda.matmul.allow_tf32 is (not saved[1])
    assert (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32) == saved


def test_autocast_takes_a_device_name_too():
    with precision.autocast("cpu", "bf16"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16


@pytest.mark.slow
def test_compile_is_lossless_and_keeps_plain_state_dict_keys():
    model = mlp()
    compiled = apply_compile(model)
    x = torch.randn(8, 8)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert unwrap(compiled) is model
    assert list(unwrap(compiled).state_dict()) == list(mlp().state_dict())


def test_kernels_and_layout_switched_mid_run_keep_the_state_and_step_as_before():
    """The switches `run.deciding` makes between two steps: the same parameters and optimizer
    state, so the run goes on exactly (to float rounding) as one that never switched."""
    from leantrain.techniques.memory_format import switch_layout
    from leantrain.techniques.optimizer import switch_kernels

    def model_and_optimizer():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3),
                                    torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 2))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)

    switched, opt = model_and_optimizer()
    plain, plain_opt = model_and_optimizer()
    x = torch.randn(4, 3, 8, 8)
    for step in range(6):
        for m, o in ((switched, opt), (plain, plain_opt)):
            o.zero_grad()
            m(x.contiguous(memory_format=torch.channels_last) if m is switched and 2 <= step < 4
              else x).square().mean().backward()
            o.step()
        if step == 1:
            switch_kernels(opt, "foreach")
            switch_layout(switched, opt, True)
            weight = switched[1].weight
            assert opt.param_groups[0]["foreach"] and not opt.param_groups[0]["fused"]
            assert not weight.is_contiguous() and opt.state[weight]["exp_avg"].stride() == \
                weight.stride()
        if step == 3:
            switch_kernels(opt, "fused")
            switch_layout(switched, opt, False)
            assert switched[1].weight.is_contiguous() and opt.param_groups[0]["fused"]
    for a, b in zip(switched.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert int(opt.state[switched[1].weight]["step"]) == 6
    with pytest.raises(LeantrainError, match="unknown implementation"):
        switch_kernels(opt, "fastest")
