"""Fitted combiners, temperature scaling, budget search and the protocol guard, on synthetic logits; every combiner
of the registry (``fer_ray.combiners``) gives the same numbers in the logit store and in the export graph."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.special import log_softmax

from fer_ray.cli import main
from fer_ray.combiners import REGISTRY
from fer_ray.config import ConfigError
from fer_ray.ensemble import (
    COMBINERS,
    EnsembleSpec,
    ProtocolError,
    apply_fitted,
    budget_search,
    fit_ensemble,
    fit_greedy,
    fit_nll_weights,
    fit_temperature,
    pareto_front,
    reproduce_ensemble,
    run_ensemble,
)
from fer_ray.metrics import classification_metrics, softmax
from fer_ray.report import leaderboard, write_report
from fer_ray.store import load_store, write_logits

ROLES = {"train": "fit", "val": "select", "public_test": "report"}
SPLITS = ("val", "public_test")
VIEWS = ["identity", "hflip", "rot10"]
N = 400


def _noisy(y, strength, rng, scale=1.0, views=3):
    x = rng.normal(0, 1, (views, len(y), 7))
    x[:, np.arange(len(y)), y] += strength
    return scale * x


def _complementary(y, knows, rng, views=3):
    """Sure of classes in ``knows``; otherwise confidently wrong (class ``min(other)``) or spread over ``other``."""
    other = [c for c in range(7) if c not in knows]
    x = rng.normal(0, 0.3, (views, len(y), 7))
    inside = np.isin(y, knows)
    x[:, np.flatnonzero(inside), y[inside]] += 6
    if knows[0] == 0:  # A: on 4–6 it knows "one of 4–6" but not which
        x[:, np.flatnonzero(~inside)[:, None], np.array(other)[None, :]] += 3
    else:  # B: on 0–3 it always says class 4
        x[:, np.flatnonzero(~inside), 4] += 6
    return x


def _make_exp(path, builders: dict, gmacs: dict, seed=0):
    """A fake results dir: ``builders[name](labels, rng) -> [V, N, C]`` logits per split."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    (path / "split_roles.json").write_text(json.dumps(ROLES))
    labels = {s: rng.integers(0, 7, N) for s in SPLITS}
    rows = []
    for name, build in builders.items():
        for split, y in labels.items():
            write_logits(path, name, split, build(y, rng), y,
                         np.array([f"{split}{j}" for j in range(N)]), VIEWS,
                         {"member": name, "split": split, "role": ROLES[split], "views": VIEWS})
        rows.append({"trial_id": name, "arch": "basic_cnn", "img_size": 48, "in_chans": 1, "params": 1000,
                     "gmacs": gmacs[name], "best_val_acc": 0.5, "best_epoch": 1, "epochs_run": 1,
                     "stopped_early": False, "checkpoint": "x", "config": "{}"})
    pd.DataFrame(rows).to_parquet(path / "trials.parquet")
    return path


@pytest.fixture
def planted(tmp_path):
    """Three noisy members and one (planted) near-perfect member, ``perfect``."""
    builders = {f"weak{i}": (lambda y, rng, s=s: _noisy(y, s, rng)) for i, s in enumerate([0.8, 1.2, 1.6])}
    builders["perfect"] = lambda y, rng: _noisy(y, 9.0, rng)
    return _make_exp(tmp_path / "planted", builders, {"weak0": 0.1, "weak1": 0.2, "weak2": 0.4, "perfect": 1.5})


@pytest.fixture
def complementary(tmp_path):
    builders = {"A": lambda y, rng: _complementary(y, [0, 1, 2, 3], rng),
                "B": lambda y, rng: _complementary(y, [4, 5, 6], rng)}
    return _make_exp(tmp_path / "compl", builders, {"A": 0.5, "B": 0.5})


def _stack(exp, members, split="val"):
    store = load_store(exp, [split])
    return np.stack([store[m][split].logits.mean(0) for m in members]), store[members[0]][split].labels


def test_nll_weights_put_the_weight_on_the_planted_member(planted):
    members = ["weak0", "weak1", "weak2", "perfect"]
    stack, y = _stack(planted, members)
    w = fit_nll_weights(softmax(stack), y)
    assert w.min() >= 0 and w.sum() == pytest.approx(1.0) and w[3] > 0.95
    out = run_ensemble(planted, EnsembleSpec(name="w", members=members, combiner="nll_weights"))
    assert dict(zip(out["members"], out["weights"]))["perfect"] > 0.95 and out["fitted"]["combiner"] == "nll_weights"
    assert sum(out["weights"]) == pytest.approx(1.0) and set(out["dropped"]) | set(out["members"]) == set(members)


@pytest.mark.parametrize("metric", ["accuracy", "nll"])
def test_greedy_picks_the_planted_member_first(planted, metric):
    members = ["weak0", "weak1", "perfect", "weak2"]
    stack, y = _stack(planted, members)
    weights, picks = fit_greedy(softmax(stack), y, metric, iters=10)
    assert picks[0] == 2 and weights[2] == weights.max() and weights.sum() == pytest.approx(1.0)
    out = run_ensemble(planted, EnsembleSpec(name="g", members=members, combiner="greedy", greedy_metric=metric))
    assert out["fitted"]["greedy_picks"][0] == "perfect" and out["members"][0] in members
    assert set(out["members"]) == set(out["fitted"]["greedy_picks"])  # never-picked members cost nothing


def test_stacking_beats_the_mean_on_complementary_members(complementary):
    mean = run_ensemble(complementary, EnsembleSpec(name="mean", members=["A", "B"], combiner="mean_probs"))
    stack = run_ensemble(complementary, EnsembleSpec(name="stack", members=["A", "B"], combiner="stacking"))
    for split in SPLITS:  # fitted on val only; holds on the untouched split too
        assert stack["metrics"][split]["accuracy"] > mean["metrics"][split]["accuracy"] + 0.15
    assert stack["metrics"]["public_test"]["accuracy"] > 0.95
    assert stack["fitted"]["stacking"]["C"] > 0 and np.array(stack["fitted"]["stacking"]["coef"]).shape == (7, 14)


def test_temperature_lowers_nll_and_ece_of_an_overconfident_member(tmp_path):
    exp = _make_exp(tmp_path / "hot", {"hot": lambda y, rng: _noisy(y, 1.5, rng, scale=30.0)}, {"hot": 0.1})
    stack, y = _stack(exp, ["hot"])
    t = fit_temperature(stack[0], y)
    assert t > 3
    raw = run_ensemble(exp, EnsembleSpec(name="raw", members=["hot"]))
    cal = run_ensemble(exp, EnsembleSpec(name="cal", members=["hot"], temperature=True))
    assert cal["fitted"]["member_temperatures"][0] == pytest.approx(t)
    for split in SPLITS:
        before, after = raw["metrics"][split], cal["metrics"][split]
        assert after["nll"] < 0.5 * before["nll"] and after["ece"] < 0.5 * before["ece"]
        assert after["accuracy"] == pytest.approx(before["accuracy"])  # a temperature never changes the argmax


def test_pareto_front_keeps_the_cheapest_and_the_most_accurate():
    rng = np.random.default_rng(3)
    pts = np.column_stack([rng.uniform(0.1, 10, 300), rng.uniform(0, 1, 300)])
    front = pareto_front(pts)
    for c, a in pts[front]:
        assert not (((pts[:, 0] <= c) & (pts[:, 1] > a)) | ((pts[:, 0] < c) & (pts[:, 1] >= a))).any()
    assert pts[:, 0].argmin() in front and pts[:, 1].argmax() in front


def test_budget_search_writes_the_front_and_picks_the_best_that_fits(planted):
    out = budget_search(planted, 2.0)
    cand = pd.read_csv(planted / "pareto.csv")
    assert set(cand.views) == {"identity", "identity hflip", "identity hflip rot10"}
    front = cand[cand.on_front]
    for c, a in front[["gmacs", "select_acc"]].to_numpy():
        assert not ((cand.gmacs <= c) & (cand.select_acc > a)).any()
    cheapest = cand[cand.gmacs == cand.gmacs.min()].select_acc.max()
    assert ((front.gmacs == cand.gmacs.min()) & (front.select_acc == cheapest)).any()
    assert front.select_acc.max() == cand.select_acc.max()
    fits = cand[cand.gmacs <= 2.0]
    chosen = cand[cand.chosen].iloc[0]
    assert chosen.gmacs <= 2.0 and chosen.select_acc == fits.select_acc.max()
    assert out["total_gmacs"] == pytest.approx(chosen.gmacs) and "perfect" in out["members"]
    # report accuracy is filled in only for what is shown (front and chosen), after selection
    shown = cand.on_front | cand.chosen
    assert cand.loc[shown, "acc_public_test"].notna().all() and cand.loc[~shown, "acc_public_test"].isna().all()
    with pytest.raises(ConfigError, match="no candidate costs <= 0.05"):
        budget_search(planted, 0.05)


@pytest.mark.parametrize("combiner", COMBINERS)
@pytest.mark.parametrize("temperature", [False, True])
def test_protocol_guard_refuses_the_report_split(planted, combiner, temperature):
    spec = EnsembleSpec(name="cheat", members=["weak0", "perfect"], combiner=combiner, temperature=temperature,
                        select_split="public_test")
    with pytest.raises(ProtocolError, match="'public_test' has role 'report'"):
        run_ensemble(planted, spec)
    assert not (planted / "ensembles" / "cheat.json").exists()


def test_protocol_guard_refuses_budget_search_on_the_report_split(planted, capsys):
    with pytest.raises(ProtocolError):
        budget_search(planted, 10.0, select_split="public_test")
    assert main(["ensemble", str(planted), "--budget-gmacs", "10", "--select-split", "public_test"]) == 2
    assert "'public_test' has role 'report'" in capsys.readouterr().err
    assert not (planted / "pareto.csv").exists()


@pytest.mark.parametrize("combiner", COMBINERS)
def test_ensemble_reproduces_exactly_from_its_json(planted, combiner):
    members = ["weak0", "weak2", "perfect"]
    run_ensemble(planted, EnsembleSpec(name="r", members=members, views=["identity", "hflip"], combiner=combiner,
                                       temperature=True))
    stored = load_store(planted)["ensemble:r"]
    for split in SPLITS:
        again = reproduce_ensemble(planted, "r", split).astype(np.float32)
        assert np.array_equal(again, stored[split].logits[0])


def test_cli_budget_search_and_report_plots(planted, capsys, recwarn):
    assert main(["ensemble", str(planted), "--budget-gmacs", "1"]) == 0
    assert "pareto.csv" in capsys.readouterr().out
    run_ensemble(planted, EnsembleSpec(name="cal", members=["weak1", "weak2"], combiner="nll_weights",
                                       temperature=True))
    board = leaderboard(planted)
    for col in ("nll_val", "ece_public_test", "brier_public_test", "selected_on", "combiner"):
        assert col in board.columns
    assert set(board.selected_on) == {"val"} and board.set_index("name").combiner["cal"] == "nll_weights+T"
    paths = write_report(planted, planted / "report")
    html = Path(paths["html"]).read_text()
    assert "Budget search: Pareto front" in html and "reliability before/after temperature scaling" in html
    assert html.count("data:image/png;base64,") >= 5 and "val = select" in html
    assert not [w for w in recwarn if "No artists with labels" in str(w.message)]


def test_metrics_of_a_perfect_ensemble_are_perfect(planted):
    out = run_ensemble(planted, EnsembleSpec(name="p", members=["perfect"], combiner="stacking"))
    m = out["metrics"]["public_test"]
    assert m["accuracy"] == 1.0 and m["auroc"] == pytest.approx(1.0) and len(m["per_class_recall"]) == 7
    ref = classification_metrics(load_store(planted)["ensemble:p"]["public_test"].logits[0],
                                 load_store(planted)["perfect"]["public_test"].labels)
    assert ref["accuracy"] == m["accuracy"]


# -- the registry: one class per combiner, one apply for the logit store and the exported graph --------------------
def _member_stack(seed=0, m=3, v=2, n=120):
    """``[M, V, N, C]`` logits of members of different strength, and the labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 7, n)
    return np.stack([_noisy(y, s, rng, scale=1.5, views=v) for s in np.linspace(0.8, 3.0, m)]), y


@pytest.mark.parametrize("temperature", [False, True])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_combiner_applies_alike_in_the_store_and_the_export_graph(name, temperature, tmp_path):
    """Generated from the registry: each combiner, fitted on val logits, gives the same logits through the
    numpy-facing ensemble path (float64), through ``FittedCombiner`` (float32, the export graph's last module) and
    through that module exported to ONNX and run with ONNX Runtime (batch axis dynamic)."""
    import onnxruntime as ort
    import torch

    from fer_ray.combiners import FittedCombiner

    stack, y = _member_stack()
    spec = EnsembleSpec(name="r", members=["a", "b", "c"], combiner=name, temperature=temperature, oof_folds=0)
    fitted = fit_ensemble(stack.mean(1), y, spec)
    stack = stack[fitted.pop("kept")]
    ref = apply_fitted(stack.mean(1), fitted)
    assert ref.dtype == np.float64 and ref.shape == (stack.shape[2], 7)
    assert np.array_equal(apply_fitted(stack, fitted), ref)  # [M, V, N, C]: views averaged by the same chain
    module = FittedCombiner(fitted, len(stack)).eval()
    with torch.no_grad():
        graph = module(torch.from_numpy(stack.astype(np.float32))).numpy()
    np.testing.assert_allclose(graph, ref, atol=2e-5 * max(1.0, np.abs(ref).max()), rtol=0)
    path = tmp_path / "combiner.onnx"
    torch.onnx.export(module, (torch.from_numpy(stack[:, :, :2].astype(np.float32)),), path, dynamo=False,
                      opset_version=17, input_names=["z"], output_names=["logits"],
                      dynamic_axes={"z": {2: "batch"}, "logits": {0: "batch"}})
    onnx_out = ort.InferenceSession(str(path)).run(None, {"z": stack.astype(np.float32)})[0]
    np.testing.assert_allclose(onnx_out, graph, atol=1e-5 * max(1.0, np.abs(ref).max()), rtol=0)


def test_the_ensemble_spec_knows_the_registry():
    assert set(COMBINERS) == set(REGISTRY) >= {"mean_logits", "mean_probs", "nll_weights", "greedy", "stacking"}
    with pytest.raises(ConfigError, match="combiner: must be one of"):
        EnsembleSpec(combiner="median")


def test_a_new_combiner_is_one_registered_class(planted):
    """Registering a class is all it takes: the spec accepts it, ``run_ensemble`` fits and applies it, the JSON
    reproduces it, and the export graph's combiner runs its ``apply``."""
    import torch

    from fer_ray.combiners import Combiner, FittedCombiner, register_combiner

    @register_combiner("log_probs_mean")
    class LogProbsMean(Combiner):  # the geometric mean of the probabilities, weighted
        def apply(self, z, t):
            return (t["weights"].view(-1, 1, 1) * torch.log_softmax(z, -1)).sum(0)

    try:
        members = ["weak0", "weak2", "perfect"]
        out = run_ensemble(planted, EnsembleSpec(name="geo", members=members, combiner="log_probs_mean",
                                                 temperature=True, oof_folds=0))
        stack, _ = _stack(planted, out["members"], "public_test")
        again = reproduce_ensemble(planted, "geo", "public_test")
        temps = np.asarray(out["fitted"]["member_temperatures"])[:, None, None]
        expect = np.mean([log_softmax(s, axis=-1) for s in stack / temps], axis=0) / out["fitted"]["temperature"]
        np.testing.assert_allclose(again, expect, atol=1e-6)
        with torch.no_grad():
            graph = FittedCombiner(out["fitted"], len(members))(torch.from_numpy(stack.astype(np.float32))).numpy()
        np.testing.assert_allclose(graph, again, atol=1e-4)
    finally:
        REGISTRY.pop("log_probs_mean")
