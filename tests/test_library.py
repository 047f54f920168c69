"""Ensemble members for free and honest ranking, on planted logits with known answers: a checkpoint-library member
that helps is chosen from the library; an in-sample-only gain is exposed by the out-of-fold estimate (and the
leaderboard ranks on it); bagged greedy selection; which epochs a keep policy keeps and what the library holds."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from fer_ray.checkpoint import save_checkpoint
from fer_ray.config import TrainConfig
from fer_ray.ensemble import EnsembleSpec, reproduce_ensemble, run_ensemble
from fer_ray.experiment import Experiment
from fer_ray.models import create_model
from fer_ray.report import leaderboard
from fer_ray.store import write_logits
from fer_ray.sweep import library_rows, policy_epochs, trial_row

ROLES = {"train": "fit", "val": "select", "public_test": "report"}
N = 700


def _row(member: str, kind: str = "model", parent: str | None = None, acc: float = 0.5) -> dict:
    return {"trial_id": member, "arch": "basic_cnn", "img_size": 48, "in_chans": 1, "params": 1000, "gmacs": 0.1,
            "best_val_acc": acc, "best_epoch": 3, "epochs_run": 6, "stopped_early": False, "checkpoint": "x",
            "config": "{}", "kind": kind, "parent": parent or member, "weights": "raw"}


def _experiment(root, members: dict[str, np.ndarray], labels: dict[str, np.ndarray], library: set[str] = frozenset()):
    """An experiment whose store holds ``members`` (name → split-indexed correctness strength builder output)."""
    (root / "split_roles.json").write_text(json.dumps(ROLES))
    trials, lib = [], []
    for name, per_split in members.items():
        for split, logits in per_split.items():
            write_logits(root, name, split, logits[None], labels[split], np.arange(len(labels[split])).astype(str),
                         ["identity"], {"checkpoint_sha256": f"sha-{name}", "views": ["identity"]})
        acc = float((per_split["val"].argmax(1) == labels["val"]).mean())
        (lib if name in library else trials).append(_row(name, "snapshot" if name in library else "model",
                                                         name.split("@")[0], acc))
    pd.DataFrame(trials).drop(columns=["kind", "parent", "weights"]).to_parquet(root / "trials.parquet")
    if lib:
        pd.DataFrame(lib).to_parquet(root / "library.parquet")
    return root


def _member(labels: np.ndarray, right: np.ndarray, rng, strength: float = 3.0) -> np.ndarray:
    """Logits confidently right on ``right`` images, weakly wrong elsewhere."""
    x = rng.normal(0, 0.3, (len(labels), 7))
    wrong = (labels + 1 + rng.integers(0, 6, len(labels))) % 7
    x[np.arange(len(labels)), np.where(right, labels, wrong)] += np.where(right, strength, 1.0)
    return x.astype(np.float32)


def test_a_library_member_that_helps_is_chosen(tmp_path):
    rng = np.random.default_rng(0)
    labels = {s: rng.integers(0, 7, N) for s in ("val", "public_test")}
    first = {s: np.arange(N) < N * 0.6 for s in labels}  # both trials know the first 60 % ...
    last = {s: np.arange(N) >= N * 0.4 for s in labels}  # ... a kept earlier epoch of t0 knows the last 60 %
    members = {"t0": {s: _member(labels[s], first[s], rng) for s in labels},
               "t1": {s: _member(labels[s], first[s], rng) for s in labels},
               "t0@e002": {s: _member(labels[s], last[s], rng) for s in labels}}
    exp = _experiment(tmp_path, members, labels, library={"t0@e002"})
    spec = {"name": "lib", "combiner": "greedy", "greedy_metric": "accuracy", "oof_folds": 0}
    trials_only = run_ensemble(exp, EnsembleSpec.from_dict(spec | {"members": {"top_k": 3, "pool": "trials"}}))
    library = run_ensemble(exp, EnsembleSpec.from_dict(spec | {"name": "lib2", "members": {"top_k": 3,
                                                                                           "pool": "library"}}))
    assert "t0@e002" not in trials_only["members"] and "t0@e002" in library["members"]
    for split in ("val", "public_test"):  # fitted on val; the gain holds on the report split too
        assert library["metrics"][split]["accuracy"] > trials_only["metrics"][split]["accuracy"] + 0.2
    board = leaderboard(exp).set_index("name")
    assert "t0@e002" in board.loc["lib2", "members"] and board.loc["t0@e002", "kind"] == "snapshot"


def test_an_in_sample_only_gain_is_exposed_out_of_fold(tmp_path):
    rng = np.random.default_rng(1)
    n = 150  # a small selection split: 30 members of pure noise, and one weak but real model
    labels = {s: rng.integers(0, 7, n) for s in ("val", "public_test")}
    members = {f"noise{i:02d}": {s: rng.normal(size=(n, 7)).astype(np.float32) for s in labels} for i in range(30)}
    members["honest"] = {s: _member(labels[s], rng.random(n) < 0.27, rng, strength=2.0) for s in labels}
    exp = _experiment(tmp_path, members, labels)
    noise = run_ensemble(exp, EnsembleSpec(name="noise_greedy", members=[m for m in members if m != "honest"],
                                           combiner="greedy", greedy_metric="accuracy"))
    in_sample, oof = noise["metrics"]["val"]["accuracy"], noise["oof"]["accuracy"]
    assert in_sample - oof > 0.05, (in_sample, oof)  # greedy fitted val's noise; held-out folds see through it
    assert abs(oof - 1 / 7) < 0.05 and noise["metrics"]["public_test"]["accuracy"] < in_sample - 0.05
    honest = run_ensemble(exp, EnsembleSpec(name="honest_t", members=["honest"], temperature=True))
    assert abs(honest["oof"]["accuracy"] - honest["metrics"]["val"]["accuracy"]) < 0.03
    board = leaderboard(exp).set_index("name")
    assert board.loc["noise_greedy", "acc_val"] > board.loc["honest", "acc_val"], "in-sample favours the ensemble"
    assert leaderboard(exp).name.iloc[0] in ("honest", "honest_t"), "out-of-fold ranking does not"


def test_a_selection_split_too_small_for_the_folds_gets_fewer(tmp_path):
    """20 val images over 7 classes (a smoke's split): no class holds 5, so 5 stratified folds cannot be made; the
    estimate uses as many folds as the largest class allows, and none where no class has 2 images."""
    rng = np.random.default_rng(3)
    labels = {"val": np.repeat(np.arange(7), 3)[:20], "public_test": rng.integers(0, 7, 40)}
    members = {f"m{i}": {s: _member(labels[s], rng.random(len(labels[s])) < 0.5, rng) for s in labels}
               for i in range(2)}
    (tmp_path / "a").mkdir()
    exp = _experiment(tmp_path / "a", members, labels)
    out = run_ensemble(exp, EnsembleSpec(name="small", members={"top_k": 2}, oof_folds=5))
    assert out["oof"]["folds"] == 3 and 0 <= out["oof"]["accuracy"] <= 1
    labels["val"] = np.arange(7)  # one image per class: no fold can hold a class out
    members = {m: {s: x[: len(labels[s])] for s, x in per.items()} for m, per in members.items()}
    (tmp_path / "b").mkdir()
    exp = _experiment(tmp_path / "b", members, labels)
    assert run_ensemble(exp, EnsembleSpec(name="tiny", members={"top_k": 2}, oof_folds=5))["oof"] is None


def test_bagged_greedy_averages_bags_and_reproduces(tmp_path):
    rng = np.random.default_rng(2)
    labels = {s: rng.integers(0, 7, N) for s in ("val", "public_test")}
    members = {f"m{i}": {s: _member(labels[s], rng.random(N) < 0.5, rng) for s in labels} for i in range(6)}
    exp = _experiment(tmp_path, members, labels)
    out = run_ensemble(exp, EnsembleSpec(name="bagged", members={"top_k": 6}, combiner="greedy", greedy_bags=8,
                                         greedy_bag_fraction=0.5, oof_folds=3))
    assert len(out["fitted"]["greedy_bags"]) == 8 and sum(out["weights"]) == pytest.approx(1.0)
    assert all(set(bag) <= set(members) for bag in out["fitted"]["greedy_bags"]) and out["oof"]["folds"] == 3
    stored = reproduce_ensemble(exp, "bagged", "public_test")
    assert float((stored.argmax(1) == labels["public_test"]).mean()) == pytest.approx(
        out["metrics"]["public_test"]["accuracy"])


def test_keep_policies_and_library_rows():
    assert policy_epochs("best", [1, 2, 3]) == set()
    assert policy_epochs({"last_k": 2}, [1, 2, 3, 4]) == {3, 4}
    assert policy_epochs({"every": 2}, [1, 2, 3, 4, 5]) == {2, 4}
    history = [{"epoch": e, "val_acc": a, "val_acc_ema": b} for e, a, b in
               [(1, 0.3, 0.2), (2, 0.5, 0.4), (3, 0.4, 0.6), (4, 0.45, 0.5)]]
    row = _row("t", acc=0.5) | {"best_epoch": 2}
    kept = {2: "c2", 3: "c3", 4: "c4"}
    rows = {r["trial_id"]: r for r in library_rows(row, history, kept, {"last_k": 2})}
    assert set(rows) == {"t@e003", "t@e004", "t@e002-ema", "t@e003-ema", "t@e004-ema"}
    assert rows["t@e003"]["checkpoint"] == "c3" and rows["t@e003-ema"]["weights"] == "ema"
    assert rows["t@e003-ema"]["best_val_acc"] == 0.6 and rows["t@e004"]["parent"] == "t"
    best_only = library_rows(row, history, {2: "c2", 4: "c4"}, "best")
    assert [r["trial_id"] for r in best_only] == ["t@e004-ema"], "keep best: the EMA of the kept epoch best on val"


def test_trial_row_cuts_the_history_back_to_the_latest_checkpoint(tmp_path):
    """A stopped DDP trial's rank 0 may write the next epoch's history before its checkpoint reaches storage (seen in
    the smoke sweep: ASHA stopped a trial after epoch 1, history.json said [1, 2]); that epoch does not count, and
    history.json, metrics.parquet and the trial row agree on it."""
    exp = Experiment(str(tmp_path / "exp"))
    torch.manual_seed(0)
    cfg = TrainConfig(model="basic_cnn", img_size=32, epochs=4, num_workers=0, cpus_per_worker=1)
    save_checkpoint(tmp_path / "exp" / "tune" / "t0" / "checkpoint_000000", 1,
                    create_model("basic_cnn", img_size=32), dict(cfg.to_dict(), in_chans=1), {})
    exp.write_history("t0", [{"epoch": 1, "val_acc": 0.4}, {"epoch": 2, "val_acc": 0.5}])
    row, _ = trial_row(exp, "t0")
    assert (row["epochs_run"], row["best_epoch"], row["best_val_acc"], row["stopped_early"]) == (1, 1, 0.4, True)
    assert exp.history("t0") == [{"epoch": 1, "val_acc": 0.4}]
    assert exp.metrics("t0")["epoch"].tolist() == [1]


def test_trial_row_reads_params_and_gmacs_from_the_checkpoint(tmp_path, monkeypatch):
    """Training counts the model's size and compute once, on rank 0, when it builds the model, and records them in
    every checkpoint; trial_row reads them there, and rebuilds the model only for a checkpoint written before they
    were recorded (the same numbers either way)."""
    from fer_ray import checkpoint, flops
    from fer_ray.checkpoint import write_checkpoint
    from fer_ray.data import split_indices, synthetic
    from fer_ray.loop import TrainingRun

    data = synthetic.generate(64, seed=0)
    arrays = {**data.to_arrays(), "splits": split_indices(data, 0.25, seed=0)}
    cfg = TrainConfig(model="basic_cnn", img_size=32, epochs=1, batch_size=16, num_workers=0, cpus_per_worker=1)
    assert TrainingRun(cfg, arrays, torch.device("cpu"), rank=1).profile == {}  # counted on rank 0 only
    run = TrainingRun(cfg, arrays, torch.device("cpu"))
    run.fit()
    expected = flops.profile_model(create_model("basic_cnn", img_size=32))
    assert run.state_dict()["profile"] == pytest.approx(expected, nan_ok=True) and expected["params"] > 0
    exp = Experiment(str(tmp_path / "exp"))
    old = {k: v for k, v in run.state_dict().items() if k != "profile"}  # as checkpoints were written before
    for trial, payload in (("new", run.state_dict()), ("old", old)):
        write_checkpoint(tmp_path / "exp" / "tune" / trial / "checkpoint_000000", payload)
        exp.write_history(trial, run.history)
    built = []
    monkeypatch.setattr(checkpoint, "create_model", lambda *a, **kw: built.append(a) or create_model(*a, **kw))
    rows = {trial: trial_row(exp, trial)[0] for trial in ("new", "old")}
    assert built == [("basic_cnn",)], "only the checkpoint without a profile has its model rebuilt"
    for row in rows.values():
        assert {k: row[k] for k in expected} == pytest.approx(expected, nan_ok=True)
        assert (row["img_size"], row["in_chans"], row["arch"]) == (32, 1, "basic_cnn")
