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
    assert 0 <= report["load"]["others_share"] <= 1  # what else ran while stages were timed
    model = load_pruned(SmallCNN(1, 10), out / "model.pt").eval()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("extra, message", [
    (["--prune", "1.5"], r"must be in \(0, 1\)"),
    (["--prune", "0"], r"must be in \(0, 1\)"),
    ([], "nothing to do"),
    (["--prune", "0.5", "--finetune-lr", "0"], "--finetune-lr must be a finite number > 0"),
    (["--prune", "0.5", "--finetune-lr", "nan"], "--finetune-lr must be a finite number > 0"),
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


# ------------------------------------------------------------------ verdicts


def _stage(name, latency=10.0, size=1000, accuracy=0.9, compiled=None):
    stage = {"stage": name, "note": "", "parameters": 100, "macs": 1000, "file_bytes": size,
             "val_accuracy": accuracy, "latency_b1_ms": 1.0, "latency_b64_ms": latency}
    if compiled is not None:
        stage["latency_compiled_b64_ms"], stage["latency_compiled_b64_ms_before"] = compiled
    return stage


def _paired(name, ratio, interval, size=500):
    return {**_stage(name, latency=10.0, size=size),
            "speedup_b64": {"ratio": ratio, "interval": interval, "rounds": 5, "kind": "b64"}}


@pytest.mark.parametrize("stage, verdict, fragment", [
    (_stage("slower", latency=30.0, size=500), "harmful", "slower: 30.00 ms vs 10.00 ms"),
    (_stage("bigger", size=1200), "harmful", "bigger: 1,200 vs 1,000 bytes"),
    (_stage("lossy", latency=5.0, accuracy=0.85), "harmful", "accuracy falls 5.0%"),
    (_stage("same", latency=10.2), "not worth it", "neither 5% smaller nor faster"),
    (_stage("faster", latency=5.0), "keep", "faster: 5.00 ms vs 10.00 ms (b64)"),
    # int8 judged compiled against the model before it, compiled
    (_stage("int8", latency=40.0, size=400, compiled=(31.0, 89.7)), "keep",
     "faster: 31.00 ms vs 89.70 ms (compiled b64)"),
    # paired rounds decide when there are: faster or slower only when the whole interval is
    (_paired("paired", 2.0, [1.8, 2.2]), "keep",
     "faster: 2.00x the speed of the stage before (95% 1.80-2.20, 5 paired rounds, b64)"),
    (_paired("straddles", 1.6, [0.7, 2.5], size=1000), "not worth it",
     "neither 5% smaller nor faster (1.60x"),
    (_paired("too few", 3.0, None, size=1000), "not worth it", "(95% n/a, 5 paired rounds"),
    (_paired("slower", 0.5, [0.4, 0.6]), "harmful", "slower: 0.50x the speed"),
    (_stage("int8", latency=5.0, size=400, compiled=(310.0, 89.7)), "harmful",
     "slower: 310.00 ms vs 89.70 ms (compiled b64)"),
])
def test_each_stage_gets_a_verdict_against_the_one_before(stage, verdict, fragment):
    from leantrain.compress.verdict import judge_all
    stages = judge_all([_stage("trained"), stage], max_drop=0.01)
    assert stages[1]["verdict"] == verdict and fragment in stages[1]["why"], stages[1]["why"]


def test_a_stage_that_makes_the_model_slower_is_marked_harmful_in_the_report():
    from leantrain.commands.compress import format_compression
    from leantrain.compress.verdict import judge_all
    stages = judge_all([_stage("trained"), _stage("int8 (Linear layers)", latency=31.0)], 0.01)
    report = {"stages": stages, "recommend_against": ["int8 (Linear layers)"]}
    text = format_compression(report)
    row = next(line for line in text.splitlines() if line.startswith("int8"))
    assert "harmful: slower" in row
    assert "recommendation: do not apply int8 (Linear layers)" in text


def test_the_cli_report_carries_verdicts_and_a_readable_chart(trained, tmp_path, capsys):
    from PIL import Image
    out = tmp_path / "small"
    assert main(["compress", "--checkpoint", str(trained), "--prune", "0.5",
                 "--finetune-epochs", "1", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["stages"][0]["verdict"] == "reference"
    assert report["stages"][1]["verdict"] in ("keep", "not worth it", "harmful")
    assert "verdict" in capsys.readouterr().out
    width, height = Image.open(out / "report.png").size
    assert width / height < 3  # a grid of panels, not a strip


def test_a_max_drop_out_of_range_is_refused(trained, tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["compress", "--checkpoint", str(trained), "--prune", "0.5", "--max-drop",
                 "2", "--out", str(out)]) == 2
    assert "--max-drop must be in [0, 1)" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------ int8


def test_int8_static_makes_a_conv_model_smaller_and_faster_compiled_and_saves_a_program(
        trained, tmp_path, capsys):
    from leantrain.config import DataConfig
    from leantrain.data import load_data

    out = tmp_path / "q"
    assert main(["compress", "--checkpoint", str(trained), "--quantize", "int8-static",
                 "--out", str(out), "--no-progress"]) == 0
    assert "model: " + str(out / "model.pt2") in capsys.readouterr().out
    before, after = json.loads((out / "report.json").read_text())["stages"]
    assert after["stage"] == "int8-static" and after["macs_counted_on"] == "the float graph"
    assert before["file_bytes"] / after["file_bytes"] > 3.5  # int8 weights, not float kept
    assert after["parameters"] == before["parameters"]  # every weight kept, as int8
    assert after["latency_compiled_b64_ms"] > 0 and after["latency_compiled_b64_ms_before"] > 0
    assert not (out / "model.pt").exists()
    x, _ = load_data(DataConfig()).val.tensors
    fp32 = SmallCNN(1, 10)
    fp32.load_state_dict(torch.load(trained / "model.pt", weights_only=True))
    program = torch.export.load(out / "model.pt2").module()  # any batch size, not only 2
    with torch.no_grad():
        ref, got = fp32.eval()(x[:5]), program(x[:5])
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()


def _saved_hf(tmp_path, monkeypatch, example: str):
    """A stock Hugging Face example model's untrained weights as a checkpoint, and its
    command-line arguments."""
    import importlib
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    module = importlib.import_module(example)
    checkpoint = tmp_path / "weights.pt"
    torch.manual_seed(0)
    torch.save(module.model().state_dict(), checkpoint)
    return checkpoint, ["--model", f"{example}:model", "--data", f"{example}:data"]


def test_int8_static_on_a_model_with_keyword_inputs_exits_2_before_anything(tmp_path, capsys,
                                                                          monkeypatch):
    pytest.importorskip("transformers")
    checkpoint, hf = _saved_hf(tmp_path, monkeypatch, "hf_sequence_classification")
    out = tmp_path / "q"
    assert main(["compress", *hf, "--checkpoint", str(checkpoint), "--quantize", "int8-static",
                 "--out", str(out), "--no-progress"]) == 2
    assert "int8-static takes a model called on one tensor" in capsys.readouterr().err
    assert not out.exists()


def test_int8_dynamic_on_a_stock_gpt2_from_the_cli_quantizes_its_conv1d(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    checkpoint, hf = _saved_hf(tmp_path, monkeypatch, "hf_causal_lm")
    out = tmp_path / "q"
    # --keep-harmful: the int8 file is checked whatever this machine's latencies judge
    assert main(["compress", *hf, "--checkpoint", str(checkpoint), "--quantize", "int8-dynamic",
                 "--keep-harmful", "--out", str(out), "--no-progress"]) == 0
    before, after = json.loads((out / "report.json").read_text())["stages"]
    assert after["stage"] == "int8-dynamic (Linear layers)"
    assert after["file_bytes"] < 0.8 * before["file_bytes"]  # its blocks' weights are int8
    assert after["parameters"] <= before["parameters"]  # the tied head stays tied
    assert after["verdict"] in ("keep", "not worth it", "harmful") and after["why"]
    assert torch.load(out / "model.pt", weights_only=True)  # a weights-only checkpoint


def test_fine_tuning_runs_at_half_the_runs_lr_with_its_optimizer_unless_told():
    from leantrain.commands.compress import CompressArgs
    from leantrain.config import load_config

    digits = load_config(None, ["optim.name=sgd", "optim.lr=0.1"])
    assert CompressArgs(prune=0.5).tuning_lr(digits) == pytest.approx(0.05)
    assert CompressArgs(prune=0.5).tuning_lr(load_config()) == pytest.approx(5e-4)  # AdamW
    assert CompressArgs(prune=0.5, finetune_lr=0.02).tuning_lr(digits) == 0.02


def _trained(source: list[str], epochs: int, tmp_path) -> str:
    """A run folder of `leantrain train` on the model and data `source` names."""
    run = tmp_path / "run"
    assert main(["train", *source, "--epochs", str(epochs), "--out", str(run)]) == 0
    return str(run)


def test_a_regression_model_is_judged_by_its_validation_loss(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))  # model_types
    source = ["--model", "model_types:mlp_1", "--data", "model_types:regression", "--set",
              "optim.lr=1e-2", "--set", "train.monitor_interval_s=0", "--no-progress"]
    run = _trained(source, 6, tmp_path)
    out = tmp_path / "small"
    assert main(["compress", *source, "--checkpoint", run, "--quantize", "int8-dynamic",
                 "--max-drop", "0.5", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [s["val_accuracy"] for s in report["stages"]] == [None, None]
    assert all(s["val_loss"] > 0 for s in report["stages"])
    quantized = report["stages"][1]
    assert quantized["verdict"] in ("keep", "not worth it", "harmful") and quantized["why"]
    assert "loss " in capsys.readouterr().out  # the table's quality column


def test_without_an_accuracy_the_verdict_counts_the_validation_loss_rise():
    from leantrain.compress.verdict import judge

    before = {"val_accuracy": None, "val_loss": 0.2, "file_bytes": 100, "latency_b64_ms": 1.0}
    worse = {**before, "val_loss": 0.3, "file_bytes": 50}
    assert judge(worse, before, 0.1) == ("harmful", "validation loss rises 50.0%, more than "
                                                    "--max-drop 10.0%")
    fine = {**before, "val_loss": 0.201, "file_bytes": 50}
    assert judge(fine, before, 0.1) == ("keep", "2.00x smaller file; validation loss +0.5%")


def test_a_harmful_stage_leaves_the_report_and_no_model_unless_asked(trained, tmp_path,
                                                                      capsys):
    from leantrain.compress import verdict

    stages = [{"stage": "trained", "val_accuracy": 0.9, "val_loss": 0.3, "file_bytes": 100,
               "latency_b64_ms": 1.0},
              {"stage": "pruned", "val_accuracy": 0.5, "val_loss": 1.3, "file_bytes": 50,
               "latency_b64_ms": 0.5}]
    assert verdict.judge_all(stages, 0.01)[1]["verdict"] == verdict.HARMFUL
    out = tmp_path / "c"
    # a pruning ratio this high on one fine-tuning epoch costs the digits CNN its accuracy
    args = ["compress", "--checkpoint", str(trained), "--prune", "0.95", "--finetune-epochs",
            "1", "--finetune-lr", "1e-4", "--max-drop", "0", "--no-progress"]
    assert main([*args, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["recommend_against"] and report["model_file"] is None
    assert not (out / "model.pt").exists()
    assert "not written" in capsys.readouterr().out
    kept = tmp_path / "kept"
    assert main([*args, "--keep-harmful", "--out", str(kept)]) == 0
    assert (kept / "model.pt").exists()


def test_a_head_used_only_by_the_loss_is_pruned_with_the_rest_and_still_trains(tmp_path,
                                                                               monkeypatch):
    """examples/named_losses.py: an auxiliary head that only the loss terms read (the model
    computes them when given labels). Traced without labels, the head was left out of the
    graph: its input was pruned, its weight was not, and fine-tuning failed."""
    from pathlib import Path

    examples = Path(__file__).parents[1] / "examples"
    monkeypatch.syspath_prepend(str(examples))
    from named_losses import TwoTerms

    source = ["--model", "named_losses:model", "--data", "named_losses:data", "--set",
              "optim.lr=3e-2", "--set", "train.monitor_interval_s=0", "--no-progress"]
    run = _trained(source, 8, tmp_path)
    out = tmp_path / "small"
    assert main(["compress", *source, "--checkpoint", run, "--prune", "0.5",
                 "--finetune-epochs", "2", "--keep-harmful", "--out", str(out)]) == 0
    before, after = json.loads((out / "report.json").read_text())["stages"]
    assert after["parameters"] < before["parameters"]
    assert before["val_accuracy"] > 0.8
    assert after["val_accuracy"] > 0.7  # it still tells its classes apart
    model = load_pruned(TwoTerms(), out / "model.pt")
    assert model.aux.in_features == model.classes.in_features < 32
    x = torch.randn(4, 8)
    found = model(x, labels=torch.zeros(4, dtype=torch.long))
    assert found["logits"].shape == (4, 3) and torch.isfinite(found["loss_aux"])


def test_a_gqa_llama_is_refused_in_one_line_before_any_stage_is_measured(tmp_path, monkeypatch,
                                                                         capsys):
    from pathlib import Path

    from leantrain.commands import compress

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "examples"))
    source = ["--model", "hf_padded_causal_lm:model", "--data", "hf_padded_causal_lm:data",
              "--set", "train.monitor_interval_s=0", "--no-progress"]
    run = _trained(source, 1, tmp_path)
    capsys.readouterr()
    monkeypatch.setattr(compress, "measure_stage",
                        lambda *a, **k: pytest.fail("a stage was measured before the refusal"))
    out = tmp_path / "small"
    assert main(["compress", *source, "--checkpoint", run, "--prune", "0.5",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "grouped-query attention (2 query heads per key/value head)" in err[-1]
    assert len(err[-1]) < 300 and not any("Traceback" in line for line in err)
    assert not out.exists()
