"""`leantrain compress`: a before/after report per stage, and bad input that writes nothing."""

import json
import re

import pytest
import torch

from leantrain.cli import main
from leantrain.compress.prune import load_pruned
from leantrain.recipes.models import SmallCNN


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("base") / "run"
    assert main(["train", "--epochs", "1", "--out", str(run), "--no-progress"]) == 0
    return run


def test_compress_prunes_reports_each_stage_and_saves_a_reloadable_model(trained, tmp_path):
    out = tmp_path / "small"
    assert main(["compress", "--checkpoint", str(trained), "--prune", "0.5",
                 "--finetune-epochs", "1", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    before, after = report["stages"]
    assert before["stage"] == "trained" and after["stage"] == "pruned (structured)"
    assert before["macs"] / after["macs"] > 3
    assert after["parameters"] < before["parameters"] and after["file_bytes"] < before[
        "file_bytes"]
    assert all(s["latency_b1_ms"] > 0 and s["latency_b64_ms"] > 0 for s in report["stages"])
    assert (out / "report.png").stat().st_size > 0
    model = load_pruned(SmallCNN(1, 10), out / "model.pt").eval()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("extra, message", [
    (["--prune", "1.5"], r"must be in \(0, 1\)"),
    (["--prune", "0"], r"must be in \(0, 1\)"),
    ([], "nothing to do"),
])
def test_bad_arguments_exit_2_and_write_nothing(trained, tmp_path, capsys, extra, message):
    out = tmp_path / "c"
    assert main(["compress", "--checkpoint", str(trained), *extra, "--out", str(out)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_a_checkpoint_of_another_model_is_a_clear_error(tmp_path, capsys):
    other = tmp_path / "other.pt"
    torch.save(SmallCNN(1, 10, width=8).state_dict(), other)
    out = tmp_path / "c"
    assert main(["compress", "--checkpoint", str(other), "--prune", "0.5",
                 "--out", str(out)]) == 2
    assert "does not match the model" in capsys.readouterr().err
    assert not out.exists()
