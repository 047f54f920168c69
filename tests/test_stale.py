"""Stale inputs are detected, never silently used: the data a later stage re-reads must have the fingerprint the
sweep recorded, and an ensemble whose members were re-scored from other checkpoints is refused (or left out of the
leaderboard with a line saying so)."""

import json

import numpy as np
import pandas as pd
import pytest

from fer_ray.config import ConfigError, SweepConfig
from fer_ray.data import prepare_dataset
from fer_ray.data.synthetic import generate, write_csv
from fer_ray.ensemble import EnsembleSpec, reproduce_ensemble, run_ensemble
from fer_ray.pipeline import tta_stage
from fer_ray.report import leaderboard
from fer_ray.store import StoreError, write_logits
from fer_ray.sweep import write_setup


def test_a_changed_source_is_refused_with_both_fingerprints(tmp_path):
    csv = write_csv(tmp_path / "data" / "fer2013.csv", generate(200, seed=0))
    cfg = SweepConfig.from_dict({"name": "fp", "data": {"path": str(csv), "cache_dir": str(tmp_path / "cache"),
                                                        "val_fraction": 0.2}}, "sweep")
    exp = tmp_path / "fp"
    write_setup(cfg, exp, *prepare_dataset(cfg.data))
    recorded = json.loads((exp / "data.json").read_text())["fingerprint"]
    assert set(recorded) == {"data", "splits"} and all(len(v) == 16 for v in recorded.values())
    write_csv(csv, generate(200, seed=1))  # same path, other faces: e.g. a re-exported dataset
    with pytest.raises(ConfigError, match=rf"not the data this experiment trained on \(fingerprint data \w+ splits "
                                          rf"\w+; recorded data {recorded['data']} splits {recorded['splits']}\)"):
        tta_stage(exp)


def test_a_stale_ensemble_is_refused_and_left_out_of_the_leaderboard(tmp_path, capsys):
    rng = np.random.default_rng(0)
    (tmp_path / "split_roles.json").write_text(json.dumps({"val": "select", "public_test": "report"}))
    y = {s: rng.integers(0, 7, 100) for s in ("val", "public_test")}
    rows = []
    for m in ("a", "b"):
        for split, labels in y.items():
            x = rng.normal(size=(2, 100, 7)).astype(np.float32)
            write_logits(tmp_path, m, split, x, labels, np.arange(100).astype(str), ["identity", "hflip"],
                         {"checkpoint_sha256": f"sha-{m}-1", "views": ["identity", "hflip"]})
        rows.append({"trial_id": m, "arch": "basic_cnn", "img_size": 48, "in_chans": 1, "params": 1, "gmacs": 0.1,
                     "best_val_acc": 0.5, "best_epoch": 1, "epochs_run": 1, "stopped_early": False,
                     "checkpoint": "x", "config": "{}"})
    pd.DataFrame(rows).to_parquet(tmp_path / "trials.parquet")
    run_ensemble(tmp_path, EnsembleSpec(name="ab", members=["a", "b"], combiner="nll_weights"))
    reproduce_ensemble(tmp_path, "ab", "public_test")
    assert "ab" in set(leaderboard(tmp_path).name)
    for split, labels in y.items():  # member b re-scored from a newer checkpoint (a resumed sweep trained on)
        write_logits(tmp_path, "b", split, rng.normal(size=(2, 100, 7)), labels, np.arange(100).astype(str),
                     ["identity", "hflip"], {"checkpoint_sha256": "sha-b-2", "views": ["identity", "hflip"]})
    with pytest.raises(StoreError, match="ensemble 'ab' is stale \\(member b was re-scored from another checkpoint"):
        reproduce_ensemble(tmp_path, "ab", "public_test")
    assert "ab" not in set(leaderboard(tmp_path).name)
    assert "left out stale ensemble ab" in capsys.readouterr().out
