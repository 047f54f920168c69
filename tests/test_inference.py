"""Inference on the cluster (``fer_ray.inference``): checkpoints scored as concurrent Ray tasks give exactly the
serial in-process path's logits, and each task asks for the resources its trial trained with."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from fer_ray.checkpoint import save_checkpoint
from fer_ray.config import TrainConfig
from fer_ray.data.synthetic import generate
from fer_ray.inference import fill_store, task_resources
from fer_ray.models import create_model
from fer_ray.store import load_store

ROLES = {"train": "fit", "val": "select", "public_test": "report"}


def _experiment(root, data):
    (root / "split_roles.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "split_roles.json").write_text(json.dumps(ROLES))
    rows = []
    for i, (arch, size) in enumerate([("basic_cnn", 32), ("baseline_cnn_v1", 40)]):
        torch.manual_seed(i)
        cfg = TrainConfig(model=arch, img_size=size, num_workers=0, cpus_per_worker=1)
        run_config = dict(cfg.to_dict(), in_chans=1)
        ckpt = save_checkpoint(root / "ck" / f"t{i}", 1, create_model(arch, img_size=size), run_config, {})
        rows.append({"trial_id": f"t{i}", "arch": arch, "img_size": size, "in_chans": 1, "params": 1, "gmacs": 0.1,
                     "best_val_acc": 0.5, "best_epoch": 1, "epochs_run": 1, "stopped_early": False,
                     "checkpoint": str(ckpt), "config": json.dumps(run_config)})
    pd.DataFrame(rows).to_parquet(root / "trials.parquet")
    return root


@pytest.mark.ray
def test_concurrent_tasks_equal_the_serial_path(tmp_path, ray_session):
    data = generate(150, seed=3)
    splits = {"val": np.arange(0, 70), "public_test": np.arange(70, 150)}
    views = ["identity", "hflip", "shift2,0"]
    on_ray, serial = _experiment(tmp_path / "ray", data), _experiment(tmp_path / "serial", data)
    written = fill_store(on_ray, data, splits, views, ROLES, progress=False)
    assert len(written) == 4
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each task runs with: its trial's one CPU
    try:
        fill_store(serial, data, splits, views, ROLES, progress=False, on_ray=False)
    finally:
        torch.set_num_threads(threads)
    a, b = load_store(on_ray), load_store(serial)
    for member in ("t0", "t1"):
        for split in splits:
            assert a[member][split].views == views
            assert np.array_equal(a[member][split].logits, b[member][split].logits), (member, split)
            assert list(a[member][split].ids) == list(data.ids[splits[split]].astype(str))
    # Stored files with the same checkpoint and views are kept, not scored again.
    assert sorted(fill_store(on_ray, data, splits, views, ROLES, progress=False)) == sorted(written)


def test_task_resources_follow_the_trial():
    assert task_resources(TrainConfig(use_gpu=True, num_workers=2)) == {"num_gpus": 1, "num_cpus": 1}
    assert task_resources(TrainConfig(num_workers=2, cpus_per_worker=0.9)) == {"num_cpus": pytest.approx(1.8)}
    assert task_resources(TrainConfig(num_workers=0, cpus_per_worker=4), cluster_cpus=2) == {"num_cpus": 2}


@pytest.mark.ray
def test_rescoring_with_other_views_keeps_the_views_ensembles_use(tmp_path, ray_session):
    """``fer-ray tta --views identity`` after an ensemble was built on [identity, hflip]: the store keeps hflip for
    that ensemble's members, so the ensemble still reproduces exactly."""
    from fer_ray.ensemble import EnsembleSpec, reproduce_ensemble, run_ensemble

    data = generate(120, seed=4)
    splits = {"val": np.arange(0, 60), "public_test": np.arange(60, 120)}
    exp = _experiment(tmp_path / "e", data)
    fill_store(exp, data, splits, ["identity", "hflip"], ROLES, progress=False)
    run_ensemble(exp, EnsembleSpec(name="both", members=["t0", "t1"], combiner="nll_weights"))
    before = reproduce_ensemble(exp, "both", "public_test")
    fill_store(exp, data, splits, ["identity", "rot10"], ROLES, progress=False)
    stored = load_store(exp)["t0"]["val"].views
    assert stored == ["identity", "rot10", "hflip"], stored
    assert np.array_equal(reproduce_ensemble(exp, "both", "public_test"), before)
