"""Synchronous successive halving (``asha.synchronous``): every trial reaches a rung before any goes on, and the
ones that go on are the best of all trials at that rung, not of those seen so far (as with asynchronous ASHA)."""

import json

import pandas as pd
import pytest

from fer_ray.config import SweepConfig
from fer_ray.sweep import run_sweep

pytestmark = pytest.mark.ray


def test_every_rung_keeps_the_best_of_all_trials(tmp_path, ray_session):
    cfg = SweepConfig.from_dict({
        "name": "sh", "data": {"synthetic_n": 300, "cache_dir": str(tmp_path / "cache")},
        "train": {"model": "basic_cnn", "img_size": 32, "epochs": 4, "batch_size": 32, "num_workers": 0,
                  "cpus_per_worker": 0.9},
        "search_space": {"lr": {"loguniform": [1e-4, 3e-3]}, "drop_rate": {"uniform": [0.1, 0.6]}},
        "num_samples": 6, "max_concurrent_trials": 2,
        "asha": {"max_t": 4, "grace_period": 1, "reduction_factor": 2, "synchronous": True}})
    df = run_sweep(cfg, tmp_path / "sh", verbose=0)
    assert sorted(df.epochs_run) == [1, 1, 1, 2, 4, 4]  # 6 trials → top 3 at epoch 1 → top 2 at epoch 2 → 4
    curves = {t: pd.DataFrame(json.loads((tmp_path / "sh" / "trials" / t / "history.json").read_text()))
              for t in df.trial_id}
    ran = df.set_index("trial_id").epochs_run
    for rung, kept in ((1, 3), (2, 2)):
        at_rung = [t for t in curves if ran[t] >= rung]
        best = sorted(at_rung, key=lambda t: curves[t].val_score.iloc[rung - 1], reverse=True)[:kept]
        assert sorted(best) == sorted(t for t in at_rung if ran[t] > rung), f"rung {rung}"
    for rung in (1, 2):  # synchronous: no trial trained past a rung before every trial had reported it
        reported = max(c.finished_at.iloc[rung - 1] for t, c in curves.items() if ran[t] >= rung)
        assert all(c.finished_at.iloc[rung] > reported for t, c in curves.items() if ran[t] > rung), f"rung {rung}"
    for t, c in curves.items():  # paused and resumed trials continue their own epochs, none repeated or skipped
        assert c.epoch.tolist() == list(range(1, ran[t] + 1)), t
