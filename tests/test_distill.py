import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import mlp
from torch.utils.data import TensorDataset

from leantrain import fit, load_config
from leantrain.cli import main
from leantrain.errors import LeantrainError
from leantrain.losses.distillation import (
    DistillationLoss,
    cache_teacher_logits,
    freeze_teacher,
    kd_loss,
)

S = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
T_LOGITS = torch.tensor([[3.0, 1.0, -2.0], [-1.0, 0.0, 2.0]])
Y = torch.tensor([0, 2])


def _hand_kl(s, t, temp):
    """KL(p_t || p_s) per sample, averaged, written out with plain sums."""
    total = 0.0
    for srow, trow in zip(s.tolist(), t.tolist(), strict=True):
        ps = [math.exp(v / temp) for v in srow]
        pt = [math.exp(v / temp) for v in trow]
        ps = [v / sum(ps) for v in ps]
        pt = [v / sum(pt) for v in pt]
        total += sum(a * math.log(a / b) for a, b in zip(pt, ps, strict=True))
    return total / len(s)


def _hand_ce(s, y):
    return sum(-math.log(math.exp(row[c]) / sum(math.exp(v) for v in row))
               for row, c in zip(s.tolist(), y.tolist(), strict=True)) / len(y)


@pytest.mark.parametrize("temp, alpha", [(1.0, 0.5), (4.0, 0.9), (2.0, 0.0), (8.0, 1.0)])
def test_kd_loss_equals_a_hand_computation(temp, alpha):
    expected = alpha * temp**2 * _hand_kl(S, T_LOGITS, temp) + (1 - alpha) * _hand_ce(S, Y)
    assert kd_loss(S, T_LOGITS, Y, temp, alpha).item() == pytest.approx(expected, rel=1e-5)


def test_t_squared_keeps_soft_gradients_on_the_hard_scale():
    """Without T², soft-target gradients shrink as 1/T²; with it they stay O(1) as T grows."""
    norms = {}
    for temp in (2.0, 8.0, 32.0):
        s = S.clone().requires_grad_(True)
        kd_loss(s, T_LOGITS, Y, temp, alpha=1.0).backward()
        norms[temp] = s.grad.norm().item()
    unscaled = {t: n / t**2 for t, n in norms.items()}
    assert unscaled[32.0] < unscaled[2.0] / 100  # the raw KL gradient collapses
    assert norms[32.0] == pytest.approx(norms[8.0], rel=0.1)  # the T²-scaled one converges


@pytest.mark.parametrize("kwargs, fragment", [
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"temperature": -1.0}, "temperature must be > 0"),
    ({"alpha": 1.5}, "alpha must be in [0, 1]"),
    ({"alpha": -0.1}, "alpha must be in [0, 1]"),
])
def test_bad_kd_arguments(kwargs, fragment):
    with pytest.raises(LeantrainError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        kd_loss(S, T_LOGITS, Y, **kwargs)


def test_student_and_teacher_shapes_must_match():
    with pytest.raises(LeantrainError, match=r"student output shape \(2, 3\) differs.*\(2, 4\)"):
        kd_loss(S, torch.zeros(2, 4), Y)


def test_teacher_is_frozen_through_training(tabular):
    teacher = mlp()
    fit(teacher, *tabular, load_config(None, ["plan.device=cpu", "train.epochs=2"]),
        progress_bar=False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = load_config(None, ["plan.device=cpu", "train.epochs=2", "data.batch_size=32"])
    loss = DistillationLoss(teacher, temperature=4.0, alpha=0.9)
    summary = fit(mlp(), *tabular, cfg, progress_bar=False, loss_fn=loss)
    assert summary["steps"] > 0
    assert not teacher.training
    for name, param in teacher.named_parameters():
        assert param.grad is None and not param.requires_grad, name
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_cached_logits_give_exactly_the_live_teachers_loss(tabular):
    train, _ = tabular
    teacher = freeze_teacher(mlp())
    cached = cache_teacher_logits(teacher, train, batch_size=len(train))
    x, y, logits = cached.tensors
    loss = DistillationLoss(teacher, 3.0, 0.7)
    student_out = mlp()(x)
    assert torch.equal(loss(student_out, y, x, logits), loss(student_out, y, x))
    with pytest.raises(LeantrainError, match="tensor-backed"):
        cache_teacher_logits(teacher, [(x[0], y[0])])


def test_distill_cli_reports_all_three(tmp_path):
    teacher = tmp_path / "teacher"
    assert main(["train", "--out", str(teacher), "--no-progress", "--epochs", "2"]) == 0
    out = tmp_path / "kd"
    assert main(["distill", "--teacher", str(teacher / "model.pt"), "--student-model",
                 "leantrain.recipes.models:digits_student", "--epochs", "2", "--out", str(out),
                 "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    for name in ("teacher", "student_alone", "student_kd"):
        assert {"val_accuracy", "parameters", "cpu_latency_batch64_ms"} <= report[name].keys()
    assert report["teacher"]["parameters"] >= 4 * report["student_kd"]["parameters"]
    assert (out / "student_kd" / "model.pt").exists()


def test_mismatched_teacher_checkpoint_is_a_clear_error(tmp_path, capsys):
    ckpt = tmp_path / "wrong.pt"
    torch.save({"weight": torch.zeros(2, 2)}, ckpt)
    out = tmp_path / "kd"
    assert main(["distill", "--teacher", str(ckpt), "--student-model",
                 "leantrain.recipes.models:digits_student", "--out", str(out)]) == 2
    assert "does not match the teacher model" in capsys.readouterr().err
    assert not out.exists()


def test_loss_fn_receives_cached_extras_through_the_loader(tabular):
    train, val = tabular
    teacher = freeze_teacher(mlp())
    cached = cache_teacher_logits(teacher, train)
    seen = []

    def spy(outputs, targets, inputs, *extras):
        seen.append(len(extras))
        return F.cross_entropy(outputs, targets)

    fit(mlp(), cached, val, load_config(None, ["plan.device=cpu", "train.epochs=1"]),
        progress_bar=False, loss_fn=spy)
    assert seen and set(seen) == {1}
    assert isinstance(cached, TensorDataset) and len(cached.tensors) == 3
