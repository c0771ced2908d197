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


# ------------------------------------------------------------------ defaults for the user's model


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_unset_optim_keys_are_torch_optims_own_defaults(name):
    import inspect

    import torch

    from leantrain.config import TORCH_OPTIM_DEFAULTS, OptimConfig
    from leantrain.techniques.optimizer import build_optimizer

    signature = inspect.signature(getattr(torch.optim, {"sgd": "SGD", "adam": "Adam",
                                                        "adamw": "AdamW"}[name]))
    for key, value in TORCH_OPTIM_DEFAULTS[name].items():
        if key in signature.parameters:
            assert signature.parameters[key].default == value, key
    group = build_optimizer(torch.nn.Linear(2, 2).parameters(),
                            OptimConfig(name=name)).param_groups[0]
    assert group["lr"] == TORCH_OPTIM_DEFAULTS[name]["lr"]
    assert group["weight_decay"] == TORCH_OPTIM_DEFAULTS[name]["weight_decay"]
    assert not group.get("nesterov") and not group.get("momentum")


def _args(*argv):
    from leantrain.cli import build_parser

    return build_parser().parse_args(["train", *argv])


def test_a_recipe_trains_its_model_with_its_tuned_settings_and_yours_with_the_defaults():
    from leantrain.commands.common import config_from_args

    digits = config_from_args(_args())
    assert (digits.optim.name, digits.optim.lr, digits.optim.nesterov) == ("sgd", 0.1, True)
    assert (digits.schedule.name, digits.schedule.warmup_fraction) == ("onecycle", 0.25)
    yours = config_from_args(_args("--model", "mymod:build"))
    assert yours.optim == load_config().optim and yours.schedule == load_config().schedule
    assert yours.data.source == "digits"  # the recipe's data stays
    text = config_from_args(_args("--recipe", "text-gpt", "--model", "mymod:build",
                                  "--set", "optim.lr=3e-4"))
    assert text.data.context == 128 and text.optim.lr == 3e-4 and text.schedule.name == "constant"


def test_wsd_decay_must_fit_after_the_warm_up():
    with pytest.raises(LeantrainError, match="schedule.decay_fraction' must be in"):
        load_config(None, ["schedule.name=wsd", "schedule.warmup_fraction=0.5",
                           "schedule.decay_fraction=0.6"])
