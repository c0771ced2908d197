"""`leantrain bench` and the finders: trials, numerical check, budget, plans, batch size, LR."""

import json
import math
import random
import time
import types

import pytest
import torch
import yaml
from conftest import Ticking, blobs, mlp
from torch import nn
from torch.utils.data import TensorDataset

from leantrain.bench import find_batch_size, find_lr, run_bench, search
from leantrain.bench.lr_finder import suggest
from leantrain.bench.report import format_bench, write_bench
from leantrain.bench.search import baseline_overrides
from leantrain.bench.trials import TrialResult, interleave
from leantrain.cli import main
from leantrain.config import TrainConfig, load_config
from leantrain.data.sources import DataBundle
from leantrain.errors import LeantrainError
from leantrain.techniques import REGISTRY
from leantrain.techniques.variant import Variant


def tabular_bundle(n: int = 400) -> DataBundle:
    x, y = blobs(n)
    split = int(0.8 * n)
    return DataBundle(TensorDataset(x[:split], y[:split]), TensorDataset(x[split:], y[split:]),
                      3, "blobs")


def small_cfg(**values) -> TrainConfig:
    """CPU, also where a GPU is present: these tests check the bench's logic and timings."""
    base = {"data": {"batch_size": 16}, "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
            "train": {"epochs": 2},
            "plan": {"device": "cpu"}}
    return load_config(None, [], {**base, **values})


# ---------------------------------------------------------------- the numerical check, budget


class _Scramble(nn.Module):
    """Wraps a model and triples its outputs: a 'technique' that changes the numbers a lot."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return 3 * self.inner(x)


def _fake_technique(lossless: bool):
    variant = Variant("scramble", lossless=lossless, wrap_model=_Scramble)
    return types.SimpleNamespace(NAME="scramble", LOSSLESS=lossless, VARIANTS=(variant,))


def ticking_mlp(clock, seconds: float = 0.01):
    """The MLP builder the bench tests use: each forward takes `seconds` of injected time, so
    budgets and rates are the same on a loaded machine as on a quiet one."""
    return lambda: Ticking(mlp(), clock, seconds)


@pytest.mark.parametrize("claims_lossless", [False, True])
def test_numerical_check_flags_a_lossy_fake_technique(monkeypatch, claims_lossless,
                                                      fake_clock):
    # beside one cheap lossless technique only, with room in the budget: no other trial can
    # spend what its rounds need
    monkeypatch.setattr(search, "REGISTRY", {"scramble": _fake_technique(claims_lossless),
                                             "optimizer_impl": REGISTRY["optimizer_impl"]})
    result = run_bench(ticking_mlp(fake_clock), tabular_bundle(), small_cfg(), budget_s=60,
                       tune_batch_size=False)
    fake = result.trial("scramble")
    assert fake.status == "ok", fake.reason
    assert fake.check == "flagged"
    assert fake.divergence > (result.lossless_tol if claims_lossless else result.loss_tol)
    assert result.winner != "scramble" and "scramble" not in result.winner
    honest = [t for t in result.trials if t.measured and t.check not in ("reference", "flagged")]
    assert honest and all(t.check == "ok" for t in honest)  # lossless ones agree with baseline


def test_budget_is_respected_within_ten_percent(fake_clock):
    budget = 8.0
    result = run_bench(ticking_mlp(fake_clock), tabular_bundle(), small_cfg(), budget_s=budget)
    assert result.elapsed_s <= 1.1 * budget
    assert fake_clock.t <= 1.1 * budget  # every trial's time counted, the final check's too
    compile_trial = result.trial("compile")
    assert compile_trial.status == "skipped" and "budget" in compile_trial.reason


def test_the_budget_counts_from_the_commands_start_and_keeps_time_to_write(fake_clock):
    budget, start_up = 8.0, 3.0
    fake_clock.advance(start_up)  # the command's imports, data and model, before the bench
    result = run_bench(ticking_mlp(fake_clock), tabular_bundle(), small_cfg(), budget_s=budget,
                       started=0.0)
    assert result.elapsed_s >= start_up  # the report's time is the user's stopwatch's
    assert fake_clock.t <= budget - search.WRITE_RESERVE_S + 0.1 * budget


def test_the_command_line_budget_starts_with_the_process(fake_clock, monkeypatch, tmp_path):
    """`leantrain bench` run as a command counts its interpreter's start-up; a call of
    `main([...])` in a running process counts from the call."""
    from leantrain.measure import clock

    seen = []

    def stop(*args, started=None, **kwargs):
        seen.append(started)
        raise LeantrainError("stopped by the test")

    monkeypatch.setattr(search, "run_bench", stop)
    monkeypatch.setattr(clock, "process_age", lambda: 4.5)
    fake_clock.advance(100.0)
    argv = ["bench", "--budget-s", "9", "--out", str(tmp_path / "bench"), "--no-progress"]
    monkeypatch.setattr("sys.argv", ["leantrain", *argv])
    assert main() == 2 and main(argv) == 2
    assert seen == [95.5, 100.0]


def test_every_technique_is_listed_with_a_status_or_a_reason(fake_clock):
    result = run_bench(ticking_mlp(fake_clock), tabular_bundle(), small_cfg(), budget_s=5,
                       tune_batch_size=False)
    names = {t.name for t in result.trials}
    for module in REGISTRY.values():
        if module.VARIANTS:
            assert {v.name for v in module.VARIANTS} <= names, module.NAME
        else:
            assert module.NAME in result.not_benchmarked
    unsupported = result.trial("channels_last")
    assert unsupported.status == "unsupported" and "no 2-D convolutions" in unsupported.reason
    assert result.baseline.overrides["data"]["loader"] == "dataloader"
    assert result.baseline.overrides["plan"]["precision"] == "fp32"


def test_baseline_is_a_plain_fp32_eager_loop():
    plan = baseline_overrides(small_cfg())["plan"]
    assert plan == {"device": "cpu", "precision": "fp32", "channels_last": False,
                    "compile": False, "cudnn_benchmark": False, "tf32": False,
                    "optimizer_impl": "for-loop"}


def test_interleave_reverses_order_and_drops_what_stops():
    calls = []

    def measure(name, r):
        calls.append((name, r))
        if name == "b" and r == 1:
            return None  # e.g. out of budget
        return types.SimpleNamespace(measured=True)

    results = interleave(["a", "b", "c"], 3, measure)
    assert calls == [("a", 0), ("b", 0), ("c", 0), ("c", 1), ("b", 1), ("a", 1),
                     ("a", 2), ("c", 2)]
    assert [len(results[n]) for n in "abc"] == [3, 1, 3]


def test_bench_outputs_and_the_plan_train_uses(tmp_path, fake_clock):
    result = run_bench(ticking_mlp(fake_clock), tabular_bundle(), small_cfg(), budget_s=6)
    write_bench(result, tmp_path, apply_to=tmp_path / "applied.yaml")
    raw = json.loads((tmp_path / "bench.json").read_text())
    assert raw["winner"] == result.winner and len(raw["trials"]) == len(result.trials)
    assert all(t["round_rates"] for t in raw["trials"] if t["status"] == "ok")
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    plan = yaml.safe_load((tmp_path / "applied.yaml").read_text())
    assert plan == yaml.safe_load((tmp_path / "plan.yaml").read_text())
    assert set(plan) <= {"plan", "data", "optim"} and plan["plan"]["device"] == "cpu"


# ---------------------------------------------------------------- two more model families


USER_MODULE = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset

def tabular():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 3
    y = torch.randint(0, 3, (480,), generator=g)
    x = centers[y] + torch.randn(480, 8, generator=g)
    return TensorDataset(x[:400], y[:400]), TensorDataset(x[400:], y[400:])

def mlp():
    return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3))

def tokens():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 16, (480, 12), generator=g)
    y = (x == 1).sum(1).clamp(max=3)  # how often token 1 occurs: needs the whole sequence
    return TensorDataset(x[:400], y[:400]), TensorDataset(x[400:], y[400:])

class TinyEncoder(nn.Module):
    def __init__(self, vocab=16, width=32, length=12, classes=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(length, width))
        layer = nn.TransformerEncoderLayer(width, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x) + self.position).mean(1))

def transformer():
    return TinyEncoder()
'''


@pytest.fixture
def families(tmp_path, monkeypatch):
    (tmp_path / "families.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("model, data", [("families:mlp", "families:tabular"),
                                         ("families:transformer", "families:tokens")])
def test_bench_then_train_with_its_plan_on_other_families(families, capsys, model, data):
    out = families / "bench"
    args = ["--model", model, "--data", data, "--set", "data.batch_size=32"]
    assert main(["bench", *args, "--budget-s", "12", "--out", str(out), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "baseline" in table and "winner (*)" in table and "not measured" in table
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    assert plan["plan"]["device"] == "cpu"
    run = families / "run"
    assert main(["train", *args, "--plan", str(out / "plan.yaml"), "--epochs", "2",
                 "--out", str(run), "--no-progress"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    # every value the plan sets is what train ran with (a plan that keeps the default sets
    # only the device, and says so in its header)
    for key, value in plan["plan"].items():
        if key in summary["plan"] and key != "device":
            assert summary["plan"][key] == value, key
    if "precision" not in plan["plan"]:
        assert "keep the default" in (out / "plan.yaml").read_text()
    if "loader" in plan.get("data", {}):
        assert summary["train_loader"].startswith(
            "DataLoader" if plan["data"]["loader"] == "dataloader" else "in-memory")


def test_plan_file_may_only_set_how_to_run(tmp_path, capsys):
    bad = tmp_path / "plan.yaml"
    bad.write_text("plan:\n  precision: fp32\ntrain:\n  epochs: 1\n")
    assert main(["train", "--plan", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "section 'train' is not allowed in a plan" in err and "plan, data, optim" in err
    bad.write_text("data:\n  source: other\n")
    assert main(["train", "--plan", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "key 'data.source' is not allowed" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- batch-size finder


class _RunsOutAbove(nn.Module):
    """An MLP that raises CUDA's out-of-memory error for batches above `limit`."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.ran = limit, set()
        self.net = mlp()

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"simulated: CUDA out of memory at batch {x.shape[0]}")
        if self.training and torch.is_grad_enabled():
            self.ran.add(x.shape[0])
        return self.net(x)


def test_batch_size_finder_never_returns_a_size_it_did_not_run():
    models = []

    def build():
        models.append(_RunsOutAbove(limit=37))
        return models[-1]

    cfg = small_cfg(data={"batch_size": 8})
    sizes = find_batch_size(build, tabular_bundle(800), cfg, baseline_overrides(cfg),
                            seconds_per_size=0.2)
    trained = set().union(*(m.ran for m in models))
    assert sizes.recommended in trained and sizes.largest_fit in trained
    assert sizes.largest_fit <= 37 and sizes.recommended <= 37
    tried = {t["batch_size"]: t for t in sizes.tried}
    assert tried[sizes.recommended]["fits"] and tried[sizes.largest_fit]["fits"]
    assert any(not t["fits"] and "out of memory" in t["reason"] for t in tried.values())
    assert sizes.largest_fit >= 32  # bisection got close to the real limit
    expected_lr = 0.05 * sizes.recommended / 8
    assert math.isclose(sizes.new_lr, expected_lr) and "linear scaling" in sizes.lr_rule \
        or sizes.recommended == 8


def test_batch_size_finder_respects_a_memory_limit():
    cfg = small_cfg()
    with pytest.raises(LeantrainError, match="not even batch size 1 fits"):
        find_batch_size(mlp, tabular_bundle(), cfg, baseline_overrides(cfg), memory_limit=1,
                        seconds_per_size=0.1)


def test_lr_scaling_rules():
    from leantrain.bench.batch_size import scale_lr
    assert scale_lr(0.1, "sgd", 64, 256)[0] == pytest.approx(0.4)
    assert scale_lr(1e-3, "adamw", 64, 256)[0] == pytest.approx(2e-3)


# ---------------------------------------------------------------- LR finder


def test_lr_suggestion_is_the_steepest_descent_before_the_minimum():
    lrs = [10 ** (-4 + i * 0.25) for i in range(17)]
    losses = [2.0, 2.0, 1.99, 1.95, 1.8, 1.2, 0.9, 0.8, 0.75, 0.74, 0.9, 3.0, 9.0, 20, 50, 80, 99]
    assert suggest(lrs, losses) == pytest.approx(lrs[5])


def test_lr_finder_stops_on_divergence_and_suggests_inside_the_sweep():
    result = find_lr(mlp, tabular_bundle(), small_cfg(), lr_min=1e-4, lr_max=1e4, steps=80)
    assert result.stopped_early and "diverged" in result.stop_reason or "finite" in \
        result.stop_reason
    assert len(result.lrs) < 80
    assert result.lrs[0] <= result.suggestion <= result.lrs[-1]
    assert result.suggestion in result.lrs


def test_find_lr_cli_saves_the_curve_and_applies_it(tmp_path, capsys):
    out, plan = tmp_path / "lr", tmp_path / "plan.yaml"
    plan.write_text("plan:\n  precision: fp32\n")
    assert main(["find-lr", "--set", "data.batch_size=256", "--steps", "30", "--out", str(out),
                 "--apply", str(plan), "--plan", str(plan)]) == 0
    raw = json.loads((out / "lr_finder.json").read_text())
    assert raw["lrs"][0] <= raw["suggestion"] <= raw["lrs"][-1]
    assert (out / "lr_finder.png").stat().st_size > 10_000
    written = yaml.safe_load(plan.read_text())
    assert written["optim"]["lr"] == pytest.approx(raw["suggestion"])
    assert written["plan"]["precision"] == "fp32"  # an existing plan is updated, not replaced
    assert "suggested lr" in capsys.readouterr().out


@pytest.mark.parametrize("args, fragment", [
    (["bench", "--budget-s", "0"], "--budget-s must be > 0 and finite, got 0.0"),
    (["bench", "--budget-s", "nan"], "--budget-s must be > 0 and finite, got nan"),
    (["bench", "--loss-tol", "nan"], "--loss-tol must be > 0 and finite, got nan"),
    (["bench", "--loss-tol", "inf"], "--loss-tol must be > 0 and finite, got inf"),
    (["find-batch-size", "--max-size", "0"], "--max-size must be >= 1, got 0"),
    (["find-batch-size", "--memory-limit-gib", "-5"],
     "--memory-limit-gib must be a finite number > 0, got -5.0"),
    (["find-batch-size", "--memory-limit-gib", "0"],
     "--memory-limit-gib must be a finite number > 0, got 0.0"),
    (["find-batch-size", "--memory-limit-gib", "nan"],
     "--memory-limit-gib must be a finite number > 0, got nan"),
    (["bench", "--loss-tol", "-1"], "--loss-tol must be > 0 and finite, got -1.0"),
    (["find-lr", "--lr-min", "1", "--lr-max", "0.1"],
     "the LR sweep needs 0 < lr_min < lr_max, got 1.0, 0.1"),
    (["find-lr", "--steps", "2"], "the LR sweep needs at least 5 steps, got 2"),
])
def test_bad_bench_arguments_fail_clearly_and_write_nothing(tmp_path, capsys, args, fragment):
    out = tmp_path / "out"
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("leantrain: error:") and fragment in err[-1], err
    assert not out.exists()


def test_a_lossless_technique_neutral_alone_is_still_tried_in_combinations():
    """Overhead a technique removes can hide behind slow compute: a lossless single within
    NEUTRAL of the baseline is combined; a slower or lossy neutral one is not."""
    def trial(name, seconds, lossless=True):
        return TrialResult(name, [name], {}, lossless, "ok", projected_seconds=seconds,
                           check="reference" if name == "baseline" else "ok")

    fast, neutral = Variant("fast", {"plan": {"a": 1}}), Variant("neutral", {"plan": {"b": 1}})
    lossy, slow = (Variant("lossy", {"plan": {"c": 1}}, lossless=False),
                   Variant("slow", {"plan": {"d": 1}}))
    singles = {"fast": trial("fast", 5.0), "neutral": trial("neutral", 10.2),
               "lossy": trial("lossy", 10.2, lossless=False), "slow": trial("slow", 12.0)}
    measured = []

    class Bench:
        trials = [trial("baseline", 10.0)]

        def measure(self, groups, reference):
            measured.append([v.name for v in groups[-1]])
            return [trial("+".join(v.name for v in groups[-1]), 4.0)]

    search._greedy_combinations(Bench(), [fast, neutral, lossy, slow], singles)
    assert measured == [["fast", "neutral"]]


def test_a_trial_the_budget_cannot_pay_for_still_says_when_it_is_unsupported(fake_clock):
    result = run_bench(ticking_mlp(fake_clock), tabular_bundle(), small_cfg(), budget_s=3.5,
                       tune_batch_size=False)
    assert result.trial("channels_last").status == "unsupported"  # no convs: found without a run
    assert "no 2-D convolutions" in result.trial("channels_last").reason
    foreach = result.trial("foreach optimizer")
    assert foreach.status == "skipped" and "budget" in foreach.reason


# ---------------------------------------------------------------- statistics that hold


class _Timed(nn.Module):
    """A conv model whose step takes injected time (`fake_clock`): `delay` seconds in its
    forward, `fast` times less when its input is channels_last, plus `overhead` that
    channels_last does not shorten. Each call's time varies by a seeded 3% (a machine's
    jitter); under `noisy`, channels_last calls are also scaled by a factor drawn every 40
    calls (about one per round), so their rounds disagree."""

    def __init__(self, clock, draws: random.Random, fast: float = 1.0, noisy: bool = False,
                 delay: float = 0.008, overhead: float = 0.001):
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 4, 3), nn.Linear(4 * 4 * 4, 3)
        self.clock, self.draws = clock, draws
        self.fast, self.noisy, self.delay, self.overhead = fast, noisy, delay, overhead
        self.calls, self.factor = 0, 1.0

    def forward(self, x):
        delay = self.delay
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            delay *= self.fast
            if self.noisy:
                if self.calls % 40 == 0:
                    self.factor = 2 ** self.draws.uniform(-2, 2)
                self.calls += 1
                delay *= self.factor
        self.clock.advance((delay + self.overhead) * (1 + 0.03 * self.draws.gauss(0, 1)))
        return self.head(self.conv(x).flatten(1))


def _layout_technique():
    """channels_last as the only technique: a real, plannable plan key whose speed the
    _Timed model sets."""
    variant = Variant("fake layout", {"plan": {"channels_last": True}})
    return types.SimpleNamespace(NAME="fake layout", LOSSLESS=True, VARIANTS=(variant,))


def _images() -> DataBundle:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, 2, 6, 6, generator=g), torch.randint(0, 3, (400,), generator=g)
    return DataBundle(TensorDataset(x[:320], y[:320]), TensorDataset(x[320:], y[320:]), 3, "x")


def _timed_bench(monkeypatch, clock, budget_s: float = 40, **model):
    """The bench with one technique, channels_last, on a model it makes `fast` times faster."""
    monkeypatch.setattr(search, "REGISTRY", {"fake layout": _layout_technique()})
    cfg = small_cfg(plan={"device": "cpu", "precision": "fp32"})
    draws = random.Random(0)  # one stream for every trial: their jitter differs

    def build():
        torch.manual_seed(0)  # the same initial weights in every trial
        return _Timed(clock, draws, **model)

    return run_bench(build, _images(), cfg, budget_s=budget_s, tune_batch_size=False)


def test_a_noisy_technique_is_flagged_and_cannot_win(monkeypatch, fake_clock):
    result = _timed_bench(monkeypatch, fake_clock, fast=0.5, noisy=True)
    fake = result.trial("fake layout")
    assert fake.noisy and fake.spread > search.NOISY_CV
    assert result.winner == "baseline"
    assert "NOISY" in format_bench(result)


def test_a_second_take_cut_short_by_the_budget_does_not_replace_the_noisy_first(
        monkeypatch, fake_clock):
    """A winner once came from one re-measured round after five noisy ones: the second take
    counts only when it has as many rounds as the first."""
    takes = []
    full = search.interleave

    def budget_runs_out(labels, rounds, one_round):
        found = full(labels, rounds, one_round)
        takes.append(found)
        if len(takes) > 1:  # the re-measurement: one round of the noisy one, then no budget
            found = {label: measured if label == labels[0] else measured[:1]
                     for label, measured in found.items()}
        return found

    monkeypatch.setattr(search, "interleave", budget_runs_out)
    result = _timed_bench(monkeypatch, fake_clock, fast=0.5, noisy=True)
    assert len(takes) >= 2  # it was measured again
    fake = result.trial("fake layout")
    assert fake.noisy and result.winner == "baseline"


def test_a_steady_ten_percent_gain_wins_with_an_interval_above_one(monkeypatch, fake_clock):
    # 20 ms that channels_last shortens by 12%, 2 ms that it does not, 3% jitter per call:
    # the whole step 0.022 / 0.0196 = 1.12x faster
    result = _timed_bench(monkeypatch, fake_clock, fast=0.88, delay=0.02, overhead=0.002)
    fake = result.trial("fake layout")
    assert not fake.noisy and 1.0 < fake.speedup_interval[0] <= fake.speedup_interval[1]
    assert result.winner == "fake layout"
    assert fake.speedup == pytest.approx(0.022 / 0.0196, rel=0.02)
    low, high = fake.speedup_interval
    assert low <= 0.022 / 0.0196 * 1.01 and high >= 0.022 / 0.0196 * 0.99


def test_a_winner_no_faster_than_the_default_plan_is_not_written(monkeypatch, tmp_path,
                                                                 fake_clock):
    # the default plan puts this conv model in channels_last too: the "winner" is the default
    result = _timed_bench(monkeypatch, fake_clock, fast=0.9)
    assert result.winner == "fake layout" and result.keep_default
    assert result.versus_default["pairs"] >= 2
    assert result.versus_default["interval"][0] <= 1.0 <= result.versus_default["interval"][1] \
        or result.versus_default["ratio"] <= 1.0
    write_bench(result, tmp_path)
    text = (tmp_path / "plan.yaml").read_text()
    assert "keep the default" in text
    assert yaml.safe_load(text) == {"plan": {"device": "cpu"}}


def test_a_trial_the_load_makes_slower_than_measured_is_cut_at_the_budget(monkeypatch,
                                                                         fake_clock):
    """Load arrives with the technique's trial: its steps take 4 s where the baseline's took
    9 ms, so its rounds would run far past the budget. It is cut at the deadline (a step past
    it at most), the bench ends within its budget, and the cut trial cannot win."""
    budget, step_s = 30.0, 4.0
    result = _timed_bench(monkeypatch, fake_clock, budget_s=budget, fast=step_s / 0.008,
                          overhead=0.0)
    fake = result.trial("fake layout")
    assert fake.status == "skipped" and "cut at the deadline" in fake.reason
    assert result.winner == "baseline"
    assert fake_clock.now() <= budget - search.WRITE_RESERVE_S + step_s


class _Hangs(nn.Module):
    """A technique whose first forward never returns to the step (a compile that hangs on a
    loaded machine): only an interruption ends it (the cap bounds a broken test)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        end = time.monotonic() + 300
        while time.monotonic() < end:
            pass
        return self.inner(x)


def test_work_that_never_reaches_a_step_boundary_is_interrupted_at_the_budget(monkeypatch):
    """On the real clock: the hung trial is interrupted by the deadline's timer, the bench
    goes on to its final check and reports it, and a trial after it still runs."""
    hangs = Variant("hangs", wrap_model=_Hangs)
    monkeypatch.setattr(search, "REGISTRY", {
        "hangs": types.SimpleNamespace(NAME="hangs", LOSSLESS=True, VARIANTS=(hangs,))})
    # (15 s left no pair for the final check in 2 of 8 runs on a 2-core machine: the pair's
    # rounds are what the budget has left after the hung trial's deadline)
    result = run_bench(lambda: mlp(), tabular_bundle(), small_cfg(), budget_s=25,
                       tune_batch_size=False)
    trial = result.trial("hangs")
    assert trial.status == "skipped" and "cut at the deadline" in trial.reason
    assert result.winner == "baseline" and result.versus_default["pairs"] >= 1


def test_a_budget_too_small_for_the_baseline_says_so_in_one_line(fake_clock):
    with pytest.raises(LeantrainError, match="ended before the baseline's first round"):
        run_bench(ticking_mlp(fake_clock), tabular_bundle(), small_cfg(), budget_s=1.0)


def test_the_batch_size_table_shows_the_figures_it_decides_by_and_marks_its_choice():
    from leantrain.bench.batch_size import BatchSizeResult
    from leantrain.bench.report import format_batch_sizes

    # the single search timings favour 128; the paired rounds that decide put 64 within 5%
    tried = [{"batch_size": b, "fits": True, "samples_per_second": sps, "peak_memory_bytes": 1,
              "status": "ok", "reason": ""} for b, sps in ((32, 200.0), (64, 278.0),
                                                           (128, 428.0))]
    sizes = BatchSizeResult(start=32, tried=tried, largest_fit=128, recommended=64,
                            recommended_rule="the smallest size within 5% of the fastest",
                            lr=1e-3, new_lr=1.4e-3, lr_rule="square-root scaling",
                            memory_limit_bytes=None, memory_kind="RAM", cap=128,
                            speed_vs_start={32: 1.0, 64: 1.52, 128: 1.55})
    table = format_batch_sizes(sizes).splitlines()
    assert "speed (decides)" in table[0]
    row = {line.split()[0]: line for line in table[1:4]}
    assert "1.52x" in row["64"] and row["64"].endswith("<- recommended")
    assert "1.55x" in row["128"] and "recommended" not in row["128"]


def test_the_bench_reads_the_machines_load_while_it_times_and_flags_a_busy_one(monkeypatch,
                                                                            fake_clock):
    from leantrain.measure import load

    readings = iter([load.Snapshot(0.0, 0.0, 0.0, 2, 2), load.Snapshot(10.0, 15.0, 5.0, 2, 2)])
    monkeypatch.setattr(load, "snapshot", lambda: next(readings))  # a neighbour: 1 core
    result = _timed_bench(monkeypatch, fake_clock, fast=0.5)
    assert result.load["busy"] and result.load["others_share"] == pytest.approx(0.5)
    assert "machine BUSY: other processes used 50%" in format_bench(result)
    assert result.to_dict()["load"]["busy"]  # bench.json holds it


def test_two_agreeing_pairs_give_no_interval_and_the_table_says_so():
    from leantrain.bench.report import _speedup_text
    from leantrain.bench.trials import TrialResult
    from leantrain.measure.rounds import MIN_ROUNDS, interval

    assert interval([1.92, 1.94]) is None  # two pairs: a tight interval that says nothing
    assert interval([1.92, 1.94, 0.88]) is not None and MIN_ROUNDS == 3
    trial = TrialResult("fused optimizer", ["fused optimizer"], {}, True, "ok", "")
    trial.speedup, trial.round_rates = 1.93, [10.0, 11.0]
    assert _speedup_text(trial) == "1.93x (not enough rounds: 2 of 3)"
    assert not search.significant(trial)  # and so it cannot win


def test_the_batch_size_search_stops_before_a_trial_it_cannot_finish_in_time(monkeypatch,
                                                                             fake_clock):
    """Each size's trial takes 4 s (its model build and warm-up included), far more than the
    timed part the caller asked for: the search plans by what a trial really took."""
    from leantrain.bench import batch_size
    from leantrain.bench.trials import TrialResult

    ran = []

    def four_seconds(size, *args):
        fake_clock.advance(4.0)
        ran.append(size)
        return TrialResult(f"batch {size}", [], {}, True, "ok", samples_per_second=100.0 * size,
                           round_rates=[100.0 * size], peak_memory_bytes=1)

    monkeypatch.setattr(batch_size, "_run_size", four_seconds)
    sizes = batch_size.find_batch_size(lambda: None, tabular_bundle(800), small_cfg(),
                                       memory_limit=2**40, seconds_per_size=0.2,
                                       time_left=lambda: 18.0 - fake_clock.now())
    assert fake_clock.now() <= 18.0  # 4 trials of 4 s fit in 18 s; a fifth would not
    assert len(ran) == 4 and sizes.recommended in ran


def test_the_time_kept_to_write_the_results_grows_with_the_load(monkeypatch):
    from leantrain.measure import load

    monkeypatch.setattr(load.os, "cpu_count", lambda: 2)
    for average, running, times in ((1.0, "1/300", 1), (6.0, "2/300", 3), (0.5, "6/300", 3)):
        monkeypatch.setattr(load.os, "getloadavg", lambda a=average: (a, a, a))
        monkeypatch.setattr(load.Path, "read_text", lambda self, r=running: f"1 1 1 {r} 99")
        assert search.write_reserve() == pytest.approx(times * search.WRITE_RESERVE_S)


class _StreamOf(torch.utils.data.IterableDataset):
    """The rows of a TensorDataset as a stream (no length)."""

    def __init__(self, tensors: TensorDataset):
        self.tensors = tensors

    def __iter__(self):
        return iter(self.tensors)


def test_the_bench_and_the_batch_size_finder_run_over_a_stream(fake_clock):
    tabular = tabular_bundle(800)
    bundle = DataBundle(_StreamOf(tabular.train), _StreamOf(tabular.val), 3, "a stream")
    cfg = small_cfg(train={"epochs": 2, "max_steps": 60})
    result = run_bench(ticking_mlp(fake_clock), bundle, cfg, budget_s=8.0,
                       tune_batch_size=False)
    assert result.trial("baseline").samples_per_second > 0
    assert result.run_samples == 60 * 16  # a stream's run: train.max_steps batches
    sizes = find_batch_size(ticking_mlp(fake_clock), bundle, cfg, baseline_overrides(cfg),
                            seconds_per_size=0.1, max_size=64)
    assert sizes.recommended <= 64 and sizes.largest_fit <= 64
