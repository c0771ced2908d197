"""`bench --layouts N` (`bench.layouts`): the parallel layouts of a launch, priced per rank,
then timed as real jobs in interleaved rounds; decisions from injected rates."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import shapes
from torch import nn

from leantrain.bench import layouts
from leantrain.bench.layouts import Candidate, candidates, time_layouts, winner
from leantrain.bench.memory_estimate import Layout
from leantrain.cli import main
from leantrain.config import config_from_dict

CFG = config_from_dict({"data": {"batch_size": 4}, "plan": {"grad_accum": 3}})


def test_the_candidates_are_the_layouts_the_model_can_take_each_keeping_the_global_batch():
    found = {c.name: c for c in candidates(shapes.llama_gqa(), CFG, 2)}
    assert list(found) == ["ddp", "fsdp", "tp=2", "pp=2"]
    # a tensor-parallel group sees one batch: twice as large, so the global batch stays
    assert found["tp=2"].settings["data.batch_size"] == 8
    # 2 stages on 2 processes: one pipeline, its step twice the micro-batches
    assert found["pp=2"].settings["plan.grad_accum"] == 6
    assert found["pp=2"].layout.strategy == "pp" and found["pp=2"].layout.microbatches == 6
    assert not any(c.failed for c in found.values())
    # 4 processes: 2 key/value heads (GQA) refuse tp=4, 2 blocks refuse pp=4: said, not run
    four = {c.name: c for c in candidates(shapes.llama_gqa(), CFG, 4)}
    assert list(four) == ["ddp", "fsdp", "tp=2", "pp=2", "tp=4", "pp=4"]
    assert four["pp=2"].layout.strategy == "fsdp"  # 2 pipelines
    assert "key/value heads (grouped-query) must divide by tp" in four["tp=4"].failed
    assert "has 2 blocks" in four["pp=4"].failed
    three = {c.name: c.failed for c in candidates(shapes.llama_gqa(), CFG, 3)}
    assert three["tp=2"] == "3 processes are not a multiple of 2" and three["ddp"] is None
    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))  # no plan, no blocks
    assert [c.name for c in candidates(plain, CFG, 2) if c.failed is None] == ["ddp", "fsdp"]


def test_the_runs_own_layout_does_not_leak_into_the_jobs_and_the_set_must_fill_a_batch(
        tmp_path, monkeypatch):
    """A --set plan.parallel.tp=2 of the user's ran every job with tp=2 (the "fsdp" one
    became a tensor-parallel baseline); a training set smaller than the global batch was
    trained as one short batch by some layouts and refused by the others."""
    seen = []
    monkeypatch.setattr(layouts, "price", lambda *args: None)
    monkeypatch.setattr(layouts, "time_layouts",
                        lambda found, cfg, *args: seen.append(cfg) or found)
    bundle = types.SimpleNamespace(train=list(range(64)))
    cfg = config_from_dict({"data": {"batch_size": 8}, "plan": {"parallel": {"tp": 2},
                                                                "distributed": "fsdp"}})
    layouts.bench_layouts(shapes.llama_gqa, bundle, cfg, 2, tmp_path, 1, 1, 60)
    assert seen[0].plan.parallel.tp == 1 and seen[0].plan.distributed == "auto"
    with pytest.raises(layouts.LeantrainError, match=r"= 128 samples, more than the training "
                                                     r"set's 64: lower data.batch_size"):
        layouts.bench_layouts(shapes.llama_gqa, bundle, config_from_dict(
            {"data": {"batch_size": 64}}), 2, tmp_path, 1, 1, 60)


def _timed(tmp_path, rates: dict, fits: dict | None = None, rounds: int = 3,
           fail: str | None = None) -> list[Candidate]:
    """time_layouts with each job's rate injected: `rates[name]` per round, in order."""
    found = [Candidate(name, {"plan.distributed": name}, Layout(2, "ddp")) for name in rates]
    for c in found:
        if fits and fits.get(c.name) is False:
            c.failed = "would not fit"
    calls = []

    def run(command, out):
        name = next(c.name for c in found if f"plan.distributed={c.name}" in command)
        calls.append(name)
        if name == fail:
            raise layouts.LeantrainError("out of memory")
        return rates[name][sum(1 for n in calls if n == name) - 1]

    time_layouts(found, CFG, 2, tmp_path, rounds, steps=5, budget_s=1e9, run=run)
    found[0].calls = calls
    return found


def test_a_layout_faster_in_every_round_wins_with_its_interval(tmp_path):
    found = _timed(tmp_path, {"ddp": [100, 90, 110], "fsdp": [150, 140, 160],
                              "tp": [95, 92, 105]})
    by = {c.name: c for c in found}
    assert by["ddp"].speedup == 1.0 and by["ddp"].interval is None
    assert by["fsdp"].speedup == pytest.approx(1.5) and by["fsdp"].interval[0] > 1
    assert by["tp"].interval[0] < 1 < by["tp"].interval[1] or by["tp"].interval[1] < 1
    assert winner(found).name == "fsdp"
    # interleaved: reversed every other round
    assert found[0].calls == ["ddp", "fsdp", "tp", "tp", "fsdp", "ddp", "ddp", "fsdp", "tp"]
    config = (tmp_path / "layouts" / "config.yaml").read_text()
    assert "batch_size: 4" in config  # the run's own config, written once for every job


def test_within_noise_the_reference_stays_and_a_failed_or_unfitting_layout_is_said(tmp_path):
    found = _timed(tmp_path, {"ddp": [100, 100, 100], "fsdp": [120, 80, 101],
                              "tp": [500, 500, 500], "pp": [1, 1, 1]},
                   fits={"tp": False}, fail="pp")
    by = {c.name: c for c in found}
    assert winner(found).name == "ddp"  # fsdp's interval includes 1
    assert by["tp"].rates == [] and by["tp"].failed == "would not fit"
    assert by["pp"].failed == "its job failed: out of memory"
    assert found[0].calls.count("pp") == 1  # not run again after its failure
    rows = layouts.format_layouts({"processes": 2, "rounds": 3, "steps": 5,
                                   "reference": "ddp", "winner": "ddp",
                                   "winner_settings": {"plan.distributed": "ddp"},
                                   "layouts": [c.to_dict() for c in found]})
    assert any("tp" in r and "not timed: would not fit" in r for r in rows)
    assert rows[-1].startswith("use ddp: no other layout is faster beyond noise")


def test_with_fewer_than_3_rounds_no_layout_can_win_and_one_timed_is_no_comparison(tmp_path):
    found = _timed(tmp_path, {"ddp": [100, 100], "fsdp": [300, 300]}, rounds=2)
    assert found[1].interval is None and winner(found).name == "ddp"
    alone = _timed(tmp_path, {"ddp": [100], "fsdp": [1]}, rounds=1, fail="fsdp")
    assert winner(alone) is None


@pytest.mark.parametrize("extra, fragment", [
    (["--layouts", "1"], "--layouts times launches of several processes on this machine: 2.."),
    (["--layouts", "2", "--rounds", "0"], "--rounds and --steps must be >= 1"),
    (["--layouts", "2", "--apply", "plan.yaml"], "--apply writes a plan of techniques"),
])
def test_bad_layout_arguments_are_one_line_before_any_work(tmp_path, capsys, extra, fragment):
    out = tmp_path / "bench"
    assert main(["bench", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]
    assert not out.exists()


@pytest.mark.slow
def test_bench_layouts_times_real_jobs_on_two_processes(tmp_path):
    """A small MLP (no tensor-parallel plan, no blocks): DDP and FSDP2, each a real launch of
    2 processes, 1 round; the file and the lines say what was timed."""
    module = tmp_path / "mine.py"
    module.write_text("import torch\nfrom torch import nn\nfrom torch.utils.data import "
                      "TensorDataset\n\ndef model():\n    return nn.Sequential(nn.Linear(8, 16), "
                      "nn.ReLU(), nn.Linear(16, 2))\n\ndef data():\n    g = torch.Generator()"
                      ".manual_seed(0)\n    x = torch.randn(128, 8, generator=g)\n    y = (x[:, 0] "
                      "> 0).long()\n    return TensorDataset(x[:96], y[:96]), TensorDataset("
                      "x[96:], y[96:])\n")
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, "-m", "leantrain", "bench", "--model", "mine:model", "--data",
         "mine:data", "--epochs", "1", "--layouts", "2", "--rounds", "1", "--steps", "3",
         "--out", str(out), "--set", "data.batch_size=16"],
        capture_output=True, text=True, cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "layouts.json").read_text())
    timed = [row for row in result["layouts"] if row["global_samples_per_second"]]
    assert [row["name"] for row in timed] == ["ddp", "fsdp"]
    assert all(len(row["global_samples_per_second"]) == 1 and
               row["global_samples_per_second"][0] > 0 for row in timed)
    assert "no tensor-parallel plan" in next(r["failed"] for r in result["layouts"]
                                             if r["name"] == "tp=2")
    assert result["winner"] == "ddp"  # one round: no interval, the reference stays
    assert "(no interval: under 3 rounds)" in done.stdout
    assert Path(out / "layouts" / "fsdp-round1" / "summary.json").is_file()
