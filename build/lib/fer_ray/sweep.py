"""The Ray Tune layer: a successive-halving sweep (the scheduler: ``fer_ray.schedulers``) where each trial is one
TorchTrainer run (the Train V2 pattern), in the Ray session ``fer_ray.cluster`` owns.

``run_sweep`` writes into an ``Experiment`` (``fer_ray.experiment`` owns the layout; its root may be a local path,
NFS or a bucket URI): the resolved ``sweep.yaml``, ``split_roles.json``, ``data.json``, Tune's state in ``tune/``,
each DDP trial's Ray Train run in ``train/train_<trial_id>/``, per-trial ``history.json`` and, at the end,
``trials.parquet`` (one row per trial: arch, img_size, params, GMACs, best val acc/epoch, whether a time limit cut
it, checkpoint location; the model's size and compute as its checkpoint recorded them when training built it).

A trial driver (a Tune function trainable holding 0.1 CPU) builds and fits the TorchTrainer; the Train
``TuneReportCallback`` forwards rank 0's per-epoch metrics to Tune, where the scheduler (on ``epoch``, ranking
``val_score``) stops or pauses trials; the search algorithm that proposes them (random, or Optuna TPE) is
``fer_ray.search``'s. A paused, retried or resumed trial's driver builds the same TorchTrainer
again and Ray Train continues the run from its latest checkpoint; in-process trials (``num_workers: 0``) report
and checkpoint through Tune, which restores them the same way. ``run_sweep(group=...)`` runs the same machinery
for one-off runs (``fer-ray train``, a ``fer-ray distill`` student) under another prefix of the experiment.
GPU trials are pinned to one GPU type by the sweep's ``placement`` rules (``fer_ray.placement``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import posixpath

import numpy as np
import pandas as pd
from ray import tune
from ray.tune import PlacementGroupFactory
from ray.tune.experiment import Trial

from fer_ray import budget, cluster
from fer_ray.checkpoint import checkpoint_profile, load_checkpoint
from fer_ray.config import SweepConfig, TrainConfig, sampler_of, set_path
from fer_ray.data import CLASSES, prepare_dataset
from fer_ray.data.dataset import fingerprint
from fer_ray.experiment import TUNE, Experiment, as_experiment
from fer_ray.loop import best_entry
from fer_ray.names import SPLIT_ROLES
from fer_ray.placement import (
    autoscaler_node_types,
    check_feasible,
    cluster_gpus,
    launchable_types,
    place_in_cluster,
    trial_resources,
    trials_that_fit,
)
from fer_ray.schedulers import (
    SuccessiveHalving,  # noqa: F401 — Tune state of older experiments pickles this path
    make_scheduler,
)
from fer_ray.search import make_searcher, param_space  # noqa: F401 — param_space: the sweep's Tune space
from fer_ray.storage import join_uri
from fer_ray.tracking import tune_callbacks
from fer_ray.train import CHECKPOINT_KEEP, KEEP_ALL, make_trainer, where_trained

log = logging.getLogger(__name__)

RESOURCE_FIELDS = ("num_workers", "cpus_per_worker", "use_gpu", "gpu_fraction")


def trial_configs(cfg: SweepConfig) -> list[TrainConfig]:
    """The base train config and one per candidate of every resource field the search space varies (ranges: both
    bounds), enough to see the largest request any trial can make."""
    out = [cfg.train]
    for key, spec in cfg.search_space.items():
        if key in RESOURCE_FIELDS:
            out += [TrainConfig.from_dict(set_path(cfg.train.to_dict(), key, v), "train")
                    for v in sampler_of(spec)[1]]
    return out


def concurrency(cfg: SweepConfig) -> int:
    """How many trials run at once: ``max_concurrent_trials`` with random search; with ``optuna``,
    ``search.max_concurrent`` or, unset, as many as fit on the connected cluster now
    (``fer_ray.placement.trials_that_fit``)."""
    import ray

    if cfg.search.algorithm != "optuna":
        return cfg.max_concurrent_trials
    n = cfg.search.max_concurrent or trials_that_fit(trial_configs(cfg), ray.cluster_resources())
    log.info("optuna: up to %d trial(s) proposed and running at once", n)
    if cfg.asha.synchronous:
        log.warning("optuna under synchronous halving: the bracket's %d trials are all proposed before any finishes, "
                    "so they are TPE's seeded random start-up draws (use ASHA for TPE to learn as it goes)",
                    cfg.num_trials())
    return n


def reuses_actors(cfg: SweepConfig) -> bool:
    """Whether Tune reuses a finished trial's process for the next (``cfg.reuse_actors``): only when every trial
    trains in-process. A DDP trial's driver owns its Ray Train controller and worker placement group, which go
    with the driver's process; a reused driver kept them (the next trial then waited for their CPUs forever)."""
    return cfg.reuse_actors and all(c.num_workers == 0 for c in trial_configs(cfg))


def trial_driver(config: dict, *, data_ref, exp_uri: str, group: str, max_failures: int,
                 sweep: SweepConfig | None = None, launchable: set[str] | None = None) -> None:
    """One trial: pin its GPU type (``fer_ray.placement``), build the TorchTrainer for its config and fit it."""
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    cfg = TrainConfig.from_dict(sweep.conditioned(config["train"]) if sweep else config["train"], "train")
    rule = sweep.rule_for(cfg.model) if sweep else None
    if cfg.num_workers > 0:  # local mode got its GPU type with the trial's resources
        cfg = place_in_cluster(cfg, rule, launchable)
    callbacks = [TuneReportCallback()] if cfg.num_workers > 0 else None
    make_trainer(cfg, data_ref, exp_uri, trial_id, group, callbacks=callbacks, in_tune=True,
                 max_failures=max_failures, batch_size_cap=rule.batch_size_cap if rule else None,
                 keep_all=bool(sweep) and sweep.keep_checkpoints != "best").fit()


def _resources(config: dict, sweep: SweepConfig, launchable: set[str] | None = None) -> PlacementGroupFactory:
    """A trial driver's resources, from the trial's own config (``fer_ray.placement.trial_resources``)."""
    cfg = TrainConfig.from_dict(sweep.conditioned(config["train"]), "train")
    gpus = cluster_gpus() if cfg.use_gpu and cfg.num_workers == 0 else {}
    return PlacementGroupFactory([trial_resources(cfg, sweep.rule_for(cfg.model), gpus, launchable)])


def _trainable(cfg: SweepConfig, data_ref, exp: Experiment, group: str, launchable: set[str] | None = None):
    fn = functools.partial(trial_driver, data_ref=data_ref, exp_uri=exp.uri, group=group,
                           max_failures=cfg.max_failures, sweep=cfg, launchable=launchable)
    fn.__name__ = "trial"  # Tune names trials after the trainable
    return tune.with_resources(fn, functools.partial(_resources, sweep=cfg, launchable=launchable))


def _trial_dirname(trial: Trial) -> str:
    """Tune's folder for a trial: its id, so ``Experiment.checkpoints`` finds in-process trials' checkpoints."""
    return trial.trial_id


def write_setup(cfg: SweepConfig, exp: Experiment | str, data, splits) -> None:
    """The experiment's set-up files: the resolved sweep, the split roles and the data summary."""
    exp = as_experiment(exp)
    exp.mark_created()
    exp.write_sweep(cfg)
    exp.write_roles({k: SPLIT_ROLES[k] for k in splits})
    exp.write_data_info({
        "source": cfg.data.path or f"synthetic(n={cfg.data.synthetic_n}, seed={cfg.data.synthetic_seed})",
        "fingerprint": fingerprint(data, splits), "classes": list(CLASSES),
        "splits": {k: {"n": int(len(v)), "class_counts": np.bincount(data.labels[v], minlength=len(CLASSES)).tolist()}
                   for k, v in splits.items()}})


class EpochLines(tune.Callback):
    """One line per trial epoch, printed by the driver: what a person follows by default (Ray's trial tables and
    the workers' logs come with ``--verbose``)."""

    def on_trial_result(self, iteration: int, trials: list, trial: Trial, result: dict, **info) -> None:
        train = trial.config.get("train", {})
        print(f"[{trial.trial_id}] epoch {result.get('epoch')}/{train.get('epochs')} {train.get('model')}"
              f"@{result.get('img_size')} train_loss {result.get('train_loss', float('nan')):.4f} val_loss "
              f"{result.get('val_loss', float('nan')):.4f} val_acc {result.get('val_acc', float('nan')):.4f} "
              f"({result.get('epoch_time_s', 0.0):.1f}s)", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Trial, **info) -> None:
        print(f"[{trial.trial_id}] failed: {trial.error_file or 'see the Tune log'}", flush=True)


class BudgetGuard(tune.Stopper, tune.Callback):
    """A time limit's deadline (``fer_ray.budget.SweepDeadline``) in Tune: asked after every result (a trial whose
    next epoch would end after the deadline stops at this epoch boundary) and after every step of Tune's loop (the
    sweep ends at the deadline, or once no trial could finish an epoch), and told which trials run. Every sweep
    carries one, inert without a time limit: Tune restores its stopper with the experiment on ``--resume``, so the
    guard holds no deadline of its own and enforces the one ``fer_ray.budget.arm`` set for this invocation."""

    def __call__(self, trial_id: str, result: dict) -> bool:
        deadline = budget.armed()
        return deadline is not None and deadline.stop_trial(trial_id, result)

    def stop_all(self) -> bool:
        deadline = budget.armed()
        return deadline is not None and deadline.stop_sweep()

    def setup(self, **info) -> None:
        deadline = budget.armed()
        if deadline is not None:
            deadline.guarded = True

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        deadline = budget.armed()
        if deadline is not None:
            deadline.running = {t.trial_id for t in trials if t.status == Trial.RUNNING}


def run_sweep(cfg: SweepConfig, exp: Experiment | str, resume: bool = False, num_cpus: int | None = None,
              verbose: bool = False, prepared: tuple | None = None, group: str = "",
              data_ref=None, deadline: budget.SweepDeadline | None = None) -> pd.DataFrame:
    """Run (or resume) the sweep into ``exp`` and return the per-trial summary (``trials.parquet``).

    ``prepared``: ``fer_ray.data.prepare_dataset(cfg.data)``'s result when the caller already holds it. ``group``:
    run the trials under this prefix of the experiment, without writing its set-up files or ``trials.parquet``
    (``fer-ray distill``), with ``data_ref`` (an object-store reference from ``fer_ray.cluster.put_dataset``) as the
    shared dataset.
    ``verbose``: Ray's trial tables and worker logs too (else one line per trial epoch). ``deadline``: the time
    limit's (``fer_ray.budget``), enforced by ``BudgetGuard``; what it cut goes to ``budget.json``.
    """
    from fer_ray import footprint
    from fer_ray.models import check_model_names

    exp = as_experiment(exp)
    check_model_names(cfg)  # before any data is read or trial started
    if data_ref is None:
        data, splits = prepared or prepare_dataset(cfg.data)
        if not resume and not group:
            write_setup(cfg, exp, data, splits)
        else:
            exp.check_data(fingerprint(data, splits), cfg.data.path or "the synthetic generator")
        cluster.init_ray(num_cpus=num_cpus, verbose=verbose)
        data_ref = cluster.put_dataset(data, splits)
    footprint.start_stage(exp, autoscaled=not cluster.STARTED_LOCAL_RAY)  # what earlier drivers' trials left
    if not verbose:  # Tune's new console output prints its header and paths even at verbose=0
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        # Every kept checkpoint forces a snapshot of Tune's (small) experiment state; concurrent trials that report
        # within 5 s of each other make Tune warn that snapshots "may become a bottleneck" on every epoch.
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # An autoscaler's node types (its cluster config, when this driver can read it) decide what can never fit.
    node_types = None if cluster.STARTED_LOCAL_RAY else autoscaler_node_types()
    check_feasible(trial_configs(cfg), autoscaled=not cluster.STARTED_LOCAL_RAY, node_types=node_types,
                   rule_for=cfg.rule_for)
    trainable = _trainable(cfg, data_ref, exp, group, launchable_types(node_types))
    tune_uri = join_uri(exp.tune_storage(group), TUNE)
    if resume and tune.Tuner.can_restore(tune_uri):
        # Tune restores the param_space it saved: rebuilding it from today's TrainConfig would fail the restore
        # (Tune checks the keys) whenever TrainConfig gained a field since the sweep started.
        tuner = tune.Tuner.restore(tune_uri, trainable=trainable, resume_errored=True)
    else:
        running = concurrency(cfg)
        guard = BudgetGuard()  # one object: Tune's stopper and a callback
        # Synchronous successive halving pauses trials, which a searcher counts as live until they finish: the
        # scheduler caps how many run at once, and the searcher may propose every trial of the bracket.
        tuner = tune.Tuner(
            trainable, param_space=param_space(cfg),
            tune_config=tune.TuneConfig(metric=cfg.metric, mode=cfg.mode,
                                        scheduler=make_scheduler(cfg, max_running=running),
                                        num_samples=cfg.num_samples,
                                        search_alg=make_searcher(cfg, None if cfg.asha.synchronous else running),
                                        trial_dirname_creator=_trial_dirname, reuse_actors=reuses_actors(cfg)),
            run_config=tune.RunConfig(name=TUNE, storage_path=exp.tune_storage(group), verbose=int(verbose),
                                      failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                      # PBT: an exploit restores from another trial's latest checkpoint, which
                                      # keeping one per trial by val_acc may have deleted; trial_row prunes later.
                                      checkpoint_config=tune.CheckpointConfig(
                                          **(CHECKPOINT_KEEP if cfg.keep_checkpoints == "best" and
                                             cfg.scheduler != "pbt" else KEEP_ALL)),
                                      stop=guard,
                                      callbacks=[EpochLines(), footprint.ReleaseStopped(exp), guard,
                                                 *tune_callbacks(cfg.wandb, cfg.wandb_project, exp)]))
    try:
        with budget.arm(deadline):
            tuner.fit()
    finally:  # every stopped trial's placement group and resource request, so the cluster can scale down
        footprint.release_quietly(exp, wait_s=30)
        if deadline is not None:
            budget.record_deadline(exp, deadline)
    return collect_trials(exp, cfg, group)


def policy_epochs(keep: str | dict, epochs: list[int]) -> set[int]:
    """The library epochs a ``keep_checkpoints`` policy adds to a trial's best and latest (none for ``best``)."""
    if keep == "best" or not epochs:
        return set()
    (kind, n), = keep.items()
    return set(sorted(epochs)[-n:]) if kind == "last_k" else {e for e in epochs if e % n == 0}


def trial_row(exp: Experiment, trial_id: str, group: str = "", max_t: int | None = None,
              keep: str | dict = "best", final: bool = False, budget_cut: bool = False) -> tuple[dict, list[dict]]:
    """One trial's summary from its history and its best checkpoint (chosen by ``fer_ray.loop.best_entry``), and
    its checkpoint-library members (``library_rows``); checkpoints outside the library are deleted here.

    ``final`` (population-based training): the trial is its latest checkpoint, scored by its last epoch, since its
    earlier epochs may be another trial's (an exploit copies the donor's history); ``mutations`` lists the exploit
    steps of its lineage (JSON, ``[]`` without). ``budget_cut``: the time limit stopped the trial before its
    scheduler would have (``budget.json``); its numbers are those of its completed epochs."""
    checkpoints = exp.checkpoints(trial_id, group)
    if not checkpoints:
        raise FileNotFoundError(f"{exp.uri}: trial {trial_id} has a history but no checkpoint")
    # An epoch whose checkpoint never reached storage (the process died, or a stopped DDP trial's rank 0 began the
    # next epoch's report, in between) does not count; history.json is rewritten so every file agrees.
    written = exp.history(trial_id, group)
    history = [h for h in written if h["epoch"] <= max(checkpoints)]
    if len(history) < len(written):
        exp.write_history(trial_id, history, group)
    exp.write_metrics(trial_id, pd.DataFrame(history), group)
    best = history[-1] if final else best_entry(history)
    if best["epoch"] not in checkpoints:
        raise FileNotFoundError(f"{exp.uri}: trial {trial_id} has no checkpoint of its best epoch {best['epoch']} "
                                f"(kept: {sorted(checkpoints)})")
    if keep != "best" or final:
        wanted = {best["epoch"]} if final else policy_epochs(keep, [h["epoch"] for h in history]) | {
            best["epoch"], max(checkpoints)}
        # A checkpoint folder Tune reused (PBT) holds a wanted file beside an unwanted one: keep that folder.
        keep_dirs = {posixpath.dirname(checkpoints[e]) for e in wanted if e in checkpoints}
        for epoch in [e for e in checkpoints if e not in wanted]:
            location = checkpoints.pop(epoch)
            if posixpath.dirname(location) not in keep_dirs:
                exp.delete_checkpoint(location)
    location = checkpoints[best["epoch"]]
    ckpt = load_checkpoint(location)
    train_cfg = ckpt["config"]
    tc = TrainConfig.from_dict(train_cfg, "train")
    profile = checkpoint_profile(ckpt)  # recorded by training; counted on the rebuilt model for older checkpoints
    row = {"trial_id": trial_id, "arch": tc.model, "img_size": profile["img_size"], "in_chans": profile["in_chans"],
           "params": profile["params"], "gmacs": profile["gmacs"], "best_val_acc": best["val_acc"],
           "best_epoch": best["epoch"], "epochs_run": len(history),
           "stopped_early": len(history) < min(tc.epochs, max_t or tc.epochs), "budget_cut": budget_cut,
           "checkpoint": location,
           "config": json.dumps(train_cfg, sort_keys=True),
           "mutations": json.dumps(ckpt.get("mutations", []))}  # population-based training's exploit steps
    row |= where_trained(history)  # the node (and GPU type) its last epoch trained on
    return row, library_rows(row, history, checkpoints, keep)


def library_rows(row: dict, history: list[dict], kept: dict[int, str], keep: str | dict) -> list[dict]:
    """A trial's checkpoint-library members: each library epoch other than the best (``<trial>@eNNN``) and, when
    the trial trained EMA weights, their EMA copies (``<trial>@eNNN-ema``; with ``keep: best``, the kept epoch whose
    EMA scored best on val)."""
    by_epoch = {h["epoch"]: h for h in history}
    library = policy_epochs(keep, list(kept))
    out = [row | {"trial_id": f"{row['trial_id']}@e{e:03d}", "parent": row["trial_id"], "weights": "raw",
                  "kind": "snapshot", "checkpoint": kept[e], "best_val_acc": by_epoch[e]["val_acc"], "best_epoch": e}
           for e in sorted(library - {row["best_epoch"]})]
    if all("val_acc_ema" in by_epoch.get(e, {}) for e in kept):
        ema = library | {row["best_epoch"]} if library else {max(kept, key=lambda e: by_epoch[e]["val_acc_ema"])}
        out += [row | {"trial_id": f"{row['trial_id']}@e{e:03d}-ema", "parent": row["trial_id"], "weights": "ema",
                       "kind": "ema", "checkpoint": kept[e], "best_val_acc": by_epoch[e]["val_acc_ema"],
                       "best_epoch": e} for e in sorted(ema)]
    return out


def collect_trials(exp: Experiment | str, cfg: SweepConfig | None = None, group: str = "") -> pd.DataFrame:
    """Summarise every trial of ``group`` (``trial_row``); the sweep's own trials also go to ``trials.parquet``
    and their checkpoint-library members to ``library.parquet``."""
    exp = as_experiment(exp)
    cfg = cfg or exp.sweep()
    rows, library, pbt = [], [], cfg.scheduler == "pbt"
    cut = (exp.budget() or {}).get("cut_trials", {}) if not group else {}
    for t in exp.trial_ids(group):
        row, lib = trial_row(exp, t, group, None if pbt else cfg.asha.max_t, cfg.keep_checkpoints, final=pbt,
                             budget_cut=t in cut)
        rows.append(row)
        library += lib
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values("best_val_acc", ascending=False).reset_index(drop=True)
    if not group:
        exp.write_trials(df)
        exp.write_library(pd.DataFrame(library))
    return df
