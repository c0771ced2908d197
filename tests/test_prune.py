"""Pruning: exact fractions, schedules, finalize, structured channel removal, save/reload."""

import pytest
import torch
from torch import nn

from leantrain.compress.prune import (
    channel_counts,
    finalize,
    load_pruned,
    prune_channels,
    prune_unstructured,
    save_pruned,
    schedule_amounts,
    sparsity,
)
from leantrain.errors import LeantrainError
from leantrain.measure.flops import count_flops
from leantrain.recipes.models import SmallCNN


def _cnn():
    torch.manual_seed(0)
    return SmallCNN(1, 10, width=8)


def test_unstructured_per_layer_zeroes_exactly_the_requested_fraction():
    model = _cnn()
    prune_unstructured(model, 0.3)
    finalize(model)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert int((m.weight == 0).sum()) == round(0.3 * m.weight.numel())


def test_unstructured_global_zeroes_the_fraction_over_all_layers():
    model = _cnn()
    prune_unstructured(model, 0.6, scope="global")
    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d,
                                                                            nn.Linear)))
    assert sparsity(model) == pytest.approx(round(0.6 * total) / total, abs=1e-9)


@pytest.mark.parametrize("schedule", ["iterative", "gradual"])
def test_schedules_reach_the_target_and_finetune_between_steps(schedule):
    targets = schedule_amounts(0.8, schedule, 4)
    assert targets[-1] == pytest.approx(0.8) and targets == sorted(targets)
    if schedule == "gradual":  # cubic: most of the pruning early
        assert targets[0] > 0.8 / 4
    model, calls = _cnn(), []
    prune_unstructured(model, 0.8, schedule=schedule, steps=4,
                       finetune=lambda m, step: calls.append((step, sparsity(m))))
    assert [c[0] for c in calls] == [0, 1, 2, 3]
    assert [c[1] for c in calls] == pytest.approx(targets, abs=0.01)


def test_finalize_leaves_no_masks_or_orig_parameters():
    model = _cnn()
    prune_unstructured(model, 0.5, schedule="iterative", steps=2)
    assert any(k.endswith("_mask") for k in model.state_dict())
    finalize(model)
    keys = list(model.state_dict())
    assert not any(k.endswith(("_orig", "_mask")) for k in keys)
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert sparsity(model) == pytest.approx(0.5, abs=0.01)
    SmallCNN(1, 10, width=8).load_state_dict(model.state_dict())  # plain keys again


def test_structured_pruning_removes_half_the_channels_and_really_shrinks_the_model():
    model = _cnn().eval()
    x = torch.randn(4, 1, 32, 32)
    before_counts = channel_counts(model)
    with torch.no_grad():
        before = count_flops(lambda: model(x))
    prune_channels(model, x[:1], 0.5)
    after_counts = channel_counts(model)
    output = list(after_counts)[-1]
    for name, count in before_counts.items():
        assert after_counts[name] == (count if name == output else count // 2), name
    with torch.no_grad():
        after = count_flops(lambda: model(x))
        assert model(x).shape == (4, 10)
    assert before / after > 3


def test_taylor_importance_uses_gradients_and_prunes(tmp_path):
    model = _cnn()
    x, y = torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,))
    prune_channels(model, x[:1], 0.25, importance="taylor", steps=2,
                   gradient_batches=lambda: [(x, y)])
    assert channel_counts(model)["0"] == 6  # 8 channels, 25% removed in two steps


def test_a_pruned_model_saves_and_reloads_weights_only(tmp_path):
    model = _cnn().eval()
    prune_channels(model, torch.randn(1, 1, 32, 32), 0.5)
    path = tmp_path / "pruned.pt"
    save_pruned(model, path)
    with pytest.raises(RuntimeError, match="size mismatch"):
        SmallCNN(1, 10, width=8).load_state_dict(torch.load(path, weights_only=True))
    again = load_pruned(SmallCNN(1, 10, width=8), path).eval()
    x = torch.randn(3, 1, 32, 32)
    assert torch.equal(again(x), model(x))
    assert channel_counts(again) == channel_counts(model)


@pytest.mark.parametrize("ratio", [0, 1, -0.1, 1.5])
def test_ratios_outside_0_1_are_rejected(ratio):
    with pytest.raises(LeantrainError, match=r"must be in \(0, 1\)"):
        prune_unstructured(_cnn(), ratio)
    with pytest.raises(LeantrainError, match=r"must be in \(0, 1\)"):
        prune_channels(_cnn(), torch.randn(1, 1, 32, 32), ratio)


def test_a_model_with_nothing_to_prune_is_a_clear_error():
    with pytest.raises(LeantrainError, match="nothing to prune"):
        prune_channels(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), torch.randn(1, 4), 0.5)
    with pytest.raises(LeantrainError, match="nothing to prune"):
        prune_unstructured(nn.Sequential(nn.ReLU()), 0.5)


def test_loading_a_pruned_file_into_another_architecture_is_a_clear_error(tmp_path):
    model = _cnn().eval()
    prune_channels(model, torch.randn(1, 1, 32, 32), 0.5)
    save_pruned(model, tmp_path / "p.pt")
    with pytest.raises(LeantrainError, match="has no place in this model|does not fit"):
        load_pruned(nn.Sequential(nn.Linear(4, 2)), tmp_path / "p.pt")


class _TwoOutputs(nn.Module):
    """Class scores, a regression value from a second head, and a penalty on the hidden layer:
    every layer an output reads first keeps its width (a penalty's layer too: pruning is
    conservative there), the layers before them are pruned."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.classes, self.value = nn.Linear(32, 3), nn.Linear(32, 1)

    def forward(self, x):
        h = self.body(x)
        return {"logits": self.classes(h), "value": self.value(h).squeeze(-1),
                "penalty": h.pow(2).mean()}


def test_every_output_head_is_found_and_kept_while_the_layers_before_them_shrink():
    from leantrain.compress.prune import output_heads

    model = _TwoOutputs()
    found = {id(m) for m in output_heads(model, torch.randn(2, 8))}
    assert found == {id(model.classes), id(model.value), id(model.body[2])}
    prune_channels(model.eval(), torch.randn(1, 8), 0.5)
    assert (model.classes.out_features, model.value.out_features) == (3, 1)
    assert model.body[0].out_features == model.body[2].in_features < 32
    out = model(torch.randn(4, 8))
    assert out["logits"].shape == (4, 3) and out["value"].shape == (4,)
