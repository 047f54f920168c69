"""Config dataclasses: unknown keys and bad values are one-line errors; every shipped sweep file parses."""

from pathlib import Path

import pytest

from fer_ray.config import ConfigError, DataConfig, SweepConfig, TrainConfig, load_sweep, parse_sweep, set_path
from fer_ray.models import check_model_names

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
    with pytest.raises(ConfigError, match=r"needs \[low, high\]"):
        SweepConfig.from_dict({"search_space": {"lr": {"uniform": [1.0, 0.1]}}})


@pytest.mark.parametrize("raw,msg", [
    ({"train": {"model": "no_such_net"}}, r"train.model: unknown model 'no_such_net' \(see `fer-ray models`"),
    ({"train": {"model": "timm/resnet18x"}}, r"train.model: unknown model 'timm/resnet18x' \(timm has no such"),
    ({"search_space": {"model": {"choice": ["basic_cnn", "bogus"]}}}, r"search_space.model: unknown model 'bogus'"),
    ({"placement": {"no_such_net": {}}}, r"placement.no_such_net: unknown model"),
])
def test_model_names_are_checked_where_models_live(raw, msg):
    cfg = SweepConfig.from_dict(raw, "sweep")  # the config itself knows no model names (it is a torch-free leaf)
    with pytest.raises(ConfigError, match=msg):
        check_model_names(cfg)
    check_model_names(SweepConfig.from_dict({"train": {"model": "timm/resnet18"}}, "sweep"))


@pytest.mark.parametrize("text,msg", [
    ("train: {lr: 1e-3}", r"s.yaml: sweep.train.lr: expected a number, got '1e-3' \(str\) \(YAML reads 1e-3 as "
                          r"text: write it with a dot, e.g. 1.0e-3\)"),
    ("train: {epochs: 2.5}", r"sweep.train.epochs: expected an integer, got 2.5"),
    ("train: {use_gpu: 'yes'}", r"sweep.train.use_gpu: expected true/false, got 'yes'"),
    ("data: [[path, x.csv]]", r"sweep.data: expected a mapping, got \[\[.path., .x.csv.\]\] \(list\)"),
    ("train: {augment: 3}", r"sweep.train.augment: expected a mapping, got 3 \(int\)"),
    ("tta_views: identity", r"sweep.tta_views: expected a list, got 'identity'"),
    ("search_space: {drop_rate: {uniform: [0.2, 1.5]}}", r"search_space.drop_rate: value 1.5 is invalid"),
    ("search_space: {lr: {loguniform: [0, 0.1]}}", r"search_space.lr: loguniform needs low > 0"),
    ("search_space: {epochs: {uniform: [2, 5]}}", r"search_space.epochs: value 2.0 is invalid .*expected an integer"),
    ("search_space: {epochs: {randint: [0, 5]}}", r"search_space.epochs: value 0 is invalid .*epochs: must be >= 1"),
])
def test_values_are_checked_against_their_type_and_field(text, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_sweep(text, "s.yaml")


def test_ints_are_accepted_where_floats_are_expected():
    cfg = parse_sweep("train: {lr: 1, weight_decay: 0}\ndata: {val_fraction: 0.2}", "s.yaml")
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float) and cfg.train.weight_decay == 0.0
    assert DataConfig.from_dict({"path": None}).path is None


@pytest.mark.subprocess
def test_config_is_a_torch_free_leaf():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import fer_ray.config; fer_ray.config.load_sweep("
                          f"{str(SWEEPS[0])!r})"], capture_output=True, text=True, check=True)
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert not {m for m in imported if m.split(".")[0] in ("torch", "kornia", "timm", "ray")}, "heavy imports"
    assert {m for m in imported if m.startswith("fer_ray")} <= {"fer_ray", "fer_ray.config", "fer_ray.names",
                                                                 "fer_ray.views", "fer_ray.placement"}


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
