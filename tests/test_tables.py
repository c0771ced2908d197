"""A labelled text table (`--data x.jsonl|.parquet|.arrow`, `data.text_field` and
`data.label_column`): read by `datasets` into its memory-mapped cache, tokenized once, padded
per batch; a classifier learns on it, and a wrong column or label is one line."""

import json
import random

import pytest

from leantrain.cli import main

datasets = pytest.importorskip("datasets")

MODEL = '''
import torch

class Bag(torch.nn.Module):
    """Mean of the token embeddings under the attention mask, then a linear head."""
    def __init__(self, vocab=1000, classes=2):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, 32)
        self.head = torch.nn.Linear(32, classes)

    def forward(self, input_ids, attention_mask):
        mask = attention_mask.unsqueeze(-1).float()
        return self.head((self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1))

def model():
    return Bag()

def three():
    return Bag(classes=3)
'''


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANTRAIN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "bag.py").write_text(MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))


def reviews(n: int, seed: int = 0) -> list[dict]:
    """Rows whose label shows in their words: 'fine' rows praise, 'poor' ones complain."""
    rng = random.Random(seed)
    good, bad, filler = ["great", "lovely", "superb"], ["awful", "broken", "dull"], \
        ["the", "film", "was", "and", "plot", "cast", "a"]
    rows = []
    for _ in range(n):
        label = rng.choice(["fine", "poor"])
        words = rng.sample(filler, 4) + [rng.choice(good if label == "fine" else bad)]
        rng.shuffle(words)
        rows.append({"review": " ".join(words), "verdict": label})
    return rows


ARGS = ["--model", "bag:model", "--set", "data.text_field=review", "--set",
        "data.label_column=verdict", "--set", "optim.lr=0.05", "--set", "train.epochs=6",
        "--set", "data.batch_size=16", "--no-progress", "--set", "train.monitor_interval_s=0"]


def test_a_jsonl_table_with_string_labels_trains_a_classifier_that_learns(tmp_path):
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in reviews(320)))
    out = tmp_path / "run"
    assert main(["train", "--data", str(path), "--out", str(out), *ARGS]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_accuracy"] > 0.9  # bytes only (no tokenizer): the words still show


def test_a_parquet_table_with_class_indices_trains(tmp_path):
    rows = [{"review": r["review"], "verdict": int(r["verdict"] == "fine")}
            for r in reviews(200)]
    path = tmp_path / "reviews.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    out = tmp_path / "run"
    assert main(["train", "--data", str(path), "--out", str(out), *ARGS,
                 "--set", "train.max_steps=5"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 5


@pytest.mark.parametrize("rows, more, fragment", [
    ([{"text": "a", "verdict": "x"}] * 4, [], "no column 'review' (data.text_field); its "
                                             "columns: text, verdict"),
    ([{"review": "a", "verdict": 0.5}] * 4, [], "label column 'verdict' holds float64"),
    ([{"review": "a", "verdict": -1}] * 4, [], "label column 'verdict' holds -1"),
    ([{"review": "a", "verdict": 1}], [], "1 row(s)"),
])
def test_a_table_that_cannot_train_is_one_line(tmp_path, capsys, rows, more, fragment):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(["train", "--data", str(path), "--out", str(out), *ARGS, *more]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0] and len(err[0]) < 300, err
    assert not out.exists()
