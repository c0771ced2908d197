"""`leantrain doctor`: machine facts, a short profile, ranked recommendations."""

import json

import pytest
import torch

from leantrain.bench.doctor import Recommendation, recommend
from leantrain.cli import main
from leantrain.env import machine_facts


def test_doctor_on_this_machine_exits_0_reports_facts_profile_and_recommendations(
        tmp_path, capsys):
    out = tmp_path / "doctor"
    code = main(["doctor", "--steps", "3", "--no-compile-check", "--epochs", "1",
                 "--set", "plan.precision=fp32", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    if not torch.cuda.is_available():
        assert "no GPU" in printed
    report = json.loads((out / "doctor.json").read_text())
    assert report["facts"]["cpu"]["physical_cores"] >= 1
    assert report["facts"]["distributed"]["gloo"] is True
    assert report["measured"]["samples_per_second"] > 0
    assert sum(report["measured"]["step_breakdown"]["fractions"].values()) == pytest.approx(1)
    assert report["top_operators"] and report["top_operators"][0]["self_ms"] > 0
    trace = json.loads((out / "trace.json").read_text())
    assert trace["traceEvents"]
    recs = report["recommendations"]
    assert all(isinstance(r["measured"], bool) for r in recs)
    measured_flags = [r["measured"] for r in recs]
    assert measured_flags == sorted(measured_flags, reverse=True)  # measured ones first
    if report["facts"]["bf16"]["cpu"].startswith("CPU has native"):
        assert any("plan.precision=bf16" in r["advice"] for r in recs)


def test_doctor_rejects_zero_steps_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "doctor"
    assert main(["doctor", "--steps", "0", "--out", str(out)]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert not out.exists()


def test_measured_recommendations_rank_by_their_share_of_step_time():
    recs = [Recommendation("b", "", False), Recommendation("a", "", True, 0.3),
            Recommendation("c", "", True, 0.6)]
    recs.sort(key=lambda r: (not r.measured, -r.share))
    assert [r.advice for r in recs] == ["c", "a", "b"]
    assert recs[0].describe().startswith("[measured]")
    assert recs[2].describe().startswith("[unmeasured]")


def test_a_data_bound_profile_is_the_first_recommendation(tabular):
    from conftest import mlp

    from leantrain import load_config
    from leantrain.run.plan import build

    cfg = load_config(None, ["plan.device=cpu", "plan.optimizer_impl=for-loop"])
    run = build(cfg, mlp(), *tabular)
    facts = machine_facts(check_compile=False)
    measured = {"step_breakdown": {"fractions": {"data": 0.5, "copy": 0.0, "forward": 0.1,
                                                 "backward": 0.1, "optimizer": 0.3}}}
    recs = recommend(run, measured, facts)
    assert recs[0].measured and "data wait is 50%" in recs[0].evidence
    assert recs[1].measured and "optimizer" in recs[1].advice


@pytest.mark.slow
def test_machine_facts_compile_check_really_compiles():
    ok, why = machine_facts(check_compile=True)["compile"]
    assert ok, why
    assert "compiled and ran" in why


def test_doctor_profiles_a_run_over_a_stream(tmp_path, capsys, monkeypatch):
    (tmp_path / "numbered_stream.py").write_text(
        "import torch\nfrom torch.utils.data import IterableDataset\n\n"
        "class Numbered(IterableDataset):\n    def __init__(self, n):\n        self.n = n\n\n"
        "    def __iter__(self):\n        g = torch.Generator().manual_seed(self.n)\n"
        "        for _ in range(self.n):\n            x = torch.randn(8, generator=g)\n"
        "            yield x, int(x[0] > 0)\n\n"
        "def data():\n    return Numbered(512), Numbered(64)\n\n"
        "def model():\n    return torch.nn.Linear(8, 2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "doctor"
    assert main(["doctor", "--steps", "3", "--no-compile-check", "--no-profile", "--data",
                 "numbered_stream:data", "--model", "numbered_stream:model", "--set",
                 "train.max_steps=50", "--out", str(out)]) == 0
    report = json.loads((out / "doctor.json").read_text())
    assert report["measured"]["samples_per_second"] > 0
