"""The Ray Train layer: ``train_loop_per_worker`` runs ``fer_ray.loop.TrainingRun`` on each DDP worker (gloo on CPU,
nccl on GPU) and ``make_trainer`` builds the ``TorchTrainer`` of one run, in the Ray session ``fer_ray.cluster``
owns.

The dataset lives once in Ray's object store (``fer_ray.cluster.put_dataset``); every worker of every trial reads
the same object. Checkpoints go through Ray's own persistence: each epoch rank 0 hands a self-describing checkpoint
to ``ray.train.report`` (``RayReport``), Ray Train uploads it into the experiment's storage (a path, NFS or a
bucket: ``fer_ray.experiment``) and prunes with ``CheckpointConfig`` (best by ``val_acc`` + latest); a retried
worker group, a retried or unpaused trial and ``fer-ray sweep --resume`` continue from
``ray.train.get_checkpoint()``. No worker reads or writes the driver's disk. Single-worker runs may use Ray Train's
local mode (``num_workers=0``: the loop runs in the Tune trial's process, which reports and checkpoints through
Tune instead).
"""

from __future__ import annotations

import logging
import os
import posixpath
import tempfile
import time

import ray
import ray.train
import ray.train.torch
import torch

from fer_ray.checkpoint import resumable_ray_checkpoint, write_checkpoint
from fer_ray.config import TrainConfig
from fer_ray.experiment import Experiment
from fer_ray.gpu import preflight
from fer_ray.loop import EMA, EarlyStopping, Hook, TrainingRun, build_model  # noqa: F401  (build_model re-exported)
from fer_ray.placement import cap_batch_size

log = logging.getLogger(__name__)
_IMPORTED_AT = time.time()  # this module and its dependencies (torch, ray.train, timm, kornia) imported


CHECKPOINT_KEEP = {"num_to_keep": 1, "checkpoint_score_attribute": "val_acc", "checkpoint_score_order": "max"}
"""Ray keeps each run's best checkpoint by ``val_acc`` (the later one on ties) and, always, its latest."""
KEEP_ALL = {"num_to_keep": None}
"""A checkpoint library (``SweepConfig.keep_checkpoints``): Ray keeps every epoch; fer_ray prunes to the library's
epochs when the trial is collected (``fer_ray.sweep.trial_row``)."""


class RayReport(Hook):
    """Each epoch: rank 0 writes the checkpoint (``epoch_NNN.pt`` + sha256 manifest) into a temp folder; every rank
    reports (a barrier), rank 0 with ``Checkpoint.from_directory`` so Ray persists it into the experiment's storage
    (``CheckpointConfig`` keeps the best by ``val_acc`` and the latest). Rank 0 first writes ``history.json`` there
    (a history may run one epoch ahead of the checkpoints if the process dies or the trial is stopped in between;
    ``fer_ray.sweep.trial_row`` cuts it back to the latest checkpoint). In-process trials inside Tune report to Tune,
    which persists their checkpoints the same way."""

    def __init__(self, config: dict, in_tune_local: bool):
        self.exp = Experiment(config["experiment"])
        self.trial_id, self.group, self.in_tune_local = config["trial_id"], config.get("group", ""), in_tune_local

    def after_epoch(self, run: TrainingRun, metrics: dict) -> None:
        from ray.train import Checkpoint

        if run.rank == 0:  # before reporting: Tune may stop the trial inside report at its last epoch
            self.exp.write_history(self.trial_id, run.history, self.group)
        with tempfile.TemporaryDirectory(prefix="fer_ray_ckpt_") as tmp:
            checkpoint = None
            if run.rank == 0:
                write_checkpoint(tmp, run.state_dict())
                checkpoint = Checkpoint.from_directory(tmp)
            if self.in_tune_local:
                from ray import tune

                tune.report(metrics, checkpoint=checkpoint)
            else:
                ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{run.epoch:03d}")


class FaultInjection(Hook):
    """For the fault-tolerance tests: ``config["fail_after_epoch"] = N`` kills rank 0's process once, right after
    Ray Train has registered epoch N's checkpoint (a crash after a committed epoch; a marker file in the experiment
    makes the retry run through)."""

    def __init__(self, config: dict):
        self.epoch, self.exp = config.get("fail_after_epoch"), Experiment(config["experiment"])
        self.marker = self.exp.marker(config["trial_id"], f".failed_after_{self.epoch}", config.get("group", ""))

    def after_epoch(self, run: TrainingRun, metrics: dict) -> None:
        if run.rank == 0 and run.epoch == self.epoch and not self.exp.exists(self.marker):
            if run.world > 1:
                ray.train.get_all_reported_checkpoints(timeout_s=120)  # blocks until every report is processed
            self.exp.write_text(self.marker, "")
            os._exit(1)


def _restore(run: TrainingRun, in_tune_local: bool, trial_id: str = "") -> None:
    """Continue from the latest checkpoint Ray hands this run (a retry, a resumed sweep, an unpaused trial, or, under
    population-based training, another trial's checkpoint: recorded as a mutation, ``mutations_since``)."""
    if in_tune_local:
        from ray import tune

        checkpoint = tune.get_checkpoint()
    else:
        checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return
    payload, location, refused = resumable_ray_checkpoint(checkpoint)
    for line in refused:
        log.warning("not resuming from an incomplete checkpoint: %s", line)
    if payload is None:
        log.warning("no complete checkpoint to resume from in %s: this run starts over from epoch 0",
                    posixpath.dirname(str(checkpoint.path).rstrip("/")))
        return
    run.load_state_dict(payload)
    # Tune keeps a trial's checkpoints in its own folder, named after the trial id (fer_ray.sweep._trial_dirname).
    donor = posixpath.basename(posixpath.dirname(location.rstrip("/")))
    run.extra_state["mutations"] = mutations_since(payload, run.cfg.to_dict(), donor, trial_id, run.epoch)
    log.warning("resuming from %s (epoch %d)", location, run.epoch)


def mutations_since(payload: dict, config: dict, donor: str, trial_id: str, epoch: int) -> list[dict]:
    """The exploit/explore steps of a run's lineage: the checkpoint's, plus one when the checkpoint is another trial's
    (``donor``): ``{"epoch", "from", "config"}`` with the train fields that differ from the donor's config."""
    mutations = list(payload.get("mutations", []))
    if trial_id and donor and donor != trial_id:
        before = _leaves(payload.get("config", {}))
        # Fields left unset (None) are resolved in the checkpoint's config (in_chans from the model): not mutations.
        changed = {k: v for k, v in _leaves(config).items() if v is not None and before.get(k) != v}
        mutations.append({"epoch": epoch, "from": donor, "config": changed})
    return mutations


def _leaves(d: dict, prefix: str = "") -> dict:
    """A nested dict's leaves by dotted path."""
    out = {}
    for k, v in d.items():
        out |= _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker entry point. ``config``: ``train`` (TrainConfig dict), ``data_ref``, ``experiment`` (its
    location), ``trial_id``, ``group``, ``in_tune``, ``t_start``, ``batch_size_cap``."""
    t_entry = time.time()
    cfg = TrainConfig.from_dict(config["train"], "train")
    arrays = ray.get(config["data_ref"]) if isinstance(config["data_ref"], ray.ObjectRef) else config["data_ref"]
    local = cfg.num_workers == 0
    if local:  # in-process: ray.train's context API is unavailable inside a Tune trial
        rank, world = 0, 1
        # As Ray Train picks a DDP worker's device: a GPU only where CUDA is (a logical GPU places, never trains).
        device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
    else:
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        device = ray.train.torch.get_device()
    preflight(device)
    cfg = cap_batch_size(cfg, config.get("batch_size_cap"), device, world)
    if device.type == "cpu" and local:
        torch.set_num_threads(max(1, round(cfg.cpus_per_worker)))
    wrap = (lambda m: ray.train.torch.prepare_model(m, move_to_device=False)) if world > 1 else None
    run = TrainingRun(cfg, arrays, device, rank=rank, world=world, wrap=wrap)
    in_tune_local = local and config.get("in_tune", False)
    _restore(run, in_tune_local, config.get("trial_id", "") if in_tune_local else "")
    hooks = [StartupProfile(config.get("t_start", t_entry), t_entry), WhereTrained(), RayReport(config, in_tune_local),
             EarlyStopping(cfg.early_stopping)]
    if cfg.ema.decay:  # before the report: its metrics and weights go into this epoch's checkpoint
        hooks.insert(1, EMA(cfg.ema.decay, cfg.ema.warmup))
    if config.get("fail_after_epoch"):
        report = next(i for i, h in enumerate(hooks) if isinstance(h, RayReport))
        hooks.insert(report + 1, FaultInjection(config))  # right after the epoch is checkpointed and reported
    run.fit(hooks)


class StartupProfile(Hook):
    """Adds to every epoch's metrics how long the run took from its start to its first batch (``startup_s``),
    split into the phases of this worker process: ``spawn`` (until the process began importing fer_ray: Ray
    starting the controller and worker processes), ``import`` (fer_ray.train and its dependencies), ``setup``
    (until Ray Train called the loop: process group, etc.) and ``loop`` (the loop's own set-up: data, model,
    optimizer, restore). Imports done before ``t_start`` count as zero."""

    def __init__(self, t_start: float, t_entry: float):
        self.t_start, self.t_entry = t_start, t_entry

    def before_train(self, run: TrainingRun) -> None:
        import fer_ray

        now = time.time()
        imp0, imp1 = max(fer_ray.IMPORTED_AT, self.t_start), max(_IMPORTED_AT, self.t_start)
        run.static_metrics |= {"startup_s": now - self.t_start, "startup_spawn_s": imp0 - self.t_start,
                               "startup_import_s": imp1 - imp0, "startup_setup_s": self.t_entry - imp1,
                               "startup_loop_s": now - self.t_entry}


WHERE_COLUMNS = ("node_id", "node_ip", "accelerator_type")
"""Where a run trained, as ``WhereTrained`` records it in every history entry and ``trials.parquet`` shows it."""


class WhereTrained(Hook):
    """Rank 0 records where the run trains in ``static_metrics`` (``WHERE_COLUMNS``: the Ray node's id and IP and
    its ``accelerator_type:<X>`` resource, absent on a CPU node), so every epoch's history entry says where that
    epoch was trained; a run resumed on another node records the new one."""

    def before_train(self, run: TrainingRun) -> None:
        if run.rank == 0:
            run.static_metrics |= node_info()


def node_info() -> dict:
    """This process's Ray node: ``node_id``, ``node_ip`` and, on a GPU node, ``accelerator_type``."""
    from fer_ray.placement import node_accelerator

    node_id = ray.get_runtime_context().get_node_id()
    resources = next((n["Resources"] for n in ray.nodes() if n["NodeID"] == node_id), {})
    info = {"node_id": node_id, "node_ip": ray.util.get_node_ip_address(),
            "accelerator_type": node_accelerator(resources)}
    return {k: v for k, v in info.items() if v is not None}


def where_trained(history: list[dict]) -> dict:
    """``WHERE_COLUMNS`` of a run's last history entry (where it finished), ``None`` for what it lacks (a CPU node's
    type; histories written before fer_ray recorded them)."""
    last = history[-1] if history else {}
    return {k: last.get(k) for k in WHERE_COLUMNS}


def scaling_config(cfg: TrainConfig) -> ray.train.ScalingConfig:
    """Workers, their CPUs/GPU and (``cfg.accelerator_type``) the one GPU type they all run on."""
    return ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                   resources_per_worker={"CPU": cfg.cpus_per_worker,
                                                         **({"GPU": cfg.gpu_fraction} if cfg.use_gpu else {})},
                                   accelerator_type=cfg.accelerator_type)


def make_trainer(cfg: TrainConfig, data_ref, exp: Experiment | str, trial_id: str, group: str = "",
                 callbacks: list | None = None, in_tune: bool = False, max_failures: int = 1,
                 batch_size_cap: dict[str, int] | None = None, keep_all: bool = False):
    """The TorchTrainer of run ``trial_id`` of ``exp`` (its Ray Train run ``<group>/train/train_<trial_id>``);
    ``cfg.num_workers == 0`` selects Ray Train's in-process local mode. Built again with the same arguments, it
    resumes from the run's latest checkpoint (Ray Train V2 restores a run by storage path and name).

    ``batch_size_cap``: accelerator type → largest per-GPU batch (``fer_ray.placement.cap_batch_size``);
    ``keep_all``: keep every epoch's checkpoint (a checkpoint library) instead of the best and the latest.
    """
    exp = exp if isinstance(exp, Experiment) else Experiment(exp)
    if cfg.num_workers > 0:  # the controller records its placement group and resource request (fer_ray.footprint)
        from fer_ray.footprint import FootprintCallback

        callbacks = [*(callbacks or []), FootprintCallback(exp, trial_id, group)]
    keep = ray.train.CheckpointConfig(**(KEEP_ALL if keep_all else CHECKPOINT_KEEP))
    run = ray.train.RunConfig(name=f"train_{trial_id}", storage_path=exp.train_storage(group),
                              callbacks=callbacks or None, checkpoint_config=keep,
                              failure_config=ray.train.FailureConfig(max_failures=max_failures))
    loop_config = {"train": cfg.to_dict(), "data_ref": data_ref, "experiment": exp.uri, "trial_id": trial_id,
                   "group": group, "in_tune": in_tune, "t_start": time.time(), "batch_size_cap": batch_size_cap or {}}
    return ray.train.torch.TorchTrainer(train_loop_per_worker, train_loop_config=loop_config,
                                        scaling_config=scaling_config(cfg), run_config=run)
