"""Hostile inputs, generated: through the CLI's real entry point, every one ends in exit 2 and
one line under 300 characters that names what is wrong, with no traceback and nothing in
`--out` that would block running the same command again.

The default profile keeps to a few examples per class (the suite stays fast); the slow test at
the end runs every class with many more.
"""

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leantrain.cli import main

FAST = ["--no-progress", "--set", "train.monitor_interval_s=0"]
QUICK = settings(max_examples=8, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture,
                                        HealthCheck.too_slow])
LONGER = settings(QUICK, max_examples=60, derandomize=False)


def both(**strategy):
    """A property as two tests: a few fixed examples in the default suite, many random ones in
    the slow profile (`-m slow`)."""
    def make(body):
        quick = QUICK(given(**strategy)(body))
        longer = pytest.mark.slow(LONGER(given(**strategy)(body)))
        return quick, longer
    return make


def refused(capsys, argv: list[str], *fragments: str) -> str:
    """Run the CLI; it must exit 2 with one bounded error line and no traceback."""
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own refusals
        code = stop.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (argv, err)
    assert len(err) == 1 and err[-1].startswith("leantrain: error:"), err  # the whole stderr
    assert len(err[-1]) < 300, err[-1]
    assert not any("Traceback" in line for line in err), err
    for fragment in fragments:
        assert fragment in err[-1], err[-1]
    return err[-1]


def rerunnable(out: Path) -> None:
    """Nothing was written that the same command would then refuse."""
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


# ------------------------------------------------------------------ files the user passes


def random_bytes_as_a_config_plan_or_space_file(content, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / "given.yaml", Path(tmp) / "run"
        path.write_bytes(content)
        try:
            parsed = yaml.safe_load(content)
        except Exception:
            parsed = "unreadable"
        if parsed is None or parsed == {}:  # an empty file is a valid, empty config
            return
        for argv in (["train", "--config", str(path)], ["train", "--plan", str(path)],
                     ["tune", "--space", str(path), "--trials", "1", "--target",
                      "val_accuracy>=0.5"]):
            refused(capsys, [*argv, "--out", str(out), *FAST], "given.yaml")
            rerunnable(out)


YAML_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=30),
                        st.floats(allow_nan=True, allow_infinity=True))
YAML_TREES = st.recursive(YAML_LEAVES, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=20)


def yaml_structures_that_are_not_a_config(tree, capsys):
    # every generated tree has a key or a value leantrain does not take
    tree.setdefault("junk", 1)
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / "config.yaml", Path(tmp) / "run"
        path.write_text(yaml.safe_dump(tree))
        refused(capsys, ["train", "--config", str(path), "--out", str(out), *FAST])
        rerunnable(out)


def random_bytes_as_a_csv_file(content, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / "rows.csv", Path(tmp) / "run"
        path.write_bytes(content)
        refused(capsys, ["train", "--data", str(path), "--epochs", "1", "--out", str(out),
                         *FAST], "rows.csv")
        rerunnable(out)


@st.composite
def npz_arrays_with_one_defect(draw) -> dict[str, np.ndarray]:
    """A well-formed (x, y) pair of random size with one thing wrong that a user's export can
    get wrong: the shape, the sample count, a label, an input value, the dtype, the keys."""
    n, k = draw(st.integers(2, 40)), draw(st.integers(1, 6))
    x, y = np.zeros((n, k), np.float32), np.arange(n) % 3
    i = draw(st.integers(0, n - 1))
    bad_label = st.one_of(st.integers(max_value=-1), st.integers(2**20, 2**63 - 1),
                          st.sampled_from([math.nan, math.inf, 0.5, 1e30, -2.0]))
    defect = draw(st.sampled_from(["0-d", "empty", "one", "no features", "label", "input",
                                   "complex", "text labels", "lengths", "val shape", "no y"]))
    if defect == "0-d":
        return {"x": np.array(draw(st.floats())), "y": np.array(1)}
    if defect in ("empty", "one"):
        m = 0 if defect == "empty" else 1
        return {"x": x[:m], "y": y[:m]}
    if defect == "no features":
        return {"x": np.zeros((n, 0), np.float32), "y": y}
    if defect == "label":
        y = y.astype(float) if isinstance(label := draw(bad_label), float) else y
        y[i] = label
    elif defect == "input":
        x[i, draw(st.integers(0, k - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    elif defect == "complex":
        x = x + 1j
    elif defect == "text labels":
        y = np.array(["cat", "dog", "eel"])[y]
    elif defect == "lengths":
        y = np.resize(y, n + draw(st.sampled_from([-1, 1, 5])))
    elif defect == "val shape":
        return {"x": x, "y": y, "x_val": np.zeros((3, k + 1), np.float32), "y_val": y[:3]}
    else:
        return {"x": x}
    return {"x": x, "y": y}


def npz_files_with_a_defect(arrays, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / "given.npz", Path(tmp) / "run"
        np.savez(path, **arrays)
        refused(capsys, ["train", "--data", str(path), "--epochs", "1", "--out", str(out),
                         *FAST], "given.npz")
        rerunnable(out)


# ------------------------------------------------------------------ numbers on the command line


def _not_positive_ints():
    return st.one_of(st.integers(max_value=0), st.sampled_from(["nan", "inf", "1e400", "x", ""]))


def _not_positive_floats():
    return st.one_of(st.floats(max_value=0.0, allow_nan=False), st.just(math.nan),
                     st.just(math.inf), st.sampled_from(["1e400", "x", ""]))


def _outside_unit():
    return st.one_of(st.floats(min_value=1.0, exclude_min=True), st.floats(max_value=0.0),
                     st.just(math.nan))


# (the command up to the flag, the flag, values it must refuse); `{run}` is a trained digits run
NUMERIC_FLAGS = [
    (["train"], "--epochs", _not_positive_ints()),
    (["train"], "--target-acc", _outside_unit()),
    (["bench"], "--budget-s", _not_positive_floats()),
    (["bench"], "--loss-tol", _not_positive_floats()),
    (["doctor"], "--steps", _not_positive_ints()),
    (["find-batch-size"], "--max-size", _not_positive_ints()),
    (["find-batch-size"], "--memory-limit-gib", _not_positive_floats()),
    (["find-lr"], "--lr-min", _not_positive_floats()),
    (["find-lr"], "--steps", _not_positive_ints()),
    (["tune"], "--trials", _not_positive_ints()),
    (["tune", "--trials", "1", "--target", "val_accuracy>=0.5"], "--budget-s",
     _not_positive_floats()),
    (["tune", "--trials", "1", "--target", "val_accuracy>=0.5"], "--trial-steps",
     _not_positive_ints()),
    (["tune"], "--workers", _not_positive_ints()),
    (["compress", "--checkpoint", "{run}"], "--prune", _outside_unit()),
    (["compress", "--checkpoint", "{run}", "--prune", "0.5"], "--finetune-epochs",
     _not_positive_ints()),
    (["compress", "--checkpoint", "{run}", "--prune", "0.5"], "--finetune-lr",
     _not_positive_floats()),
    (["distill", "--teacher", "{run}", "--student-model",
      "leantrain.recipes.models:SmallCNN"], "--temperature", _not_positive_floats()),
    (["distill", "--teacher", "{run}", "--student-model",
      "leantrain.recipes.models:SmallCNN"], "--alpha", _outside_unit()),
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "run"
    assert main(["train", "--epochs", "1", "--out", str(out), *FAST]) == 0
    return out


def numbers_a_command_cannot_use_are_refused_before_any_work(case, capsys, trained_run):
    prefix, flag, value = case
    argv = [part.replace("{run}", str(trained_run)) for part in prefix]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        refused(capsys, [*argv, f"{flag}={value}", "--out", str(out), *FAST])
        rerunnable(out)


# ------------------------------------------------------------------ the tests

test_random_bytes_as_a_config_plan_or_space_file, test_random_config_bytes_longer = both(
    content=st.binary(max_size=400))(random_bytes_as_a_config_plan_or_space_file)
test_yaml_structures_that_are_not_a_config, test_yaml_structures_longer = both(
    tree=st.dictionaries(st.sampled_from(["train", "optim", "data", "plan", "schedule", "model",
                                     "junk", ""]), YAML_TREES, min_size=1, max_size=3))(
    yaml_structures_that_are_not_a_config)
test_random_bytes_as_a_csv_file, test_random_csv_bytes_longer = both(
    content=st.binary(min_size=1, max_size=300))(random_bytes_as_a_csv_file)
test_npz_files_with_a_defect, test_npz_files_longer = both(
    arrays=npz_arrays_with_one_defect())(npz_files_with_a_defect)
test_numbers_a_command_cannot_use, test_numbers_longer = both(
    case=st.sampled_from(NUMERIC_FLAGS).flatmap(
        lambda c: st.tuples(st.just(c[0]), st.just(c[1]), c[2])))(
    numbers_a_command_cannot_use_are_refused_before_any_work)
