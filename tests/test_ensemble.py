"""Logit store, metrics, ensembles and the protocol guard, on synthetic logits with known answers."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fer_ray.cli import main
from fer_ray.config import ConfigError, load_yaml
from fer_ray.ensemble import EnsembleSpec, ProtocolError, apply_fitted, pareto_front, reproduce_ensemble, run_ensemble
from fer_ray.metrics import classification_metrics, expected_calibration_error, softmax
from fer_ray.report import leaderboard, write_report
from fer_ray.store import StoreError, load_store, read_logits, write_logits

ROLES = {"train": "fit", "val": "select", "public_test": "report"}
SPEC_FILES = sorted((Path(__file__).resolve().parent.parent / "ensembles").glob("*.yaml"))


def _logits(labels, strength, rng, views=2):
    x = rng.normal(0, 1, (views, len(labels), 7)).astype(np.float32)
    x[:, np.arange(len(labels)), labels] += strength
    return x


@pytest.fixture
def exp(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "split_roles.json").write_text(json.dumps(ROLES))
    labels = {"val": rng.integers(0, 7, 300), "public_test": rng.integers(0, 7, 300)}
    rows = []
    for i, strength in enumerate([0.5, 1.5, 3.0]):
        tid = f"t{i}"
        for split, y in labels.items():
            write_logits(tmp_path, tid, split, _logits(y, strength, rng), y,
                         np.array([f"{split}{j}" for j in range(len(y))]), ["identity", "hflip"],
                         {"member": tid, "split": split, "role": ROLES[split], "views": ["identity", "hflip"]})
        rows.append({"trial_id": tid, "arch": "basic_cnn", "img_size": 48, "in_chans": 1, "params": 1000,
                     "gmacs": 0.1 * (i + 1), "best_val_acc": [0.3, 0.5, 0.9][i], "best_epoch": 1, "epochs_run": 1,
                     "stopped_early": False, "checkpoint": "x", "config": "{}"})
    pd.DataFrame(rows).to_parquet(tmp_path / "trials.parquet")
    return tmp_path


def test_store_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
    write_logits(tmp_path, "m", "val", logits, np.arange(5), np.array(list("abcde")), ["a", "b", "c"],
                 {"arch": "x", "views": ["a", "b", "c"]})
    assert (tmp_path / "logits" / "m" / "val.parquet").is_file()
    ls = read_logits(tmp_path, "m", "val")
    assert np.array_equal(ls.logits, logits) and ls.views == ["a", "b", "c"] and ls.meta["arch"] == "x"
    assert list(ls.ids) == list("abcde") and ls.labels.tolist() == [0, 1, 2, 3, 4]


def test_store_refuses_misaligned_members(exp):
    y = np.zeros(300, dtype=int)
    write_logits(exp, "bad", "val", np.zeros((1, 300, 7)), y,
                 np.array([f"other{j}" for j in range(300)]), ["identity"], {})
    with pytest.raises(StoreError, match="bad/val.parquet: image ids or labels differ"):
        load_store(exp)


def test_metrics_known_answers():
    labels = np.array([0, 1, 2, 3, 4, 5, 6] * 10)
    perfect = np.eye(7)[labels] * 30
    m = classification_metrics(perfect, labels)
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0 and m["ece"] < 1e-6 and m["nll"] < 1e-6
    assert m["auroc"] == 1.0 and np.trace(np.array(m["confusion"])) == 70
    uniform = np.zeros((70, 7))
    assert classification_metrics(uniform, labels)["nll"] == pytest.approx(np.log(7))
    overconfident = np.eye(7)[(labels + 1) % 7] * 30
    assert expected_calibration_error(softmax(overconfident), labels) > 0.99


def test_combiners():
    stack = np.stack([np.log(np.full((1, 7), 1 / 7)), np.array([[10.0] + [0.0] * 6])])
    fitted = {"weights": [0.5, 0.5], "member_temperatures": None, "temperature": None}
    assert apply_fitted(stack, fitted | {"combiner": "mean_logits"}).argmax() == 0
    assert np.exp(apply_fitted(stack, fitted | {"combiner": "mean_probs"})).sum() == pytest.approx(1.0, abs=1e-6)


def test_top_k_ensemble_written_and_recomputable(exp):
    out = run_ensemble(exp, EnsembleSpec(name="top2", members={"top_k": 2, "by": "best_val_acc"}))
    assert out["members"] == ["t2", "t1"] and out["total_gmacs"] == pytest.approx((0.3 + 0.2) * 2)
    store = load_store(exp)
    ens = store["ensemble:top2"]["public_test"]
    mean = np.mean([store[m]["public_test"].logits.mean(0) for m in out["members"]], axis=0)
    assert np.allclose(ens.logits[0], mean, atol=1e-5)
    board = leaderboard(exp)
    row = board[board.name == "top2"].iloc[0]
    assert row.acc_public_test == pytest.approx(float((mean.argmax(1) == ens.labels).mean()))
    assert row.kind == "ensemble" and (board.kind == "model").sum() == 3


def test_budget_keeps_members_that_fit(exp):
    out = run_ensemble(exp, EnsembleSpec(name="cheap", members={"top_k": 3}, budget_gmacs=0.9))
    assert out["total_gmacs"] <= 0.9 and out["members"] == ["t2"]


def test_protocol_guard_refuses_report_split(exp):
    with pytest.raises(ProtocolError, match="'public_test' has role 'report'"):
        run_ensemble(exp, EnsembleSpec(name="cheat", select_split="public_test"))


def test_pareto_front_has_no_dominated_point():
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 1, (200, 2))
    front = pts[pareto_front(pts)]
    for c, a in front:
        assert not ((pts[:, 0] <= c) & (pts[:, 1] > a)).any()


def test_report_files(exp):
    run_ensemble(exp, EnsembleSpec(name="top2", members={"top_k": 2}))
    paths = write_report(exp, exp / "report")
    assert pd.read_csv(paths["csv"]).shape[0] == 4
    md = Path(paths["md"]).read_text()
    assert md.startswith("Split roles: train = fit, val = select, public_test = report")
    assert Path(paths["html"]).read_text().count("data:image/png;base64,") >= 2


def test_spec_folder_is_not_empty():
    assert {"top3_mean", "greedy_nll", "stacked", "budget_1gmac"} <= {p.stem for p in SPEC_FILES}


@pytest.mark.parametrize("path", SPEC_FILES, ids=[p.stem for p in SPEC_FILES])
def test_every_spec_file_loads_and_runs(path, exp, capsys):
    spec = EnsembleSpec.from_dict(load_yaml(path), str(path))
    assert spec.name == path.stem and spec.select_split == "val"
    assert main(["ensemble", str(exp), "--spec", str(path)]) == 0
    out = json.loads((exp / "ensembles" / f"{spec.name}.json").read_text())
    assert out["spec"] == spec.to_dict() and out["selected_on"] == "val"
    assert "public_test" in out["metrics"]
    assert (exp / "logits" / f"ensemble:{spec.name}" / "public_test.parquet").exists()


def test_spec_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="unknown key 'combinr'"):
        EnsembleSpec.from_dict({"combinr": "greedy"})
    for bad in ({"combiner": "median"}, {"greedy_metric": "f1"}, {"stacking_folds": 1}, {"budget_gmacs": 0},
                {"temperature": "yes"}):
        with pytest.raises(ConfigError):
            EnsembleSpec.from_dict(bad)


def test_softmax_is_scipys_over_the_class_axis():
    """metrics.softmax now delegates to scipy: the same numbers as the hand-written exp/normalise it replaced."""
    x = np.random.default_rng(0).normal(size=(3, 50, 7)) * 5
    z = np.exp(x - x.max(-1, keepdims=True))
    assert np.array_equal(softmax(x), z / z.sum(-1, keepdims=True))


def _numpy_apply_of_earlier_releases(stack, fitted):
    """``apply_fitted`` as it was written in numpy before the combiners moved to ``fer_ray.combiners`` (the
    reference that ensembles fitted then must keep reproducing)."""
    stack = np.asarray(stack, dtype=np.float64)
    if fitted.get("member_temperatures"):
        stack = stack / np.asarray(fitted["member_temperatures"], dtype=np.float64)[:, None, None]
    w = np.asarray(fitted["weights"], dtype=np.float64)
    if fitted["combiner"] == "mean_logits":
        out = np.tensordot(w, stack, axes=1)
    elif fitted["combiner"] == "stacking":
        m, n, c = stack.shape
        feats = softmax(stack).transpose(1, 0, 2).reshape(n, m * c)
        out = feats @ np.asarray(fitted["stacking"]["coef"]).T + np.asarray(fitted["stacking"]["intercept"])
    else:
        out = np.log(np.tensordot(w, softmax(stack), axes=1) + 1e-12)
    if fitted.get("temperature"):
        out = out / fitted["temperature"]
    return out


@pytest.mark.parametrize("combiner", ["mean_logits", "mean_probs", "nll_weights", "greedy", "stacking"])
@pytest.mark.parametrize("temperatures", [False, True])
def test_ensemble_files_of_earlier_releases_still_apply(exp, combiner, temperatures):
    """An ``ensembles/<name>.json`` written before the registry (its ``fitted`` block as those releases wrote it,
    through a JSON round trip) loads, applies and reproduces with the numbers the numpy code gave."""
    rng = np.random.default_rng(7)
    fitted = {"combiner": combiner, "weights": [0.2, 0.3, 0.5] if combiner != "stacking" else [1 / 3] * 3,
              "member_temperatures": [1.3, 0.7, 2.1] if temperatures else None,
              "temperature": 1.4 if temperatures else None}
    if combiner == "greedy":
        fitted["greedy_picks"] = ["t2", "t1", "t2", "t0", "t2"]
    if combiner == "stacking":
        fitted["stacking"] = {"coef": rng.normal(size=(7, 21)).tolist(), "intercept": rng.normal(size=7).tolist(),
                              "C": 1.0, "folds": 5}
    info = {"name": "old", "spec": {"name": "old", "combiner": combiner}, "members": ["t0", "t1", "t2"],
            "views": ["identity", "hflip"], "member_checkpoints": {}, "weights": fitted["weights"],
            "combiner": combiner, "fitted": fitted, "dropped": [], "selected_on": "val", "total_gmacs": 1.2,
            "metrics": {}}
    (exp / "ensembles").mkdir(exist_ok=True)
    (exp / "ensembles" / "old.json").write_text(json.dumps(info))
    store = load_store(exp)
    stack = np.stack([store[m]["public_test"].logits.mean(0) for m in info["members"]])
    want = _numpy_apply_of_earlier_releases(stack, fitted)
    np.testing.assert_allclose(apply_fitted(stack, fitted), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(reproduce_ensemble(exp, "old", "public_test"), want, rtol=1e-12, atol=1e-12)
