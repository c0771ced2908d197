"""Low-bit optimizer states (torchao's 8-bit and 4-bit Adam/AdamW) as
`plan.optimizer_states`: memory measured, training still converges, refusals say why."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from leantrain import fit, load_config
from leantrain.config import OptimConfig, PlanConfig
from leantrain.errors import LeantrainError
from leantrain.run.plan import resolve_plan
from leantrain.techniques.optimizer import build_optimizer
from leantrain.techniques.optimizer_states import state_bytes


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 256))


def _stepped(states: str):
    model = _mlp()
    optimizer = build_optimizer(model.parameters(), OptimConfig(name="adamw", lr=1e-3), "foreach",
                                states)
    model(torch.randn(4, 256)).square().mean().backward()
    optimizer.step()
    return optimizer


def test_8bit_states_take_at_most_0_3x_and_4bit_at_most_0_2x_of_fp32_adamw():
    fp32 = state_bytes(_stepped("fp32"))
    assert fp32 >= 8 * sum(p.numel() for p in _mlp().parameters())  # two fp32 moments
    assert state_bytes(_stepped("8bit")) <= 0.3 * fp32
    assert state_bytes(_stepped("4bit")) <= 0.2 * fp32


def test_auto_keeps_fp32_moments_and_says_how_to_ask():
    plan = resolve_plan(PlanConfig(device="cpu"), _mlp(), optimizer_name="adamw")
    outcome = next(o for o in plan.outcomes if o.name == "optimizer_states")
    assert plan.optimizer_states == "fp32" and not outcome.applied
    assert "plan.optimizer_states=8bit" in outcome.detail


def test_low_bit_states_for_sgd_are_refused_naming_the_reason():
    with pytest.raises(LeantrainError, match="for Adam and AdamW"):
        resolve_plan(PlanConfig(device="cpu", optimizer_states="8bit"), _mlp(),
                     optimizer_name="sgd")


def test_a_run_with_8bit_adamw_states_learns_as_well_as_fp32_moments():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)
    y = (x[:, 0] > 0).long()
    train, val = TensorDataset(x[:384], y[:384]), TensorDataset(x[384:], y[384:])

    def run(states: str) -> dict:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 2))
        cfg = load_config(None, ["optim.name=adamw", "optim.lr=3e-3", "train.epochs=3",
                                 f"plan.optimizer_states={states}",
                                 "train.monitor_interval_s=0"])
        return fit(model, train, val, cfg, progress_bar=False)

    fp32, low = run("fp32"), run("8bit")
    assert low["val_accuracy"] > 0.75  # chance is 0.5
    assert low["val_accuracy"] >= fp32["val_accuracy"] - 0.05
    assert "8bit" in low["plan"]["outcomes"]["optimizer_states"]


def test_a_checkpoint_with_8bit_states_loads_weights_only_and_restores_the_optimizer(tmp_path):
    """What a resume reads: torchao's state subclasses come back through the weights-only
    loader (allow-listed types), and a fresh 8-bit AdamW takes them."""
    from torchao.optim.subclass_8bit import OptimState8bit

    from leantrain.checkpoint import atomic_save, load_checkpoint

    optimizer = _stepped("8bit")
    atomic_save({"optimizer": optimizer.state_dict()}, tmp_path / "checkpoint.pt")
    loaded = load_checkpoint(tmp_path / "checkpoint.pt")["optimizer"]
    assert any(isinstance(v, OptimState8bit) for s in loaded["state"].values()
               for v in s.values())
    fresh = build_optimizer(_mlp().parameters(), OptimConfig(name="adamw", lr=1e-3),
                            "foreach", "8bit")
    fresh.load_state_dict(loaded)
    assert state_bytes(fresh) == state_bytes(optimizer)


# ---------------------------------------------------------------- bf16 weights and states

BF16_HERE = pytest.mark.skipif(
    not __import__("leantrain.env", fromlist=["x"]).bf16_supported(torch.device("cpu"))[0],
    reason="this CPU has no native bf16: bf16 states are refused here (tested below)")


def test_stochastic_rounding_lets_updates_below_bf16_spacing_add_up():
    """The reason for torchao's AdamW: at 1.0 a bf16 weight moves in steps of 1/128, so a
    1e-3 update rounds away to nearest; rounded stochastically, 20 of them move it ~0.02."""
    from leantrain.techniques.optimizer_states import torchao_optimizer

    def train(stochastic: bool) -> torch.Tensor:
        torch.manual_seed(0)
        w = nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        if stochastic:
            opt = torchao_optimizer([w], "adamw", "bf16", 1e-3, 0.0)
        else:
            opt = torch.optim.AdamW([w], lr=1e-3, weight_decay=0.0)
        for _ in range(20):
            w.grad = torch.ones_like(w)
            opt.step()
        return w.detach().float()

    assert torch.equal(train(False), torch.ones(4096))  # every update rounded away
    moved = 1 - train(True).mean().item()
    assert moved == pytest.approx(20 * 1e-3, rel=0.15)


def test_bf16_states_are_refused_for_sgd_and_without_bf16_autocast():
    with pytest.raises(LeantrainError, match="torchao's AdamW with stochastic rounding"):
        resolve_plan(PlanConfig(device="cpu", optimizer_states="bf16"), _mlp(),
                     optimizer_name="sgd")
    with pytest.raises(LeantrainError, match="bf16 weights|native bf16"):
        resolve_plan(PlanConfig(device="cpu", optimizer_states="bf16", precision="fp32"),
                     _mlp(), optimizer_name="adamw")


@BF16_HERE
def test_a_stock_bert_trains_with_bf16_weights_and_half_the_state_bytes(tmp_path):
    import model_types

    from leantrain.run.plan import build
    from leantrain.run.trainer import Trainer

    train, val = model_types.tagged()

    def stepped(states: str):
        torch.manual_seed(0)
        cfg = load_config(None, ["optim.name=adamw", "optim.lr=3e-3", "train.epochs=4",
                                 f"plan.optimizer_states={states}", "plan.device=cpu",
                                 "train.monitor_interval_s=0", "data.batch_size=32"])
        model = model_types.tagger()
        trainer = Trainer(build(cfg, model, train, val, measure_loader=False),
                          progress_bar=False)
        steps = trainer.steps()
        losses = [next(steps)[1].item() for _ in range(60)]
        steps.close()
        return model, trainer.state.optimizer, losses

    model, optimizer, losses = stepped("bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    _, fp32_optimizer, fp32_losses = stepped("fp32")
    assert state_bytes(optimizer) <= 0.55 * state_bytes(fp32_optimizer)
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10])  # it learns
    assert sum(losses[-10:]) <= 1.15 * sum(fp32_losses[-10:])
