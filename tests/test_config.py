"""Config dataclasses: unknown keys and bad values are one-line errors; every shipped sweep file parses."""

from pathlib import Path

import pytest

from fer_ray.config import ConfigError, SweepConfig, TrainConfig, load_sweep, set_path

SWEEPS = sorted((Path(__file__).parent.parent / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_sweep_file_parses(path):
    cfg = load_sweep(path)
    assert cfg.asha.max_t <= cfg.train.epochs
    assert cfg.name


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"train: unknown key 'learning_rate'"):
        TrainConfig.from_dict({"learning_rate": 0.1}, "train")


def test_nested_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"sweep\.train\.augment: unknown key 'flip'"):
        SweepConfig.from_dict({"train": {"augment": {"flip": 1}}}, "sweep")


@pytest.mark.parametrize("field,value,msg", [
    ("lr", -1.0, "lr: must be > 0"),
    ("model", "no_such_net", "unknown model 'no_such_net'"),
    ("optimizer", "lbfgs", "optimizer: must be one of"),
    ("label_smoothing", 1.5, "label_smoothing"),
    ("epochs", 0, "epochs: must be >= 1"),
])
def test_bad_values(field, value, msg):
    with pytest.raises(ConfigError, match=msg):
        TrainConfig.from_dict({field: value}, "train")


def test_search_space_must_name_train_fields_and_valid_values():
    with pytest.raises(ConfigError, match="search_space.nope: is not a train config field"):
        SweepConfig.from_dict({"search_space": {"nope": {"choice": [1]}}})
    with pytest.raises(ConfigError, match=r"search_space.model: value 'bogus' is invalid"):
        SweepConfig.from_dict({"search_space": {"model": {"choice": ["bogus"]}}})
    with pytest.raises(ConfigError, match=r"needs \[low, high\]"):
        SweepConfig.from_dict({"search_space": {"lr": {"uniform": [1.0, 0.1]}}})


def test_asha_budget_cannot_exceed_epochs():
    with pytest.raises(ConfigError, match="max_t"):
        SweepConfig.from_dict({"train": {"epochs": 2}, "asha": {"max_t": 5}})


def test_yaml_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: invalid YAML"):
        load_sweep(bad)
    with pytest.raises(ConfigError, match="no such config file"):
        load_sweep(tmp_path / "missing.yaml")


def test_set_path_copies():
    d = {"a": {"b": 1}, "c": 2}
    assert set_path(d, "a.b", 3) == {"a": {"b": 3}, "c": 2}
    assert d["a"]["b"] == 1


def test_tta_views_are_checked_when_the_sweep_is_read():
    assert SweepConfig.from_dict({"name": "x", "tta_views": ["identity", "hflip+rot10", "shift2,0"]})
    with pytest.raises(ConfigError, match=r"tta_views: unknown TTA view 'shift2'.*quote views"):
        SweepConfig.from_dict({"name": "x", "tta_views": ["shift2", 0]})  # what unquoted `shift2,0` parses to
