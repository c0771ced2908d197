"""`leantrain tune`: the search space, the objectives, pruning, failed trials, and studies that
resume and share a storage (SQLite here, PostgreSQL when a server can start)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

from leantrain.cli import main
from leantrain.config import TrainConfig, load_config
from leantrain.errors import LeantrainError
from leantrain.tune.objective import Objective
from leantrain.tune.space import Param, default_space, load_space, trial_config

optuna = pytest.importorskip("optuna")

LEANTRAIN = [sys.executable, "-m", "leantrain.cli"]
# tiny trials: one or two epochs of the digits CNN, no LR sweep (the space sets optim.lr)
TINY_SPACE = {"optim": {"lr": {"low": 0.05, "high": 0.5, "log": True}},
              "train.epochs": {"low": 1, "high": 2, "int": True},
              "data.batch_size": {"choices": [128, 256]},
              "schedule.name": "onecycle", "schedule.warmup_fraction": None,
              "optim.weight_decay": None, "optim.momentum": None}


@pytest.fixture
def tiny_space(tmp_path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(TINY_SPACE))
    return path


# ------------------------------------------------------------------ the space


def test_the_default_space_centres_the_lr_on_the_finder_and_holds_the_common_knobs():
    space = default_space(TrainConfig(), lr_center=0.2)
    assert space["optim.lr"].low == pytest.approx(0.02) and space["optim.lr"].high == 2.0
    assert space["optim.lr"].log
    assert {"optim.weight_decay", "schedule.name", "schedule.warmup_fraction",
            "data.batch_size", "train.epochs"} <= set(space)
    assert "optim.momentum" not in space  # AdamW has none; SGD's is searched
    assert "optim.momentum" in default_space(load_config(None, ["optim.name=sgd"]), 0.2)
    assert 64 in space["data.batch_size"].choices and space["train.epochs"].integer


def test_a_space_file_narrows_extends_fixes_and_drops_keys(tiny_space):
    space, fixed = load_space(tiny_space, TrainConfig(), default_space(TrainConfig(), 0.1))
    assert space["optim.lr"] == Param("optim.lr", 0.05, 0.5, log=True)  # narrowed
    assert space["train.epochs"].integer and space["train.epochs"].high == 2
    assert fixed == {"schedule.name": "onecycle"}  # a value fixes the key
    assert "optim.weight_decay" not in space and "schedule.name" not in space  # dropped
    cfg = trial_config(TrainConfig(), {**fixed, "optim.lr": 0.3, "train.epochs": 2})
    assert cfg.optim.lr == 0.3 and cfg.train.epochs == 2 and cfg.schedule.name == "onecycle"


@pytest.mark.parametrize("entry, message", [
    ({"optim.lrr": {"low": 0.1, "high": 1}}, "optim.lrr"),
    ({"optim.lr": {"low": 1, "high": 0.1}}, "empty range"),
    ({"optim.lr": {"low": 0, "high": 1, "log": True}}, "log range needs low > 0"),
    ({"optim.lr": {"choices": []}}, "non-empty list"),
    ({"optim.lr": {"low": 0.1, "hgh": 1}}, "unknown field"),
    ({"data.source": {"choices": ["digits", "x.csv"]}}, "loaded once per study"),
    ({"schedule.name": {"choices": ["onecycle", "linear"]}}, "schedule.name"),
    ({"optim.momentun": None}, "optim.momentun: no config has this key"),  # a null typo
    ({None: None}, "None: no config has this key"),  # a file of one '?' (random-bytes property)
])
def test_a_bad_space_is_one_line_naming_the_key(tmp_path, entry, message):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(entry))
    with pytest.raises(LeantrainError, match=message):
        load_space(path, TrainConfig(), default_space(TrainConfig(), 0.1))


def test_a_bad_space_exits_2_before_any_trial_and_names_the_key(tmp_path, capsys):
    path = tmp_path / "space.yaml"
    path.write_text("optim.lr: {low: 0.1, high: 1}\nschedule.warmup: {low: 0, high: 0.2}\n")
    out = tmp_path / "tune"
    assert main(["tune", "--target", "val_accuracy>=0.9", "--space", str(path), "--out",
                 str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "schedule.warmup" in err
    assert not out.exists()  # checked before the LR finder and before the folder is claimed


def test_time_to_target_needs_a_target(tmp_path, capsys):
    assert main(["tune", "--out", str(tmp_path / "t")]) == 2
    assert "needs --target" in capsys.readouterr().err


# ------------------------------------------------------------------ objectives


def test_a_missed_target_scores_after_every_hit_and_closer_misses_first():
    objective = Objective.parse("time-to-target", "val_accuracy>=0.97", None, budget_s=420)
    hit = objective.values({"time_to_target_seconds": 419.0}, 0.0)
    near = objective.values({"time_to_target_seconds": None}, objective.gap(
        {"val_accuracy": 0.96}))
    far = objective.values({"time_to_target_seconds": None}, objective.gap(
        {"val_accuracy": 0.5}))
    assert hit[0] < near[0] < far[0] and near[0] > 420
    assert objective.directions == ["minimize"]
    assert objective.gap({"val_accuracy": 0.99}) == 0


def test_the_metric_and_both_objectives_take_their_directions_from_the_metric():
    assert Objective.parse("metric", None, "val_accuracy", None).directions == ["maximize"]
    both = Objective.parse("both", None, "val_loss", None)
    assert both.directions == ["minimize", "minimize"]
    assert both.values({"val_loss": 0.3, "train_seconds": 5.0}, None) == [0.3, 5.0]


# ------------------------------------------------------------------ pruning and failures


def test_the_median_pruner_stops_a_trial_far_below_the_median():
    from leantrain.tune.study import TrialWatcher, _pruner

    objective = Objective.parse("metric", None, "val_accuracy", None)
    study = optuna.create_study(direction="maximize",
                                pruner=_pruner("median", None))
    for good in (0.8, 0.85, 0.9):
        trial = study.ask()
        watcher = TrialWatcher(trial, objective, None, None)
        for _ in range(3):
            watcher.evaluated(0, {"val_accuracy": good})
        study.tell(trial, good)
    poor = TrialWatcher(study.ask(), objective, None, None)
    poor.evaluated(0, {"val_accuracy": 0.1})  # the first evaluation is a warm-up
    with pytest.raises(optuna.TrialPruned, match="pruned at evaluation 2"):
        poor.evaluated(0, {"val_accuracy": 0.1})


def _spec(tmp_path, trials: int, space: dict | None = None):
    from leantrain.tune.study import StudySpec

    cfg = load_config(None, ["train.epochs=1", "data.batch_size=256",
                             "train.monitor_interval_s=0"])
    params = space or {"optim.lr": Param("optim.lr", 0.05, 0.3, log=True)}
    return StudySpec(cfg, params, {}, Objective.parse("metric", None, "val_accuracy", None),
                     f"sqlite:///{tmp_path / 'study.db'}", "test", tmp_path, trials,
                     pruner="none")


def test_a_trial_that_raises_is_recorded_failed_with_its_error_and_the_study_goes_on(
        tmp_path):
    from leantrain.data import load_data
    from leantrain.recipes.models import SmallCNN
    from leantrain.tune.study import open_study, work

    bundle = load_data(TrainConfig().data)
    calls = []

    def build(cfg):
        calls.append(cfg)
        if len(calls) == 2:
            raise RuntimeError("the second model could not be built")
        return SmallCNN(1, 10)

    spec = _spec(tmp_path, trials=2)
    work(spec, bundle, build)
    trials = open_study(spec).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[1].user_attrs["error"] == "RuntimeError: the second model could not be built"


class _HangsWhenTraining(torch.nn.Module):
    """The digits CNN, whose first training forward never returns to the step (a compile or
    a kernel stuck on a loaded machine; the cap only bounds a broken test)."""

    def __init__(self):
        super().__init__()
        from leantrain.recipes.models import SmallCNN
        self.inner = SmallCNN(1, 10)

    def forward(self, x):
        if self.training and torch.is_grad_enabled():
            end = time.monotonic() + 120
            while time.monotonic() < end:
                pass
        return self.inner(x)


def test_a_trial_still_running_at_the_studys_deadline_is_interrupted(tmp_path, monkeypatch):
    from leantrain.data import load_data
    from leantrain.measure import clock
    from leantrain.tune import study as tune_study
    from leantrain.tune.study import open_study, work

    monkeypatch.setattr(tune_study, "REPORT_RESERVE_S", 0.5)
    monkeypatch.setattr(tune_study, "FINISH_RESERVE_S", 0.5)
    bundle = load_data(TrainConfig().data)
    spec = _spec(tmp_path, trials=5)
    spec.budget_s, spec.started = 6.0, clock.now()
    work(spec, bundle, lambda cfg: _HangsWhenTraining())
    trials = open_study(spec).get_trials()
    assert [t.state.name for t in trials] == ["PRUNED"]  # no trial started after it
    # interrupted by the deadline's timer: left alone, the hang would end after 120 s and the
    # watcher would stop the run at a step instead (a cut without "interrupted")
    assert "interrupted" in trials[0].user_attrs["cut"]


# ------------------------------------------------------------------ the command


def test_tune_writes_a_ranked_table_every_trial_plots_and_a_best_config_train_runs(
        tmp_path, tiny_space, capsys):
    out = tmp_path / "tune"
    assert main(["tune", "--target", "val_accuracy>=0.9", "--trials", "3", "--space",
                 str(tiny_space), "--pruner", "hyperband", "--out", str(out),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "leantrain tune: time-to-target val_accuracy>=0.9" in text and "trial 0" in text
    report = json.loads((out / "tune.json").read_text())
    assert report["counts"].get("complete", 0) + report["counts"].get("pruned", 0) >= 3
    for trial in report["trials"]:
        assert Path(trial["run"], "summary.json").exists() or trial["state"] != "complete"
        assert 0.05 <= trial["params"]["optim.lr"] <= 0.5
    assert report["plots"]["history.png"] == "saved" and (out / "history.png").exists()
    best = yaml.safe_load((out / "best.yaml").read_text())
    winner = next(t for t in report["trials"] if t["number"] == report["best"][0])
    assert best["optim"]["lr"] == winner["params"]["optim.lr"]
    assert best["schedule"]["name"] == "onecycle"  # the fixed key
    assert main(["train", "--config", str(out / "best.yaml"), "--epochs", "1", "--out",
                 str(tmp_path / "again"), "--no-progress"]) == 0


def test_the_two_objective_study_draws_its_pareto_front(tmp_path, tiny_space):
    out = tmp_path / "tune"
    assert main(["tune", "--objective", "both", "--metric", "val_loss", "--trials", "2",
                 "--space", str(tiny_space), "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "tune.json").read_text())
    assert report["directions"] == ["minimize", "minimize"]
    assert report["objective_names"] == ["val_loss", "train_seconds"]
    assert report["best"] and report["plots"]["pareto.png"] == "saved"
    for trial in report["trials"]:
        assert trial["values"][0] == trial["val_loss"] and trial["values"][1] > 0


def test_a_folder_that_holds_something_else_is_refused(tmp_path, tiny_space, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["tune", "--target", "val_accuracy>=0.9", "--space", str(tiny_space),
                 "--out", str(out)]) == 2
    assert "holds no study" in capsys.readouterr().err


def _tune(out: Path, space: Path, *extra: str) -> list[str]:
    return [*LEANTRAIN, "tune", "--objective", "metric", "--pruner", "none", "--space",
            str(space), "--out", str(out), "--no-progress", *extra]


def _finished_runs(out: Path) -> list[dict]:
    report = json.loads((out / "tune.json").read_text())
    return [t for t in report["trials"] if t["state"] in ("complete", "pruned")]


@pytest.mark.slow
def test_two_local_workers_on_one_sqlite_storage_share_a_study_and_run_no_trial_twice(
        tmp_path, tiny_space):
    out = tmp_path / "tune"
    result = subprocess.run(_tune(out, tiny_space, "--trials", "4", "--workers", "2"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "tune.json").read_text())
    assert report["workers"] == [{"worker": 1, "exit_code": 0}]
    finished = _finished_runs(out)
    assert len(finished) >= 4
    numbers = [t["number"] for t in report["trials"]]
    assert len(numbers) == len(set(numbers))
    runs = [t["run"] for t in report["trials"]]
    assert len(runs) == len(set(runs))  # each trial trained once, in its own folder
    assert sorted(p.name for p in (out / "trials").iterdir()) == sorted(
        Path(r).name for r in runs)
    params = [tuple(sorted(t["params"].items())) for t in finished]
    assert len(params) == len(set(params))  # the two samplers drew different trials


@pytest.mark.slow
def test_a_study_killed_mid_trial_resumes_and_finishes_its_planned_trials(tmp_path,
                                                                           tiny_space):
    out = tmp_path / "tune"
    command = _tune(out, tiny_space, "--trials", "4")
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not (out / "trials" / "0001" / "metrics.jsonl").exists():  # trial 1 is training
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    finished = _finished_runs(out)
    assert len(finished) >= 4
    assert finished[0]["number"] == 0  # the trial finished before the kill is kept
    report = json.loads((out / "tune.json").read_text())
    killed = next(t for t in report["trials"] if t["number"] == 1)
    assert killed["state"] in ("running", "fail")  # failed once its heartbeat is stale


def test_one_sigterm_stops_a_study_with_its_report_and_the_same_command_continues(
        tmp_path, tiny_space):
    """Schedulers send one TERM, then KILL: the study stops after the trial it interrupts
    (whose run writes its checkpoint), writes its report and exits 143."""
    out = tmp_path / "tune"
    command = _tune(out, tiny_space, "--trials", "3")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "trials" / "0000").exists():  # the study has begun its first trial
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(1.0)
    stopped_at = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert time.monotonic() - stopped_at < 30
    assert "the same command continues study" in err
    report = json.loads((out / "tune.json").read_text())
    assert len(report["trials"]) <= 2  # not the 30-trial run-on of one TERM ignored
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(_finished_runs(out)) >= 3


def test_a_second_study_in_the_same_folder_keeps_its_own_trial_runs(tmp_path, tiny_space):
    """Two studies in one --out shared trials/0000: 2 of 4 trials failed, exit 0."""
    out = tmp_path / "tune"
    first = subprocess.run(_tune(out, tiny_space, "--trials", "1"), capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    before = (out / "trials" / "0000" / "summary.json").read_bytes()
    second = subprocess.run(_tune(out, tiny_space, "--trials", "1", "--study", "other/one"),
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert (out / "trials" / "other_one" / "0000" / "summary.json").is_file()
    assert (out / "trials" / "0000" / "summary.json").read_bytes() == before
    report = json.loads((out / "tune.json").read_text())
    assert all(t["state"] == "complete" for t in report["trials"])


# ------------------------------------------------------------------ PostgreSQL


def _postgres_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent  # /usr/local/bin may link initdb alone
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return versions[-1].parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres():
    """A PostgreSQL server of the distribution's packages, in a temp folder, on loopback."""
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver (psycopg2-binary) is missing")
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    # not under pytest's temp folder: that is private to root, and as root the server runs
    # as the packages' postgres user (it refuses to run as root)
    root = Path(tempfile.mkdtemp(prefix="leantrain-pg-"))
    data, port = root / "data", _free_port()
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(root, "postgres")
    try:
        subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres",
                        "--auth=trust"], check=True, capture_output=True, timeout=120)
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-l",
                        str(root / "log"), "-o", f"-p {port} -k {root} -h 127.0.0.1",
                        "start"], check=True, capture_output=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        shutil.rmtree(root, ignore_errors=True)
        why = getattr(exc, "stderr", b"") or b""
        pytest.skip(f"PostgreSQL could not start here: {exc} {why.decode()[-300:]}")
    try:
        subprocess.run([*as_user, str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p",
                        str(port), "-U", "postgres", "optuna"], check=True,
                       capture_output=True, timeout=60)
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast",
                        "stop"], capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_a_study_on_a_real_postgresql_server(postgres, tmp_path,
                                                                tiny_space):
    """How a study outgrows one machine: each machine runs tune on the one storage URL."""
    commands = [_tune(tmp_path / f"machine{i}", tiny_space, "--trials", "4", "--storage",
                      postgres, "--study", "shared", "--seed", str(i)) for i in range(2)]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outputs]
    study = optuna.load_study(study_name="shared", storage=postgres)
    finished = [t for t in study.get_trials() if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) >= 4
    runs = [t.user_attrs["run"] for t in study.get_trials()]
    assert len(runs) == len(set(runs))
    assert {Path(r).relative_to(tmp_path).parts[0] for r in runs} == {"machine0", "machine1"}
    assert all(Path(r).parent.name == "shared" for r in runs)  # trials/shared/NNNN


def test_tune_searches_a_stock_hugging_face_model_with_dict_batches(tmp_path, monkeypatch,
                                                                    capsys):
    pytest.importorskip("transformers")
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "examples"))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"optim.lr": {"low": 1e-4, "high": 1e-2, "log": True},
                                     "data.batch_size": {"choices": [16, 32]},
                                     "train.epochs": 1, "schedule.warmup_fraction": None,
                                     "optim.weight_decay": None, "schedule.name": None}))
    out = tmp_path / "tune"
    assert main(["tune", "--model", "hf_sequence_classification:model", "--data",
                 "hf_sequence_classification:data", "--set", "optim.name=adamw",
                 "--objective", "metric", "--metric", "val_loss", "--trial-steps", "4",
                 "--trials", "2", "--pruner", "none", "--space", str(space), "--out",
                 str(out), "--no-progress"]) == 0
    report = json.loads((out / "tune.json").read_text())
    assert report["directions"] == ["minimize"] and report["counts"] == {"complete": 2}
    for trial in report["trials"]:
        summary = json.loads(Path(trial["run"], "summary.json").read_text())
        assert summary["steps"] == 4 and trial["values"] == [summary["val_loss"]]
    assert "optim.momentum" not in report["space"]  # AdamW: no SGD momentum searched


# ------------------------------------------------------------------ the metric fits the task


REGRESSION = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset

def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(320, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    return TensorDataset(x[:256], y[:256]), TensorDataset(x[256:], y[256:])

def model():
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
'''
REGRESSION_SPACE = {"optim": {"lr": {"low": 0.01, "high": 0.05, "log": True}},
                    "train.epochs": 1, "data.batch_size": 32}


@pytest.fixture
def regression(tmp_path, monkeypatch) -> list[str]:
    (tmp_path / "reg.py").write_text(REGRESSION)
    monkeypatch.syspath_prepend(str(tmp_path))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(REGRESSION_SPACE))
    return ["--model", "reg:model", "--data", "reg:data", "--space", str(space), "--no-progress"]


def test_a_regression_study_scores_its_own_metric_and_its_best_config_names_no_recipe(
        tmp_path, regression):
    out = tmp_path / "tune"
    assert main(["tune", "--objective", "metric", "--trials", "2", "--out", str(out),
                 *regression]) == 0
    report = json.loads((out / "tune.json").read_text())
    assert report["objective_names"] == ["val_mae"] and report["directions"] == ["minimize"]
    assert report["counts"] == {"complete": 2}
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["model"] == "reg:model" and "recipe" not in best


@pytest.mark.parametrize("flags, named", [(["--metric", "val_accuracy"], "'val_accuracy'"),
                                          (["--metric", "banana"], "'banana'"),
                                          (["--objective", "time-to-target", "--target",
                                            "val_accuracy>=0.9"], "'val_accuracy'")])
def test_a_metric_the_runs_never_report_is_refused_before_any_trial(tmp_path, regression,
                                                                     capsys, flags, named):
    out = tmp_path / "tune"
    args = ["tune", *(["--objective", "metric"] if "--objective" not in flags else []), *flags]
    assert main([*args, "--trials", "2", "--out", str(out), *regression]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0] and "val_mae, val_loss" in err[0]
    assert not out.exists()  # nothing trained, nothing written


def test_a_resumed_study_draws_new_parameters_not_its_first_trials_again(tmp_path,
                                                                         regression):
    out = tmp_path / "tune"
    command = ["tune", "--objective", "metric", "--pruner", "none", "--out", str(out),
               *regression]
    assert main([*command, "--trials", "2"]) == 0  # as if killed after two trials
    assert main([*command, "--trials", "4"]) == 0  # the same command, resumed
    trials = json.loads((out / "tune.json").read_text())["trials"]
    params = [tuple(sorted(t["params"].items())) for t in trials]
    assert len(params) == 4 and len(set(params)) == 4
