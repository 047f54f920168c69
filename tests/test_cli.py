"""Every fer-ray command answers --help; bad input exits 2 with one line."""

import pytest

from fer_ray.cli import build_parser, main

COMMANDS = [None, "sweep", "demo", "train", "tta", "ensemble", "evaluate", "distill", "report", "models", "flops",
            "data"]


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c or "top" for c in COMMANDS])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(([cmd] if cmd else []) + ["--help"])
    assert e.value.code == 0
    assert "usage: fer-ray" in capsys.readouterr().out


def test_models_lists_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "advanced_emotion_net" in out and "resnet18_fer" in out


def test_bad_sweep_file_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "s.yaml"
    bad.write_text("train:\n  lr: -1\n")
    assert main(["sweep", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "s.yaml" in err and "lr: must be > 0" in err


def test_sweep_refuses_to_mix_with_an_existing_experiment(tmp_path, capsys):
    """A second sweep of the same name would add its trials to the first one's leaderboard: refused, one line."""
    from fer_ray.experiment import Experiment

    old = tmp_path / "smoke" / "trials" / "abc_00000"
    old.mkdir(parents=True)
    Experiment(tmp_path / "smoke").mark_created()  # a sweep fer_ray ran before
    assert main(["sweep", "smoke.yaml", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume" in err and "--overwrite" in err and str(tmp_path) in err
    assert old.is_dir()  # nothing touched
