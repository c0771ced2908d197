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
    PER_SAMPLE_DEFAULT,
    PER_TOKEN_DEFAULT,
    DistillationLoss,
    cache_teacher_logits,
    default_kd_args,
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
    ({"temperature": float("inf")}, "temperature must be > 0 and finite"),  # trained to NaN
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
    with pytest.raises(LeantrainError, match=r"only for datasets of \(input, label\) tensors"):
        cache_teacher_logits(teacher, [(x[0], y[0])])


def test_the_defaults_are_the_measured_ones_for_each_kind_of_output():
    assert default_kd_args("classification") == PER_SAMPLE_DEFAULT == (4.0, 0.9)
    for task in ("token-classification", "causal-lm"):
        assert default_kd_args(task) == PER_TOKEN_DEFAULT
    assert PER_TOKEN_DEFAULT != PER_SAMPLE_DEFAULT


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
    # neither given: one score per sample takes the measured per-sample default
    assert (report["temperature"], report["alpha"]) == PER_SAMPLE_DEFAULT
    assert report["defaulted"] == ["temperature", "alpha"]


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


# ------------------------------------------------------------------ any output: per-token KD


def _hand_token_kd(s, t, y, temp, alpha):
    """KL summed over the vocabulary, averaged over the positions whose label is not -100,
    plus the cross-entropy over the same positions: written out with math, one by one."""
    kls, ces = [], []
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if int(y[b, i]) == -100:
                continue
            srow, trow = s[b, i].tolist(), t[b, i].tolist()
            ps = [math.exp(v / temp) for v in srow]
            pt = [math.exp(v / temp) for v in trow]
            ps, pt = [v / sum(ps) for v in ps], [v / sum(pt) for v in pt]
            kls.append(sum(a * math.log(a / c) for a, c in zip(pt, ps, strict=True)))
            ces.append(-math.log(math.exp(srow[int(y[b, i])]) /
                                 sum(math.exp(v) for v in srow)))
    return alpha * temp**2 * sum(kls) / len(kls) + (1 - alpha) * sum(ces) / len(ces)


def test_per_token_kd_matches_a_hand_computation_on_a_2x3x5_example():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    y = torch.tensor([[1, 4, -100], [0, -100, 2]])  # two positions ignored, as the task loss does
    for temp, alpha in ((1.0, 0.5), (4.0, 0.9), (2.0, 1.0)):
        expected = _hand_token_kd(s, t, y, temp, alpha)
        got = kd_loss(s, t, y, temp, alpha, task="token-classification").item()
        assert got == pytest.approx(expected, rel=1e-5)


def test_causal_lm_kd_scores_position_t_against_token_t_plus_1():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 4, 5, generator=g), torch.randn(2, 4, 5, generator=g)
    ids = torch.randint(0, 5, (2, 4), generator=g)  # HF convention: the labels are the inputs
    shifted = kd_loss(s[:, :-1], t[:, :-1], ids[:, 1:], 2.0, 0.7, task="token-classification")
    assert kd_loss(s, t, ids, 2.0, 0.7, task="causal-lm").item() == \
        pytest.approx(shifted.item(), rel=1e-6)


def test_classification_kd_is_unchanged_by_the_generalisation():
    expected = 0.9 * 16 * _hand_kl(S, T_LOGITS, 4.0) + 0.1 * _hand_ce(S, Y)
    assert kd_loss(S, T_LOGITS, Y, 4.0, 0.9, task="classification").item() == \
        pytest.approx(expected, rel=1e-5)


def test_a_model_output_teacher_on_dict_batches():
    from transformers import BertConfig, BertForSequenceClassification

    from leantrain.losses.distillation import DistillationLoss
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, num_labels=3)
    teacher = BertForSequenceClassification(config)
    inputs = {"input_ids": torch.randint(0, 50, (4, 6)), "attention_mask": torch.ones(4, 6,
                                                                                 dtype=torch.long)}
    student_logits = torch.randn(4, 3, requires_grad=True)
    loss = DistillationLoss(teacher, 2.0, 0.5)(student_logits, torch.tensor([0, 1, 2, 0]), inputs)
    loss.backward()
    assert torch.isfinite(loss) and student_logits.grad is not None


@pytest.mark.slow
def test_distill_runs_end_to_end_on_the_text_gpt_recipe(tmp_path):
    teacher = tmp_path / "teacher"
    small = ["--recipe", "text-gpt", "--set", "data.max_bytes=20000", "--set",
             "data.context=32", "--no-progress"]
    assert main(["train", *small, "--epochs", "1", "--out", str(teacher)]) == 0
    out = tmp_path / "kd"
    assert main(["distill", *small, "--teacher", str(teacher), "--student-model",
                 "leantrain.recipes.models:text_gpt_student", "--epochs", "1",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "token-classification"
    assert (report["temperature"], report["alpha"]) == PER_TOKEN_DEFAULT  # per token
    assert report["teacher"]["parameters"] >= 4 * report["student_kd"]["parameters"]
    assert math.isfinite(report["student_kd"]["val_accuracy"])
    kd = json.loads((out / "student_kd" / "summary.json").read_text())
    assert kd["steps"] > 0 and math.isfinite(kd["val_loss"])


# ------------------------------------------------------------------ feature distillation


def _pair():
    """A toy teacher (hidden 16) and student (hidden 4): their hidden widths differ."""
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    student = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    return teacher, student


def test_feature_loss_is_the_mse_of_the_projected_student_state():
    from leantrain.losses.features import FeatureMatch, detach_projections
    teacher, student = _pair()
    match = FeatureMatch(student, teacher, [("0", "0")], weight=0.5)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        student(x), teacher(x)
    match.attach_projections(student)
    weight, bias = student.leantrain_feature_projection_0_to_0_weight, \
        student.leantrain_feature_projection_0_to_0_bias
    assert weight.shape == (16, 4)  # student width 4 -> teacher width 16
    assert student(x).shape == (5, 3)  # a Sequential still runs its own layers only
    with torch.inference_mode():  # the teacher runs as DistillationLoss runs it
        teacher(x)
    loss = match.loss()
    expected = 0.5 * ((F.linear(student[0](x), weight, bias) - teacher[0](x)) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()  # it trains the projection and the student's layer
    assert weight.grad is not None and student[0].weight.grad is not None
    assert len(list(student.parameters())) == 6
    detach_projections(student)
    assert len(list(student.parameters())) == 4


def test_the_trainer_pulls_the_student_state_towards_the_teachers(tabular):
    from leantrain.losses.features import FeatureMatch
    train, val = tabular
    teacher, student = _pair()
    match = FeatureMatch(student, teacher, [("0", "0")])
    x = train.tensors[0]
    with torch.no_grad():
        student(x), teacher(x)
    match.attach_projections(student)

    def distance() -> float:
        with torch.no_grad():
            student(x), teacher(x)
            return match.loss().item()

    before = distance()
    fit(student, train, val, load_config(None, ["plan.device=cpu", "train.epochs=5",
                                                "optim.name=adamw", "optim.lr=1e-2"]),
        progress_bar=False, loss_fn=DistillationLoss(freeze_teacher(teacher), 2.0, 0.5,
                                                     features=match))
    assert distance() < 0.5 * before


def test_conv_maps_get_a_1x1_projection_and_mismatched_sizes_are_refused():
    from leantrain.losses.features import _projection
    conv = _projection(torch.zeros(2, 4, 7, 7), torch.zeros(2, 16, 7, 7), ("a", "b"))
    assert isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (1, 1)
    with pytest.raises(LeantrainError, match="differ beyond the channel dimension"):
        _projection(torch.zeros(2, 4, 7, 7), torch.zeros(2, 16, 14, 14), ("a", "b"))


def test_a_trial_copy_of_the_student_trains_its_own_projections():
    """The trainer's measured-default trials deep-copy the student, hooks and all: the loss
    must use the copy's projections, or the original's would collect the trials' gradients."""
    import copy

    from leantrain.losses.features import FeatureMatch
    teacher, student = _pair()
    match = FeatureMatch(student, teacher, [("0", "0")])
    x = torch.randn(5, 8)
    with torch.no_grad():
        student(x), teacher(x)
    match.attach_projections(student)
    trial = copy.deepcopy(student)
    trial(x), teacher(x)
    match.loss().backward()
    assert trial.leantrain_feature_projection_0_to_0_weight.grad is not None
    assert student.leantrain_feature_projection_0_to_0_weight.grad is None


def test_hugging_face_layers_are_matched_through_their_tuple_outputs():
    from transformers import BertConfig, BertForSequenceClassification

    from leantrain.losses.features import FeatureMatch
    torch.manual_seed(0)

    def bert(width, layers):
        return BertForSequenceClassification(BertConfig(
            vocab_size=50, hidden_size=width, num_hidden_layers=layers, num_attention_heads=2,
            intermediate_size=2 * width, num_labels=3))

    teacher, student = bert(32, 2), bert(16, 1)
    ids = {"input_ids": torch.randint(0, 50, (4, 6))}
    match = FeatureMatch(student, teacher, [("bert.encoder.layer.0", "bert.encoder.layer.1")])
    with torch.no_grad():
        student(**ids), teacher(**ids)
    match.attach_projections(student)
    logits = student(**ids).logits
    loss = DistillationLoss(teacher, 2.0, 0.5, features=match)(logits, torch.tensor([0, 1, 2, 0]),
                                                               ids)
    loss.backward()
    assert torch.isfinite(loss) and student.bert.encoder.layer[0].output.dense.weight.grad \
        is not None


@pytest.mark.parametrize("text, fragment", [
    ("", "is empty"), ("a=", "each item is STUDENT=TEACHER"), ("=b", "each item is"),
])
def test_bad_feature_pairs_are_refused(text, fragment):
    from leantrain.losses.features import parse_pairs
    with pytest.raises(LeantrainError, match=fragment):
        parse_pairs(text)


def test_feature_pairs_parse_with_defaults():
    from leantrain.losses.features import parse_pairs
    assert parse_pairs("blocks.0=blocks.2, head") == [("blocks.0", "blocks.2"), ("head", "head")]


def _train_teacher(tmp_path):
    teacher = tmp_path / "teacher"
    assert main(["train", "--out", str(teacher), "--no-progress", "--epochs", "1"]) == 0
    return teacher


def test_a_feature_layer_missing_from_a_model_exits_2_and_writes_nothing(tmp_path, capsys):
    teacher = _train_teacher(tmp_path)
    out = tmp_path / "kd"
    capsys.readouterr()
    assert main(["distill", "--teacher", str(teacher), "--student-model",
                 "leantrain.recipes.models:digits_student", "--feature-layers",
                 "features.9=features.1", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "the student has no layer 'features.9'" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_distill_with_feature_layers_saves_the_student_alone(tmp_path):
    from leantrain.recipes.models import digits_student
    teacher = _train_teacher(tmp_path)
    student_layers = [n for n, m in digits_student().named_modules()
                      if isinstance(m, torch.nn.Conv2d)]
    from leantrain.recipes.models import SmallCNN
    teacher_layers = [n for n, m in SmallCNN(1, 10).named_modules()
                      if isinstance(m, torch.nn.Conv2d)]
    pair = f"{student_layers[0]}={teacher_layers[0]}"
    out = tmp_path / "kd"
    assert main(["distill", "--teacher", str(teacher), "--student-model",
                 "leantrain.recipes.models:digits_student", "--feature-layers", pair,
                 "--feature-weight", "0.5", "--epochs", "1", "--out", str(out),
                 "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["feature_layers"] == [pair] and report["feature_weight"] == 0.5
    assert "runs live" in report["cache"]
    weights = torch.load(out / "student_kd" / "model.pt", weights_only=True)
    digits_student().load_state_dict(weights)  # strict: no projection left in it
