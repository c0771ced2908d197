import json

import pytest
import torch
from conftest import mlp, snapshot_first_checkpoint, tiny_cnn
from torch.utils.data import TensorDataset

from leantrain import evaluate, fit, load_config
from leantrain.data import load_data
from leantrain.env import bf16_supported
from leantrain.errors import LeantrainError


def _cfg(*overrides):
    return load_config(None, ["plan.device=cpu", "data.batch_size=32", "train.epochs=3",
                              "optim.lr=0.05", *overrides])


def test_fit_writes_a_complete_run_folder(tabular, tmp_path):
    summary = fit(mlp(), *tabular, _cfg(), tmp_path / "run", progress_bar=False)
    run = tmp_path / "run"
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "checkpoint.pt", "metrics.jsonl", "model.pt", "summary.json",
            "tensorboard"} <= names
    assert any((run / "tensorboard").iterdir())
    on_disk = json.loads((run / "summary.json").read_text())
    for key in ("val_accuracy", "val_loss", "epochs", "steps", "train_seconds",
                "samples_per_second", "peak_memory_bytes", "plan"):
        assert on_disk[key] is not None, key
    assert summary["epochs"] == 3 and summary["steps"] == 3 * 7  # ceil(200 / 32) per epoch
    assert summary["val_accuracy"] > 0.9
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2, 3]
    fresh = mlp()
    fresh.load_state_dict(torch.load(run / "model.pt", weights_only=True))  # plain keys


def test_evaluate_matches_a_hand_computation(tabular):
    from leantrain.data import make_loader
    from leantrain.run.plan import resolve_plan

    model, (_, val) = mlp(), tabular
    plan = resolve_plan(load_config(None, ["plan.device=cpu", "plan.precision=fp32"]).plan, model)
    acc, loss = evaluate(model, make_loader(val, 16, False), plan)
    x, y = val.tensors
    with torch.no_grad():
        out = model(x)
    assert acc == pytest.approx((out.argmax(1) == y).float().mean().item())
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(out, y).item(), rel=1e-5)


def test_target_accuracy_stops_early(tabular):
    summary = fit(mlp(), *tabular, _cfg("train.epochs=20", "train.target_acc=0.8"),
                  progress_bar=False)
    assert summary["epochs"] < 20 and summary["val_accuracy"] >= 0.8
    assert 0 < summary["time_to_target_seconds"] <= summary["train_seconds"]


def test_grad_accumulation_in_the_trainer_matches_the_large_batch(tabular):
    base = ["plan.precision=fp32", "optim.weight_decay=0", "train.epochs=2"]
    big = fit(mlp(), *tabular, _cfg(*base, "data.batch_size=40"), progress_bar=False)
    acc = fit(mlp(), *tabular, _cfg(*base, "data.batch_size=20", "plan.grad_accum=2"),
              progress_bar=False)
    assert big["steps"] == acc["steps"] == 10
    assert acc["val_loss"] == pytest.approx(big["val_loss"], rel=1e-4)


@pytest.mark.skipif(not bf16_supported(torch.device("cpu"))[0], reason="no native bf16 on this CPU")
def test_bf16_trains_to_the_accuracy_target(tabular):
    summary = fit(mlp(), *tabular, _cfg("plan.precision=bf16", "train.epochs=5"),
                  progress_bar=False)
    assert summary["plan"]["precision"] == "bf16"
    assert summary["val_accuracy"] >= 0.95


def test_clipping_and_every_schedule_train(tabular):
    for name in ("constant", "step", "cosine", "onecycle"):
        summary = fit(mlp(), *tabular, _cfg("train.clip_norm=0.5", f"schedule.name={name}"),
                      progress_bar=False)
        assert summary["val_accuracy"] > 0.8, name


def test_labels_out_of_range_fail_before_anything_is_written(tmp_path):
    x = torch.randn(20, 8)
    bad = TensorDataset(x, torch.arange(20) % 5)  # 5 classes, model outputs 3
    with pytest.raises(LeantrainError, match=r"labels out of range: found 0..4.*3 classes"):
        fit(mlp(), bad, bad, _cfg(), tmp_path / "run", progress_bar=False)
    assert not (tmp_path / "run").exists()


def test_wrong_input_shape_fails_before_anything_is_written(tmp_path):
    data = TensorDataset(torch.randn(20, 5), torch.zeros(20, dtype=torch.long))
    with pytest.raises(LeantrainError, match=r"cannot run on the data: input batch of shape"):
        fit(mlp(), data, data, _cfg(), tmp_path / "run", progress_bar=False)
    assert not (tmp_path / "run").exists()


def _train_cnn(out):
    cfg = load_config(None, ["plan.device=cpu", "train.epochs=2", "train.checkpoint_every=7",
                             "data.batch_size=128", "train.log_every=5"])
    bundle = load_data(cfg.data)
    return fit(tiny_cnn(), bundle.train, bundle.val, cfg, out, progress_bar=False)


def test_resume_in_process_gives_identical_weights(tmp_path, monkeypatch):
    """A run stopped after a mid-epoch checkpoint and resumed ends where an uninterrupted one does.

    The CLI test kills a real process with SIGKILL; this one checks the same state machine fast,
    by snapshotting the run folder right after the first (step 7, mid-epoch) checkpoint.
    """
    full = _train_cnn(tmp_path / "full")
    snapshot = tmp_path / "snapshot"
    snapshot_first_checkpoint(monkeypatch, lambda: _train_cnn(tmp_path / "other"), snapshot)
    state = torch.load(snapshot / "checkpoint.pt", weights_only=True)
    assert state["progress"]["step"] == 7 and state["progress"]["batch"] == 7

    cfg = load_config(snapshot / "config.yaml")
    bundle = load_data(cfg.data)
    resumed = fit(tiny_cnn(), bundle.train, bundle.val, cfg, snapshot, resume=True,
                  progress_bar=False)
    assert resumed["steps"] == full["steps"]
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(snapshot / "model.pt", weights_only=True)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    records = [json.loads(line) for line in (snapshot / "metrics.jsonl").open()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == sorted(set(steps))  # no duplicated records after the resume


def test_resuming_a_finished_run_is_refused(tmp_path):
    _train_cnn(tmp_path / "done")
    cfg = load_config(tmp_path / "done" / "config.yaml")
    bundle = load_data(cfg.data)
    with pytest.raises(LeantrainError, match="already finished"):
        fit(tiny_cnn(), bundle.train, bundle.val, cfg, tmp_path / "done", resume=True)


def test_a_run_without_an_lr_of_its_own_says_so_and_points_to_the_finders(tabular):
    from leantrain.measure.report import format_summary

    cfg = load_config(None, ["plan.device=cpu", "train.epochs=1", "train.monitor_interval_s=0"])
    summary = fit(mlp(), *tabular, cfg, progress_bar=False)
    assert summary["optimizer"].startswith("AdamW: lr 0.001,")
    assert "find-lr" in summary["lr_advice"] and "tune" in summary["lr_advice"]
    assert summary["schedule"].endswith("(the default, from benchmarks/schedules.py)")
    assert "leantrain find-lr" in format_summary(summary)
    chosen = fit(mlp(), *tabular, _cfg("train.epochs=1", "train.monitor_interval_s=0"),
                 progress_bar=False)
    assert chosen["lr_advice"] is None
