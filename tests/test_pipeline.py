"""Integration: a tiny ASHA sweep (2 trials × 2 epochs: one of 2 DDP workers, one in-process) through TTA, ensemble
and leaderboard, then checks the files it wrote agree with each other."""

import json

import numpy as np
import pandas as pd
import pytest

from fer_ray.checkpoint import load_checkpoint
from fer_ray.config import load_sweep
from fer_ray.ensemble import reproduce_ensemble
from fer_ray.metrics import softmax
from fer_ray.pipeline import run_all
from fer_ray.store import read_logits

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("exp")
    cfg = load_sweep("sweeps/smoke.yaml")
    cfg = cfg.replace(data=cfg.data.replace(cache_dir=str(root / "cache")))
    exp = root / "smoke"
    board = run_all(cfg, exp)
    return cfg, exp, board


def test_trials_and_checkpoints(experiment):
    cfg, exp, _ = experiment
    trials = pd.read_parquet(exp / "trials.parquet")
    assert len(trials) == 2 and sorted(json.loads(c)["num_workers"] for c in trials.config) == [0, 2]
    for row in trials.itertuples():
        history = json.loads((exp / "trials" / row.trial_id / "history.json").read_text())
        assert [h["epoch"] for h in history] == list(range(1, row.epochs_run + 1))
        assert row.best_val_acc == max(h["val_acc"] for h in history)
        ckpt = load_checkpoint(row.checkpoint)
        assert ckpt["epoch"] == row.best_epoch and ckpt["fer_cfg"]["img_size"] == row.img_size
        assert row.gmacs > 0 and row.params > 0
        world = max(1, json.loads(row.config)["num_workers"])
        assert all(h["world_size"] == world for h in history), f"{row.trial_id} ran {world} worker(s)"


def test_logit_store_matches_checkpoint_accuracy(experiment):
    _, exp, _ = experiment
    trials = pd.read_parquet(exp / "trials.parquet")
    for row in trials.itertuples():
        ls = read_logits(exp, row.trial_id, "val")
        assert ls.views == ["identity", "hflip"] and ls.meta["role"] == "select"
        # identity-view accuracy on val is the accuracy the trial reported for its best epoch
        acc = float((ls.logits[0].argmax(1) == ls.labels).mean())
        assert acc == pytest.approx(row.best_val_acc, abs=1e-6)


def test_leaderboard_ensemble_recomputed_from_stored_logits(experiment):
    _, exp, board = experiment
    board = pd.read_csv(exp / "report" / "leaderboard.csv")
    ens = board[board.kind == "ensemble"].set_index("name")
    assert sorted(ens.index) == ["greedy_nll", "top2_mean_logits"]
    row = ens.loc["top2_mean_logits"].copy()
    row["name"] = "top2_mean_logits"
    members = json.loads((exp / "ensembles" / f"{row['name']}.json").read_text())["members"]
    for split in ("val", "public_test"):
        stacks = [read_logits(exp, m, split) for m in members]
        mean = np.mean([s.logits.mean(0) for s in stacks], axis=0)
        acc = float((softmax(mean).argmax(1) == stacks[0].labels).mean())
        assert row[f"acc_{split}"] == pytest.approx(acc, abs=1e-6)
    # greedy_nll: rebuilt from the weights and temperatures in its json alone (nothing refitted).
    for split in ("val", "public_test"):
        logits = reproduce_ensemble(exp, "greedy_nll", split)
        labels = read_logits(exp, "ensemble:greedy_nll", split).labels
        assert ens.loc["greedy_nll", f"acc_{split}"] == pytest.approx(float((logits.argmax(1) == labels).mean()),
                                                                      abs=1e-6)
    assert (board.kind == "model").sum() == 2
    assert (exp / "report" / "leaderboard.md").read_text().count("|") > 10


def test_checkpoint_library_and_ema_members(experiment):
    """smoke.yaml keeps the last 2 epochs and EMA weights: the library lists them, TTA scored them, the report shows
    them, and each library member's identity-view val accuracy is the one its epoch reported."""
    _, exp, _ = experiment
    library = pd.read_parquet(exp / "library.parquet").set_index("trial_id")
    trials = pd.read_parquet(exp / "trials.parquet")
    for row in trials.itertuples():
        mine = library[library.parent == row.trial_id]
        kept = set(range(1, row.epochs_run + 1))  # last_k 2 of at most 2 epochs (ASHA may stop one after 1)
        assert set(mine[mine.kind == "ema"].best_epoch) == kept  # EMA copies of the kept epochs
        assert set(mine[mine.kind == "snapshot"].best_epoch) == kept - {row.best_epoch}
        history = {h["epoch"]: h for h in json.loads((exp / "trials" / row.trial_id / "history.json").read_text())}
        for member, lib in mine.iterrows():
            ls = read_logits(exp, member, "val")
            want = history[lib.best_epoch]["val_acc_ema" if lib.weights == "ema" else "val_acc"]
            assert float((ls.logits[0].argmax(1) == ls.labels).mean()) == pytest.approx(want, abs=1e-6), member
    board = pd.read_csv(exp / "report" / "leaderboard.csv")
    assert set(library.index) <= set(board.name) and "oof_acc_val" in board.columns
    greedy = json.loads((exp / "ensembles" / "greedy_nll.json").read_text())
    assert greedy["oof"] and 0 <= greedy["oof"]["accuracy"] <= 1
