"""No command deletes or mis-names what is not its own: names that become paths are checked, fer_ray removes only
folders it created (its marker inside), never through a symlink or outside the results root."""

import pytest

from fer_ray.cli import _new_experiment, main
from fer_ray.config import ConfigError, SweepConfig, parse_sweep
from fer_ray.ensemble import EnsembleSpec
from fer_ray.experiment import MARKER, Experiment


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".", "", "x y", "ok\n"])
def test_names_that_become_paths_are_checked(name):
    with pytest.raises(ConfigError, match="cannot be a file name"):
        SweepConfig.from_dict({"name": name}, "sweep")
    with pytest.raises(ConfigError, match="cannot be a file name"):
        EnsembleSpec.from_dict({"name": name}, "spec")
    assert SweepConfig.from_dict({"name": "ok.v2_a-b"}, "sweep").name == "ok.v2_a-b"


def test_cli_name_and_distill_name_are_checked(tmp_path, capsys):
    assert main(["sweep", "smoke.yaml", "--out", str(tmp_path), "--name", "../../evil", "--sweep-only"]) == 2
    assert "cannot be a file name" in capsys.readouterr().err
    assert not list(tmp_path.parent.glob("evil")) and not list(tmp_path.iterdir())
    exp = tmp_path / "e"  # distill refuses the name before it reads or deletes anything
    assert main(["distill", str(exp), "--ensemble", "x", "--student", "basic_cnn", "--name", ".."]) == 2
    assert "--name: '..' cannot be a file name" in capsys.readouterr().err


def test_a_folder_fer_ray_did_not_create_is_never_deleted(tmp_path, capsys):
    victim = tmp_path / "out" / "demo"
    (victim / "trials").mkdir(parents=True)
    (victim / "trials" / "precious.txt").write_text("keep me")
    assert main(["demo", "--out", str(victim)]) == 2  # demo always overwrites, but only its own folders
    assert "was not created by fer_ray" in capsys.readouterr().err
    assert (victim / "trials" / "precious.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="not created by fer_ray"):
        _new_experiment(str(tmp_path / "out"), "demo", overwrite=True)


def test_overwrite_removes_only_a_marked_experiment_and_never_follows_a_symlink(tmp_path):
    out = tmp_path / "results"
    exp = Experiment.under(str(out), "mine")
    exp.mark_created()
    exp.write_text("trials/t/history.json", "[]")
    with pytest.raises(ConfigError, match="already holds an experiment"):
        _new_experiment(str(out), "mine", overwrite=False)
    assert _new_experiment(str(out), "mine", overwrite=True).is_empty()
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "trials").mkdir(parents=True)
    (elsewhere / MARKER).write_text("{}")  # even a marked folder is not deleted through a link
    (out / "linked").symlink_to(elsewhere)
    with pytest.raises(ConfigError, match="is a symlink"):
        _new_experiment(str(out), "linked", overwrite=True)
    assert (elsewhere / "trials").is_dir() and (elsewhere / MARKER).is_file()


def test_remove_refuses_a_folder_outside_the_results_root(tmp_path):
    outside = Experiment(tmp_path / "a" / "x")
    outside.mark_created()
    (tmp_path / "root").mkdir()
    with pytest.raises(ConfigError, match="outside the results root"):
        outside.remove(within=str(tmp_path / "root"))
    assert outside.owns()


def test_sweep_file_name_field_is_checked():
    with pytest.raises(ConfigError, match=r"s.yaml: sweep.name: .*cannot be a file name"):
        parse_sweep("name: ../../etc", "s.yaml")
