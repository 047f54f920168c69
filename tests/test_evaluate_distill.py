"""`fer-ray evaluate` (another dataset as a report-only split, no refitting) and `fer-ray distill` (an ensemble's
soft targets into one student under Ray Train), on a tiny experiment built without a sweep: two members trained
one epoch with the pure-torch engine, saved as verified checkpoints, scored into the store, two ensembles."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from fer_ray import engine
from fer_ray.checkpoint import load_checkpoint, save_checkpoint
from fer_ray.cli import main
from fer_ray.config import SweepConfig, TrainConfig
from fer_ray.data import prepare_dataset, synthetic
from fer_ray.data.augment import Augment, Preprocess
from fer_ray.ensemble import EnsembleSpec, ProtocolError, apply_fitted, budget_candidates, member_logits, run_ensemble
from fer_ray.evaluate import default_split_name
from fer_ray.flops import count_gmacs, count_params
from fer_ray.inference import fill_store
from fer_ray.report import write_report
from fer_ray.store import read_logit_file, read_logits
from fer_ray.sweep import write_setup
from fer_ray.train import build_model

EXT = "ext_other"
MEMBERS = [("basic_cnn", 32), ("baseline_cnn_v1", 32)]


def _tensors(data, idx):
    return torch.from_numpy(data.images[idx]), torch.from_numpy(data.labels[idx])


@pytest.fixture(scope="module")
def tiny_exp(tmp_path_factory, ray_session):  # TTA scoring runs as Ray tasks
    root = tmp_path_factory.mktemp("evd")
    cfg = SweepConfig.from_dict({
        "name": "tiny", "data": {"synthetic_n": 280, "val_fraction": 0.2, "cache_dir": str(root / "cache")},
        "train": {"model": "basic_cnn", "img_size": 32, "epochs": 2, "batch_size": 32, "optimizer": "adamw",
                  "num_workers": 0, "cpus_per_worker": 1},
        "num_samples": 2, "asha": {"max_t": 2}, "tta_views": ["identity", "hflip"]}, "sweep")
    exp = root / "tiny"
    data, splits = prepare_dataset(cfg.data)
    write_setup(cfg, exp, data, splits)
    (tx, ty), (vx, vy) = _tensors(data, splits["train"]), _tensors(data, splits["val"])
    rows = []
    for i, (arch, size) in enumerate(MEMBERS):
        tc = cfg.train.replace(model=arch, img_size=size, seed=i)
        torch.manual_seed(i)
        model = build_model(tc)
        pre, aug = Preprocess.for_model(model.fer_cfg), Augment(tc.augment)
        engine.train_one_epoch(model, tx, ty, engine.build_optimizer(tc, model.parameters()), pre, aug, tc, 0)
        val_acc = engine.evaluate(model, vx, vy, pre, tc)["val_acc"]
        run_config = dict(tc.to_dict(), img_size=size, in_chans=1)
        ckpt = save_checkpoint(exp / "trials" / f"t{i}" / "checkpoints", 1, model, run_config, {"val_acc": val_acc})
        rows.append({"trial_id": f"t{i}", "arch": arch, "img_size": size, "in_chans": 1, "params": count_params(model),
                     "gmacs": count_gmacs(model), "best_val_acc": val_acc, "best_epoch": 1, "epochs_run": 1,
                     "stopped_early": False, "checkpoint": str(ckpt), "config": json.dumps(run_config, sort_keys=True)})
    pd.DataFrame(rows).to_parquet(exp / "trials.parquet", index=False)
    roles = json.loads((exp / "split_roles.json").read_text())
    fill_store(exp, data, splits, cfg.tta_views, roles, progress=False)
    run_ensemble(exp, EnsembleSpec(name="top2", members={"top_k": 2}))
    run_ensemble(exp, EnsembleSpec(name="greedy_nll", members={"top_k": 2}, combiner="greedy", greedy_metric="nll",
                                   temperature=True))
    write_report(exp, exp / "report")
    return exp


@pytest.fixture(scope="module")
def evaluated(tiny_exp, tmp_path_factory):
    csv = synthetic.write_csv(tmp_path_factory.mktemp("extdata") / "other.csv", synthetic.generate(140, seed=7))
    assert default_split_name(csv) == EXT
    assert main(["evaluate", str(tiny_exp), "--data", str(csv)]) == 0
    return tiny_exp, csv


def _acc(logits, labels):
    return float((np.asarray(logits).argmax(1) == labels).mean())


def test_evaluate_adds_report_split_and_columns(evaluated):
    exp, csv = evaluated
    assert json.loads((exp / "split_roles.json").read_text())[EXT] == "report"
    assert json.loads((exp / "data.json").read_text())["external"][EXT]["n"] == 140
    board = pd.read_csv(exp / "report" / "leaderboard.csv").set_index("name")
    for col in (f"acc_{EXT}", f"macro_f1_{EXT}", f"nll_{EXT}"):
        assert col in board.columns and board[col].notna().all()
    members = {}
    for tid in ("t0", "t1"):
        ls = read_logits(exp, tid, EXT)
        assert ls.views == ["identity", "hflip"] and ls.meta["role"] == "report" and len(ls.labels) == 140
        members[tid] = ls
        assert board.loc[tid, f"acc_{EXT}"] == pytest.approx(_acc(ls.logits.mean(0), ls.labels), abs=1e-9)
    labels = members["t0"].labels
    # top2 (mean of logits) recomputed by hand; greedy_nll from its stored fitted numbers (weights, temperatures).
    mean = np.mean([ls.logits.mean(0) for ls in members.values()], axis=0)
    assert board.loc["top2", f"acc_{EXT}"] == pytest.approx(_acc(mean, labels), abs=1e-9)
    info = json.loads((exp / "ensembles" / "greedy_nll.json").read_text())
    logits = apply_fitted(np.stack([member_logits(members[m], info["views"]) for m in info["members"]]), info["fitted"])
    assert board.loc["greedy_nll", f"acc_{EXT}"] == pytest.approx(_acc(logits, labels), abs=1e-9)
    stored = read_logits(exp, "ensemble:greedy_nll", EXT)
    np.testing.assert_allclose(stored.logits[0], logits, rtol=1e-5, atol=1e-5)
    assert info["metrics"][EXT]["accuracy"] == pytest.approx(_acc(logits, labels), abs=1e-9)


def test_external_split_is_never_selectable(evaluated):
    exp, csv = evaluated
    with pytest.raises(ProtocolError, match="role 'report'"):
        run_ensemble(exp, EnsembleSpec(name="cheat", select_split=EXT))
    with pytest.raises(ProtocolError):
        budget_candidates(exp, EXT)
    assert main(["ensemble", str(exp), "--budget-gmacs", "1", "--select-split", EXT]) == 2
    assert main(["evaluate", str(exp), "--data", str(csv), "--name", "val"]) == 2  # a run split is not overwritten
    assert not (exp / "ensembles" / "cheat.json").exists()


def test_kd_loss_matches_hand_computation_and_reduces_to_ce():
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 7), torch.randn(4, 7) * 3, torch.tensor([0, 3, 6, 2])
    a, temp = 0.7, 2.0
    loss = engine.LossFn(TrainConfig(distill_alpha=a, distill_temperature=temp), y)(s, y, t)
    pt, ps = torch.softmax(t / temp, 1), torch.softmax(s / temp, 1)
    kl = (pt * (pt.log() - ps.log())).sum(1).mean()
    ce = -torch.log_softmax(s, 1)[torch.arange(4), y].mean()
    assert loss.item() == pytest.approx((a * temp**2 * kl + (1 - a) * ce).item(), rel=1e-5)
    plain = engine.LossFn(TrainConfig(distill_alpha=0.0), y)(s, y, t)
    assert plain.item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)
    assert engine.LossFn(TrainConfig(distill_alpha=a), y)(s, y).item() == pytest.approx(plain.item(), rel=1e-6)


@pytest.mark.ray
def test_distill_student_sits_on_the_leaderboard(evaluated, ray_session):
    exp, _ = evaluated
    assert main(["distill", str(exp), "--ensemble", "top2", "--student", "baseline_cnn_v1", "--epochs", "2",
                 "--img-size", "32", "--temperature", "3", "--alpha", "0.8", "--num-cpus", "2"]) == 0
    member = "distill:baseline_cnn_v1"
    student = pd.read_parquet(exp / "distilled.parquet").set_index("trial_id").loc[member]
    assert student.teacher == "ensemble:top2" and student.epochs_run == 2 and student.gmacs > 0
    ckpt = load_checkpoint(student.checkpoint)
    assert ckpt["config"]["distill_alpha"] == 0.8 and ckpt["config"]["distill_temperature"] == 3.0
    assert student.best_val_acc == max(h["val_acc"] for h in ckpt["metrics"]["history"])
    teacher = read_logit_file(exp / "distill" / "baseline_cnn_v1" / "teacher_train.parquet")
    assert teacher.logits.shape[1] == json.loads((exp / "data.json").read_text())["splits"]["train"]["n"]
    board = pd.read_csv(exp / "report" / "leaderboard.csv").set_index("name")
    row = board.loc[member]
    assert row.kind == "distill" and row.gmacs == pytest.approx(student.gmacs) and row.tta_views == 2
    for split in ("val", "public_test", "private_test", EXT):
        assert 0 <= row[f"acc_{split}"] <= 1
    ls = read_logits(exp, member, "val")
    assert _acc(ls.logits[0], ls.labels) == pytest.approx(student.best_val_acc, abs=1e-6)  # identity view = training
    assert {"top2", "greedy_nll", "t0", "t1", member} <= set(board.index)


@pytest.mark.ray
def test_gpu_recipe_smoke_variant_runs_end_to_end(tmp_path, ray_session):
    """sweeps/fer2013_gpu_smoke.yaml (both GPU recipes shrunk for a CPU) through sweep, TTA, ensemble and report."""
    from fer_ray.config import load_sweep
    from fer_ray.pipeline import run_all

    smoke = load_sweep("sweeps/fer2013_gpu_smoke.yaml")
    recipes = [load_sweep("sweeps/fer2013_gpu.yaml"), load_sweep("sweeps/fer2013_gpu_resnet18.yaml")]
    assert set(smoke.search_space["model"]["grid"]) == {r.train.model for r in recipes}
    for r in recipes:  # the smoke runs what the recipes run: crop mode, optimizer, plateau schedule, TTA policy
        for key in ("img_size", "input", "optimizer", "momentum", "scheduler", "plateau_factor", "plateau_patience"):
            assert getattr(smoke.train, key) == getattr(r.train, key), key
        assert smoke.tta_views == r.tta_views == ["tenshift4"] and r.asha.synchronous and r.train.aug_repeats > 1
    cfg = smoke.replace(data=smoke.data.replace(cache_dir=str(tmp_path / "cache")))
    board = run_all(cfg, tmp_path / "smoke", num_cpus=2)
    assert set(board.arch) >= {"vggnet_fer", "resnet18_fer"}
    assert (board.kind == "ensemble").any() and board.acc_public_test.notna().all()
    assert (board.tta_views[board.kind == "model"] == 10).all()
