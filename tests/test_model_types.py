"""Every model type of the step contract through the CLI (`--model`/`--data`): train and doctor.

The Hugging Face examples and the tasks of `model_types` (token classification with -100
labels, regression, multi-label), each returned as is; each must learn (validation metric clearly
better than chance) and doctor must profile it.
"""

import json
from pathlib import Path

import pytest

from leantrain.cli import main

pytest.importorskip("transformers")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


# (model, data, extra --set values, summary key, bound it must beat)
CASES = {
    "sequence classification": ("hf_sequence_classification:model",
                                "hf_sequence_classification:data",
                                ["optim.lr=3e-3", "train.epochs=8"], "val_accuracy", 0.9),
    "causal lm": ("hf_causal_lm:model", "hf_causal_lm:data",
                  ["optim.lr=3e-3", "train.max_steps=40", "data.batch_size=32"],
                  "val_perplexity", -40.0),
    "image classification": ("hf_image_classification:model", "hf_image_classification:data",
                             ["optim.lr=2e-3", "train.epochs=4"], "val_accuracy", 0.4),
    "token classification": ("model_types:tagger", "model_types:tagged",
                             ["optim.lr=3e-3", "train.epochs=3"], "val_accuracy", 0.9),
    "regression": ("model_types:mlp_1", "model_types:regression",
                   ["optim.lr=1e-2", "train.epochs=10"], "val_mae", -0.4),
    "multi-label": ("model_types:mlp_4", "model_types:multilabel",
                    ["optim.lr=1e-2", "train.epochs=8"], "val_accuracy", 0.9),
}


@pytest.fixture
def code(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # model_types
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _args(model, data, overrides):
    sets = [part for value in ["optim.name=adamw", "optim.weight_decay=0",
                               "train.monitor_interval_s=0", *overrides]
            for part in ("--set", value)]
    return ["--model", model, "--data", data, *sets, "--no-progress"]


@pytest.mark.parametrize("case", list(CASES))
def test_each_model_type_trains_through_the_cli_and_learns(code, case, capsys):
    model, data, overrides, key, bound = CASES[case]
    out = code / "run"
    assert main(["train", *_args(model, data, overrides), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    value = summary[key]
    assert (value >= bound) if bound > 0 else (value <= -bound), (case, key, value)


@pytest.mark.parametrize("case", list(CASES))
def test_doctor_profiles_each_model_type(code, case, capsys):
    model, data, overrides, _, _ = CASES[case]
    out = code / "doctor"
    assert main(["doctor", *_args(model, data, overrides), "--steps", "2",
                 "--no-compile-check", "--out", str(out)]) == 0
    report = json.loads((out / "doctor.json").read_text())
    assert report["measured"]["samples_per_second"] > 0 and report["top_operators"]
