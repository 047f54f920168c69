"""Population-based training (``scheduler: pbt``): its config's one-line errors, the scheduler it builds, a
restored optimizer going on at a mutated lr and weight decay, the lineage a trial records, and one real PBT sweep
on the session's Ray (synchronous, so every interval's bottom trial exploits) through ``trials.parquet`` and a
``--resume`` that re-runs nothing."""

import json

import pytest
import torch

from fer_ray.config import ConfigError, SweepConfig, TrainConfig
from fer_ray.loop import TrainingRun
from fer_ray.schedulers import ClipToBounds, make_scheduler
from fer_ray.testing import run_arrays
from fer_ray.train import mutations_since

BASE = {"name": "pbt", "data": {"synthetic_n": 300},
        "train": {"model": "basic_cnn", "img_size": 32, "epochs": 3, "batch_size": 32, "num_workers": 0,
                  "cpus_per_worker": 0.6, "scheduler": "none"},
        "search_space": {"lr": {"loguniform": [3e-4, 3e-3]}}, "num_samples": 3, "max_concurrent_trials": 3,
        "scheduler": "pbt", "pbt": {"perturbation_interval": 1, "synch": True, "quantile_fraction": 0.34,
                                    "mutations": {"lr": {"loguniform": [1e-4, 1e-2]},
                                                  "augment.strength": {"uniform": [0.0, 1.0]}}}}


def _cfg(**changes) -> SweepConfig:
    d = json.loads(json.dumps(BASE))
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = d
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return SweepConfig.from_dict(d)


@pytest.mark.parametrize("changes, message", [
    ({"scheduler": "pbt2"}, "scheduler: must be one of asha, pbt"),
    ({"pbt__mutations": {"learning_rate": {"uniform": [0.1, 0.2]}}}, "pbt.mutations.learning_rate: is not a train "
                                                                     "config field"),
    ({"pbt__mutations": {"lr": {"grid": [0.1, 0.2]}}}, "pbt.mutations.lr: must be one mapping of choice/uniform"),
    ({"pbt__mutations": {}}, "pbt.mutations: must name at least one train field"),
    ({"pbt__perturbation_interval": 3}, "pbt.perturbation_interval: must be < train.epochs (3)"),
    ({"num_samples": 1}, "num_samples: pbt needs a population"),
    ({"train__num_workers": 2}, "train.num_workers: must be 0 with scheduler pbt"),
    ({"train__ema": {"decay": 0.9}}, "train.ema: is not supported with scheduler pbt"),
    ({"keep_checkpoints": {"last_k": 2}}, "keep_checkpoints: must be best with scheduler pbt"),
    ({"pbt__bogus": 1}, "bogus"),
])
def test_bad_pbt_configs_fail_with_one_line(changes, message):
    with pytest.raises(ConfigError) as e:
        _cfg(**changes)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_scheduler_mutates_train_fields_inside_their_bounds():
    from ray.tune.schedulers import PopulationBasedTraining

    cfg = _cfg()
    scheduler = make_scheduler(cfg)
    assert isinstance(scheduler, PopulationBasedTraining)
    assert set(scheduler._hyperparam_mutations["train"]) == {"lr", "augment"}
    assert set(scheduler._hyperparam_mutations["train"]["augment"]) == {"strength"}
    clip = ClipToBounds(cfg.pbt.mutations)
    config = {"train": {"lr": 0.05, "augment": {"strength": -0.2, "hflip": True}}}
    assert clip(config) == {"train": {"lr": 1e-2, "augment": {"strength": 0.0, "hflip": True}}}
    assert _cfg(asha={"max_t": 10}).scheduler == "pbt"  # ASHA's max_t is not PBT's: no epochs check


@pytest.mark.parametrize("scheduler", ["cosine", "plateau"])
def test_a_restored_run_goes_on_at_its_own_lr_and_weight_decay(scheduler):
    arrays, cpu = run_arrays(), torch.device("cpu")
    donor_cfg = TrainConfig(model="basic_cnn", img_size=32, epochs=4, batch_size=16, num_workers=0, lr=1e-3,
                            weight_decay=1e-4, scheduler=scheduler, warmup_epochs=1 if scheduler == "cosine" else 0)
    donor = TrainingRun(donor_cfg, arrays, cpu)
    donor.train_epoch()
    donor.train_epoch()
    lr_then = donor.optimizer.param_groups[0]["lr"]
    payload = donor.state_dict()

    same = TrainingRun(donor_cfg, arrays, cpu)
    same.load_state_dict(payload)  # a plain resume: nothing changes
    assert same.optimizer.param_groups[0]["lr"] == lr_then
    mutated = TrainingRun(donor_cfg.replace(lr=2e-3, weight_decay=5e-4), arrays, cpu)
    mutated.load_state_dict(payload)
    assert mutated.epoch == 2
    assert mutated.optimizer.param_groups[0]["lr"] == pytest.approx(2 * lr_then)  # the schedule's point, new base
    assert all(g["weight_decay"] == 5e-4 for g in mutated.optimizer.param_groups)
    mutated.train_epoch()
    same.train_epoch()
    assert mutated.optimizer.param_groups[0]["lr"] == pytest.approx(2 * same.optimizer.param_groups[0]["lr"])


def test_a_trial_records_the_lineage_of_its_checkpoint():
    payload = {"config": {"lr": 1e-3, "augment": {"strength": 0.5}},
               "mutations": [{"epoch": 1, "from": "t1", "config": {"lr": 8e-4}}]}
    config = {"lr": 1.2e-3, "augment": {"strength": 0.5}}
    assert mutations_since(payload, config, "t1", "t1", 2) == payload["mutations"]  # its own checkpoint: a resume
    assert mutations_since(payload, config, "t3", "t2", 2) == [
        *payload["mutations"], {"epoch": 2, "from": "t3", "config": {"lr": 1.2e-3}}]
    assert mutations_since({"config": config}, config, "t2", "", 2) == []  # outside Tune: no trial id


@pytest.mark.ray
def test_pbt_sweep_exploits_records_mutations_and_resumes(tmp_path, ray_session):
    from fer_ray.experiment import Experiment
    from fer_ray.report import leaderboard  # noqa: F401  (the column's consumer, imported to fail early)
    from fer_ray.sweep import run_sweep

    cfg = _cfg(data={"synthetic_n": 300, "cache_dir": str(tmp_path / "cache")})
    df = run_sweep(cfg, tmp_path / "pbt", verbose=0)
    assert len(df) == 3 and (df.epochs_run == 3).all()
    lineages = {t: json.loads(m) for t, m in zip(df.trial_id, df.mutations, strict=True)}
    exploited = {t: m for t, m in lineages.items() if m}
    # Synchronous PBT with a third of 3 trials per quantile: at each of epochs 1 and 2 the bottom trial exploits.
    assert exploited, lineages
    for t, steps in exploited.items():
        # A lineage is the weights' history: a trial that exploits a donor inherits the donor's steps, which may
        # include one from this very trial (t's epoch-1 weights went to the donor, which t copies back at epoch 2);
        # its own last step is from another trial.
        assert steps[-1]["from"] != t and [s["epoch"] for s in steps] == sorted(s["epoch"] for s in steps), steps
        for step in steps:
            assert step["from"] in lineages and step["epoch"] in (1, 2), step
            assert set(step["config"]) <= {"lr", "augment.strength"} and step["config"], step
            assert 1e-4 <= step["config"].get("lr", 1e-3) <= 1e-2
    exp = Experiment(tmp_path / "pbt")
    for t in df.trial_id:  # each trial is its last epoch, of its last lineage
        history = exp.history(t)
        assert [h["epoch"] for h in history] == [1, 2, 3]
        row = df.set_index("trial_id").loc[t]
        assert row.best_epoch == 3 and row.best_val_acc == history[-1]["val_acc"]
        assert json.loads(row.config)["lr"] == pytest.approx(history[-1]["lr"])  # scheduler none: lr is the base
    again = run_sweep(cfg, tmp_path / "pbt", resume=True, verbose=0)  # nothing left to run: the same trials
    assert again.set_index("trial_id").best_val_acc.to_dict() == df.set_index("trial_id").best_val_acc.to_dict()

