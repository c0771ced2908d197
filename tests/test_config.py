import pytest

from leantrain.config import TrainConfig, config_from_dict, load_config, parse_override
from leantrain.errors import LeantrainError


def test_defaults_are_valid():
    cfg = load_config()
    assert cfg == TrainConfig()
    assert cfg.data.source == "digits" and cfg.plan.precision == "auto"


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(LeantrainError) as err:
        config_from_dict({"optim": {"lrr": 0.1}})
    msg = str(err.value)
    assert "optim.lrr" in msg and "lr" in msg and "momentum" in msg


def test_unknown_top_level_section():
    with pytest.raises(LeantrainError, match="unknown config key 'optimizer'"):
        config_from_dict({"optimizer": {}})


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"optim": {"lr": "fast"}}, "'optim.lr' has value 'fast' (str); allowed: float"),
        ({"data": {"batch_size": 3.5}}, "'data.batch_size' has value 3.5"),
        ({"plan": {"channels_last": "yes"}}, "allowed: 'auto' | bool"),
        ({"plan": {"precision": "int4"}}, "'fp32'"),
        ({"train": {"epochs": True}}, "'train.epochs' has value True"),
        ({"optim": 3}, "section 'optim' must be a mapping"),
    ],
)
def test_wrong_type_names_key_value_and_allowed(values, fragment):
    with pytest.raises(LeantrainError) as err:
        config_from_dict(values)
    assert fragment in str(err.value)


def test_int_is_accepted_where_float_is_expected():
    assert config_from_dict({"optim": {"lr": 1}}).optim.lr == 1.0


@pytest.mark.parametrize("override, fragment", [
    ("train.target_acc=1.5", "in (0, 1]"), ("data.batch_size=0", "> 0"),
    ("data.val_fraction=1", "in (0, 1)"), ("train.clip_norm=-1", "> 0"),
])
def test_ranges_are_checked(override, fragment):
    with pytest.raises(LeantrainError, match="must be"):
        load_config(None, [override])


def test_override_parsing_uses_yaml_types():
    assert parse_override("optim.lr=0.05") == {"optim": {"lr": 0.05}}
    assert parse_override("plan.compile=true") == {"plan": {"compile": True}}
    assert parse_override("train.target_acc=null") == {"train": {"target_acc": None}}
    with pytest.raises(LeantrainError, match="section.key=value"):
        parse_override("optim.lr")


def test_precedence_defaults_base_file_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 0.3\n  momentum: 0.5\ntrain:\n  epochs: 2\n")
    cfg = load_config(path, ["optim.lr=0.01"], base={"optim": {"lr": 9.0, "weight_decay": 0.0}})
    assert cfg.optim.lr == 0.01 and cfg.optim.momentum == 0.5
    assert cfg.optim.weight_decay == 0.0 and cfg.train.epochs == 2


def test_missing_or_bad_yaml_file(tmp_path):
    with pytest.raises(LeantrainError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed")
    with pytest.raises(LeantrainError, match="not valid YAML"):
        load_config(bad)


def test_exponent_floats_without_a_dot_are_floats():
    """YAML 1.1 reads `6e-4` as a string; the config takes it as the float it means."""
    cfg = load_config(None, ["optim.lr=6e-4"])
    assert cfg.optim.lr == 6e-4
    with pytest.raises(LeantrainError, match="optim.lr"):
        load_config(None, ["optim.lr=six"])
