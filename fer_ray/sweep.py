"""The Ray Tune layer: a successive-halving sweep (Tune's ASHA, or ``SuccessiveHalving``, the synchronous kind)
where each trial is one TorchTrainer run (the Train V2 pattern).

``run_sweep`` writes the experiment folder ``results/<name>/``::

    sweep.yaml          the resolved sweep config (``--resume`` reads it back)
    split_roles.json    {"train": "fit", "val": "select", "public_test": "report", ...}
    data.json           data source, split sizes and class counts
    tune/               Ray Tune's experiment state (``Tuner.restore`` resumes from it)
    train/              Ray Train's per-trial run folders
    trials/<trial_id>/  checkpoints/epoch_NNN.pt + manifest.json, history.json, metrics.parquet
    trials.parquet      one row per trial: arch, img_size, params, GMACs, best val acc/epoch, checkpoint

A trial driver (a Tune function trainable holding 0.1 CPU) builds and fits the TorchTrainer; the Train
``TuneReportCallback`` forwards rank 0's per-epoch metrics to Tune, where the scheduler (on ``epoch``, ranking
``val_score``) stops or pauses trials.
GPU trials are pinned to one GPU type by the sweep's ``placement`` rules (``fer_ray.placement``).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
from ray import tune
from ray.tune import PlacementGroupFactory
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, HyperBandScheduler, TrialScheduler
from ray.tune.schedulers.hyperband import _Bracket  # one HyperBand bracket = synchronous successive halving
from ray.tune.search import BasicVariantGenerator

from fer_ray.checkpoint import atomic_write_bytes, atomic_write_text, load_checkpoint
from fer_ray.config import SweepConfig, TrainConfig, load_sweep, set_path
from fer_ray.data import CLASSES
from fer_ray.flops import count_gmacs, count_params
from fer_ray.placement import cluster_gpus, place_in_cluster, trial_resources
from fer_ray.tracking import tune_callbacks
from fer_ray.train import build_model, init_ray, make_trainer, prepare_dataset, put_dataset

log = logging.getLogger(__name__)

SPLIT_ROLES = {"train": "fit", "val": "select", "public_test": "report", "private_test": "report"}
_SAMPLERS = {
    "choice": tune.choice,
    "grid": tune.grid_search,
    "uniform": lambda v: tune.uniform(*v),
    "loguniform": lambda v: tune.loguniform(*v),
    "randint": lambda v: tune.randint(v[0], v[1] + 1),
}


def param_space(cfg: SweepConfig) -> dict:
    """Tune's param_space: the base train config with each search-space path replaced by a Tune domain."""
    train = cfg.train.to_dict()
    for key, spec in cfg.search_space.items():
        sampler, values = next(iter(spec.items()))
        train = set_path(train, key, _SAMPLERS[sampler](values))
    return {"train": train}


def trial_driver(config: dict, *, data_ref, exp_dir: str, max_failures: int, sweep: SweepConfig | None = None) -> None:
    """One trial: pin its GPU type (``fer_ray.placement``), build the TorchTrainer for its config and fit it."""
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    cfg = TrainConfig.from_dict(config["train"], "train")
    rule = sweep.rule_for(cfg.model) if sweep else None
    if cfg.num_workers > 0:  # local mode got its GPU type with the trial's resources
        cfg = place_in_cluster(cfg, rule)
    exp = Path(exp_dir)
    callbacks = [TuneReportCallback()] if cfg.num_workers > 0 else None
    make_trainer(cfg, data_ref, exp / "trials" / trial_id, exp / "train", name=f"train_{trial_id}",
                 callbacks=callbacks, in_tune=True, max_failures=max_failures,
                 batch_size_cap=rule.batch_size_cap if rule else None).fit()


def _resources(config: dict, sweep: SweepConfig) -> PlacementGroupFactory:
    """A trial driver's resources, from the trial's own config (``fer_ray.placement.trial_resources``)."""
    cfg = TrainConfig.from_dict(config["train"], "train")
    gpus = cluster_gpus() if cfg.use_gpu and cfg.num_workers == 0 else {}
    return PlacementGroupFactory([trial_resources(cfg, sweep.rule_for(cfg.model), gpus)])


def _trainable(cfg: SweepConfig, data_ref, exp_dir: Path):
    fn = functools.partial(trial_driver, data_ref=data_ref, exp_dir=str(exp_dir.absolute()),
                           max_failures=cfg.max_failures, sweep=cfg)
    fn.__name__ = "trial"  # Tune names trials after the trainable
    return tune.with_resources(fn, functools.partial(_resources, sweep=cfg))


class SuccessiveHalving(HyperBandScheduler):
    """Synchronous successive halving: Ray Tune's HyperBand with exactly one bracket holding every trial.

    All ``num_trials`` trials run ``grace_period`` epochs; a trial that gets there first is paused (Tune stops
    its process; it resumes from its epoch checkpoint). When all have reported, the best ⌈n / reduction_factor⌉
    go on to ``grace_period × reduction_factor`` epochs, and so on up to ``max_t``. Trials start only while
    fewer than ``max_running`` run: Tune's searcher-side limit counts paused trials as live and would deadlock.
    On ``--resume`` the bracket restarts: finished trials are left out (they cannot report again) and the live
    ones, already past the rungs they had cleared, are halved through those rungs again (keeping all of them, as
    they are the ones the interrupted run kept) until the interrupted rung's decision is due.
    """

    def __init__(self, *, max_t: int, grace_period: int, reduction_factor: float, num_trials: int,
                 max_running: int | None = None, time_attr: str = "epoch"):
        super().__init__(time_attr=time_attr, max_t=max_t, reduction_factor=reduction_factor)
        self._s_max_1 = 1  # one bracket per band: the band is full once it holds the bracket
        self._get_n0 = lambda s: num_trials
        self._get_r0 = lambda s: grace_period
        self._halvings = max(0, math.ceil(math.log(max_t / grace_period, reduction_factor) - 1e-9))
        self._max_running = max_running

    def _create_bracket(self, s: int) -> _Bracket:
        return _Bracket(time_attr=self._time_attr, max_trials=self._get_n0(s), init_t_attr=self._get_r0(s),
                        max_t_attr=self._max_t_attr, eta=self._eta, s=self._halvings,
                        stop_last_trials=self._stop_last_trials)

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        if trial.status in (Trial.TERMINATED, Trial.ERROR):  # restored from a resumed sweep: done already
            return
        super().on_trial_add(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        if trial in self._trial_info:
            super().on_trial_remove(tune_controller, trial)

    def _process_bracket(self, tune_controller, bracket: _Bracket) -> str:
        action = super()._process_bracket(tune_controller, bracket)
        # Trials restored by ``--resume`` may already be past several rungs (the bracket restarts at the first):
        # halve again while everyone is past the current rung, so that one of them goes on instead of all waiting.
        while (action == TrialScheduler.PAUSE and not bracket.trials_to_unpause and bracket.cur_iter_done()
               and not bracket.finished()):
            action = super()._process_bracket(tune_controller, bracket)
        return action

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        running = sum(t.status == Trial.RUNNING for t in tune_controller.get_trials())
        if self._max_running and running >= self._max_running:
            return None
        return super().choose_trial_to_run(tune_controller)


def make_scheduler(cfg: SweepConfig) -> ASHAScheduler | SuccessiveHalving:
    """The sweep's scheduler on the trials' ``epoch``; Tune hands it ``cfg.metric``/``cfg.mode`` (default
    ``val_score``). ``asha.synchronous`` selects ``SuccessiveHalving``, else Ray Tune's (asynchronous) ASHA."""
    a = cfg.asha
    if a.synchronous:
        return SuccessiveHalving(max_t=a.max_t, grace_period=a.grace_period, reduction_factor=a.reduction_factor,
                                 num_trials=cfg.num_trials(), max_running=cfg.max_concurrent_trials)
    return ASHAScheduler(time_attr="epoch", max_t=a.max_t, grace_period=a.grace_period,
                         reduction_factor=a.reduction_factor)


def write_setup(cfg: SweepConfig, exp_dir: Path, data, splits) -> None:
    import yaml

    exp_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(exp_dir / "sweep.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    atomic_write_text(exp_dir / "split_roles.json", json.dumps({k: SPLIT_ROLES[k] for k in splits}, indent=1))
    info = {"source": cfg.data.path or f"synthetic(n={cfg.data.synthetic_n}, seed={cfg.data.synthetic_seed})",
            "classes": list(CLASSES),
            "splits": {k: {"n": int(len(v)),
                           "class_counts": np.bincount(data.labels[v], minlength=len(CLASSES)).tolist()}
                       for k, v in splits.items()}}
    atomic_write_text(exp_dir / "data.json", json.dumps(info, indent=1))


def run_sweep(cfg: SweepConfig, exp_dir: str | Path, resume: bool = False, num_cpus: int | None = None,
              verbose: int = 1, prepared: tuple | None = None) -> pd.DataFrame:
    """Run (or resume) the sweep into ``exp_dir`` and return the per-trial summary (``trials.parquet``).

    ``prepared``: ``prepare_dataset(cfg.data)``'s result when the caller already holds it.
    """
    exp_dir = Path(exp_dir).absolute()
    data, splits = prepared or prepare_dataset(cfg.data)
    if not resume:
        write_setup(cfg, exp_dir, data, splits)
    init_ray(num_cpus=num_cpus)
    trainable = _trainable(cfg, put_dataset(data, splits), exp_dir)
    tune_dir = exp_dir / "tune"
    if resume and tune.Tuner.can_restore(str(tune_dir)):
        # Tune restores the param_space it saved: rebuilding it from today's TrainConfig would fail the restore
        # (Tune checks the keys) whenever TrainConfig gained a field since the sweep started.
        tuner = tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_errored=True)
    else:
        # Synchronous successive halving pauses trials; the scheduler itself caps how many run at once.
        concurrent = None if cfg.asha.synchronous else cfg.max_concurrent_trials
        tuner = tune.Tuner(
            trainable, param_space=param_space(cfg),
            tune_config=tune.TuneConfig(metric=cfg.metric, mode=cfg.mode, scheduler=make_scheduler(cfg),
                                        num_samples=cfg.num_samples, max_concurrent_trials=concurrent,
                                        search_alg=BasicVariantGenerator(random_state=cfg.seed,
                                                                         max_concurrent=concurrent or 0)),
            run_config=tune.RunConfig(name="tune", storage_path=str(exp_dir), verbose=verbose,
                                      failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                      callbacks=tune_callbacks(cfg.wandb, cfg.wandb_project, exp_dir)))
    tuner.fit()
    return collect_trials(exp_dir)


def collect_trials(exp_dir: Path) -> pd.DataFrame:
    """Summarise every trial folder into ``trials.parquet`` (+ per-trial ``metrics.parquet``)."""
    cfg = load_sweep(exp_dir / "sweep.yaml")
    rows = []
    for trial_dir in sorted((exp_dir / "trials").glob("*")):
        history_path = trial_dir / "history.json"
        if not history_path.is_file():
            continue
        history = json.loads(history_path.read_text())
        hist_df = pd.DataFrame(history)
        atomic_write_bytes(trial_dir / "metrics.parquet", lambda f, d=hist_df: d.to_parquet(f, index=False))
        best = max(history, key=lambda h: h["val_acc"])
        ckpt = trial_dir / "checkpoints" / f"epoch_{best['epoch']:03d}.pt"
        train_cfg = load_checkpoint(ckpt)["config"]
        tc = TrainConfig.from_dict(train_cfg, "train")
        model = build_model(tc.replace(pretrained=False))
        rows.append({
            "trial_id": trial_dir.name, "arch": tc.model, "img_size": model.fer_cfg["img_size"],
            "in_chans": model.fer_cfg["in_chans"], "params": count_params(model), "gmacs": count_gmacs(model),
            "best_val_acc": best["val_acc"], "best_epoch": best["epoch"], "epochs_run": len(history),
            "stopped_early": len(history) < min(tc.epochs, cfg.asha.max_t), "checkpoint": str(ckpt),
            "config": json.dumps(train_cfg, sort_keys=True),
        })
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values("best_val_acc", ascending=False).reset_index(drop=True)
    atomic_write_bytes(exp_dir / "trials.parquet", lambda f: df.to_parquet(f, index=False))
    return df

