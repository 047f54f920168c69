"""The Ray Train layer: ``train_loop_per_worker`` (DDP on gloo/nccl) and ``fit`` (one TorchTrainer run).

The dataset lives once in Ray's object store (``put_dataset``); every worker of every trial reads the same
object. Each epoch every rank reports train/val metrics; rank 0 first writes a self-describing checkpoint
into the run's trial directory, so a restarted worker group or a retried trial resumes from its last epoch.
Single-worker runs may use Ray Train's local mode (``num_workers=0``: the loop runs in-process).
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from fer_ray import engine
from fer_ray.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from fer_ray.config import DataConfig, TrainConfig
from fer_ray.data import FERData, load_data, split_indices
from fer_ray.data.augment import Augment, Preprocess
from fer_ray.gpu import preflight
from fer_ray.models import create_model
from fer_ray.placement import cap_batch_size

log = logging.getLogger(__name__)
_IMPORTED_AT = time.time()  # this module and its dependencies (torch, ray.train, timm, kornia) imported


def init_ray(num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Connect to ``RAY_ADDRESS`` when set (a cluster, ``ray job submit``), else start a local Ray on 127.0.0.1."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    ray.init(num_cpus=num_cpus or os.cpu_count(), num_gpus=num_gpus, include_dashboard=True,
             dashboard_host="127.0.0.1", log_to_driver=True)
    # The Train placement-group cleaner and later clients look the cluster up through RAY_ADDRESS.
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def prepare_dataset(data_cfg: DataConfig) -> tuple[FERData, dict[str, np.ndarray]]:
    """Load (or draw) the dataset once and carve the run splits."""
    data = load_data(data_cfg)
    groups = None
    if data_cfg.group_duplicates:
        from fer_ray.data.quality import exact_groups

        groups = exact_groups(data)
    return data, split_indices(data, data_cfg.val_fraction, data_cfg.split_seed, groups=groups)


def put_dataset(data: FERData, splits: dict[str, np.ndarray],
                teacher_logits: np.ndarray | None = None) -> ray.ObjectRef:
    """One object-store copy of the arrays and split indices, shared zero-copy by all trials and workers.

    ``teacher_logits``: optional float32 ``[len(splits["train"]), C]`` for distillation (``fer_ray.distill``).
    """
    extra = {} if teacher_logits is None else {"teacher_logits": np.asarray(teacher_logits, dtype=np.float32)}
    return ray.put({**data.to_arrays(), "splits": splits, **extra})


def _split_tensors(arrays: dict, device: torch.device) -> dict[str, tuple[engine.IndexedImages, torch.Tensor]]:
    """Each split as (images view, labels) on ``device``, without copying the images per split.

    On CPU the view indexes the object store's read-only array in place (zero-copy: every trial and worker maps
    the same pages); on a GPU the full array is uploaded once and both splits index it there.
    """
    with warnings.catch_warnings():  # read-only object-store memory: nothing here writes to it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        base = torch.from_numpy(arrays["images"]).to(device)
    labels = torch.from_numpy(arrays["labels"].astype(np.int64))
    out = {}
    for split in ("train", "val"):
        idx = torch.from_numpy(np.asarray(arrays["splits"][split], dtype=np.int64))
        out[split] = engine.IndexedImages(base, idx), labels[idx].to(device)
    return out


def build_model(cfg: TrainConfig) -> torch.nn.Module:
    return create_model(cfg.model, num_classes=7, in_chans=cfg.in_chans, img_size=cfg.img_size,
                        drop_rate=cfg.drop_rate, pretrained=cfg.pretrained or None, **cfg.model_kwargs)


def _report(metrics: dict, in_tune_local: bool) -> None:
    if in_tune_local:
        from ray import tune

        tune.report(metrics)
    else:
        ray.train.report(metrics)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker entry point. ``config``: ``train`` (TrainConfig dict), ``data_ref``, ``trial_dir``."""
    t_entry = time.time()
    cfg = TrainConfig.from_dict(config["train"], "train")
    arrays = ray.get(config["data_ref"]) if isinstance(config["data_ref"], ray.ObjectRef) else config["data_ref"]
    local = cfg.num_workers == 0
    if local:  # in-process: ray.train's context API is unavailable inside a Tune trial
        rank, world = 0, 1
    else:
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if not local else torch.device("cuda" if cfg.use_gpu else "cpu")
    preflight(device)
    cfg = cap_batch_size(cfg, config.get("batch_size_cap"), device, world)
    if device.type == "cpu" and local:
        torch.set_num_threads(max(1, round(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)

    model = build_model(cfg)
    fer_cfg = model.fer_cfg
    preprocess, augment = Preprocess.for_model(fer_cfg).to(device), Augment(cfg.augment).to(device)
    model = model.to(device, memory_format=torch.channels_last)
    ckpt_dir = Path(config["trial_dir"]) / "checkpoints"
    module = model
    latest = latest_checkpoint(ckpt_dir)
    done = int(latest.stem.split("_")[1]) if latest else 0
    model, optimizer, scheduler = _phase(module, cfg, world, frozen=done < cfg.freeze_epochs)
    start, history = _resume(ckpt_dir, module, optimizer, scheduler)
    scaler = torch.amp.GradScaler() if engine.autocast_dtype(cfg, device) == torch.float16 else None
    (train_x, train_y), (val_x, val_y) = _split_tensors(arrays, device).values()
    loss_fn = engine.LossFn(cfg, train_y)
    teacher = arrays.get("teacher_logits")
    if cfg.distill_alpha > 0 and teacher is None:
        raise ValueError("distill_alpha > 0 needs teacher_logits in the shared dataset (use `fer-ray distill`)")
    teacher = torch.from_numpy(np.array(teacher, dtype=np.float32)).to(device) if teacher is not None else None
    run_config = dict(cfg.to_dict(), img_size=fer_cfg["img_size"], in_chans=fer_cfg["in_chans"])
    startup = _startup_profile(config.get("t_start", t_entry), t_entry)

    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        if cfg.freeze_epochs and epoch == cfg.freeze_epochs:  # phase 2: unfreeze, re-wrap DDP, new optimizer
            model, optimizer, scheduler = _phase(module, cfg, world, frozen=False)
        metrics = engine.train_one_epoch(model, train_x, train_y, optimizer, preprocess, augment, cfg, epoch,
                                         rank=rank, world_size=world, scaler=scaler, loss_fn=loss_fn,
                                         teacher=teacher)
        metrics |= engine.evaluate(model, val_x, val_y, preprocess, cfg, rank=rank, world_size=world)
        metrics |= {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "epoch_time_s": time.perf_counter() - t0,
                    "finished_at": time.time(), "img_size": fer_cfg["img_size"], "world_size": world, **startup}
        if scheduler is not None:
            scheduler.step(metrics["val_acc"]) if cfg.scheduler == "plateau" else scheduler.step()
        history.append({k: v for k, v in metrics.items() if isinstance(v, int | float)})
        best = max(history, key=lambda h: h["val_acc"])
        metrics |= {"best_val_acc": best["val_acc"], "best_epoch": best["epoch"]}
        ckpt_path = ckpt_dir / f"epoch_{epoch + 1:03d}.pt"
        if rank == 0:
            save_checkpoint(ckpt_dir, epoch + 1, model, run_config, {"history": history, **history[-1]},
                            optimizer.state_dict(), scheduler.state_dict() if scheduler else None,
                            keep={best["epoch"], epoch + 1})
            _write_json(Path(config["trial_dir"]) / "history.json", history)
            print(f"[{Path(config['trial_dir']).name}] epoch {epoch + 1}/{cfg.epochs} {cfg.model}@{fer_cfg['img_size']}"
                  f" train_loss {metrics['train_loss']:.4f} val_loss {metrics['val_loss']:.4f}"
                  f" val_acc {metrics['val_acc']:.4f} ({metrics['epoch_time_s']:.1f}s)", flush=True)
        _maybe_fail(config, epoch + 1, rank)
        metrics["checkpoint"] = str(ckpt_dir / f"epoch_{best['epoch']:03d}.pt")
        metrics["last_checkpoint"] = str(ckpt_path)
        _report(metrics, in_tune_local=local and config.get("in_tune", False))
        if cfg.early_stopping and epoch + 1 - best["epoch"] >= cfg.early_stopping:
            break


def _startup_profile(t_start: float, t_entry: float) -> dict[str, float]:
    """Trial/run start → first batch (``startup_s``), split into the phases of this worker process: ``spawn``
    (until the process began importing fer_ray: Ray starting the controller and worker processes), ``import``
    (fer_ray.train and its dependencies), ``setup`` (until Ray Train called the loop: process group, etc.) and
    ``loop`` (the loop's own set-up: data, model, optimizer). Imports done before ``t_start`` count as zero."""
    import fer_ray

    now = time.time()
    imp0, imp1 = max(fer_ray.IMPORTED_AT, t_start), max(_IMPORTED_AT, t_start)
    return {"startup_s": now - t_start, "startup_spawn_s": imp0 - t_start, "startup_import_s": imp1 - imp0,
            "startup_setup_s": t_entry - imp1, "startup_loop_s": now - t_entry}


def _phase(module: torch.nn.Module, cfg: TrainConfig, world: int, frozen: bool):
    """(Re)build the trainable view of ``module`` for a freeze phase: DDP wrapper, optimizer and scheduler.

    DDP only synchronises parameters that required grad when it was built, so each phase wraps anew.
    """
    if cfg.freeze_epochs and not engine.set_backbone_frozen(module, frozen):
        raise ValueError(f"freeze_epochs needs a model with freeze_backbone(); {cfg.model} has none")
    model = ray.train.torch.prepare_model(module, move_to_device=False) if world > 1 else module
    optimizer = engine.build_optimizer(cfg, [p for p in module.parameters() if p.requires_grad])
    scheduler = engine.build_scheduler(cfg, optimizer)
    return model, optimizer, scheduler


def _maybe_fail(config: dict, epoch: int, rank: int) -> None:
    """Fault injection for the fault-tolerance tests: ``config["fail_after_epoch"] = N`` kills rank 0's process
    once, right after epoch N's checkpoint is written (a marker file makes the retry run through)."""
    if rank != 0 or config.get("fail_after_epoch") != epoch:
        return
    marker = Path(config["trial_dir"]) / f".failed_after_{epoch}"
    if not marker.exists():
        marker.touch()
        os._exit(1)


def _resume(ckpt_dir: Path, model, optimizer, scheduler) -> tuple[int, list[dict]]:
    path = latest_checkpoint(ckpt_dir)
    if path is None:
        return 0, []
    ckpt = load_checkpoint(path)
    module = model.module if hasattr(model, "module") else model
    module.load_state_dict(ckpt["state_dict"])
    if ckpt.get("optimizer"):
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler"):
        scheduler.load_state_dict(ckpt["scheduler"])
    log.warning("resuming from %s (epoch %d)", path, ckpt["epoch"])
    return ckpt["epoch"], list(ckpt["metrics"].get("history", []))


def _write_json(path: Path, obj) -> None:
    from fer_ray.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1))


def scaling_config(cfg: TrainConfig) -> ray.train.ScalingConfig:
    """Workers, their CPUs/GPU and (``cfg.accelerator_type``) the one GPU type they all run on."""
    return ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                   resources_per_worker={"CPU": cfg.cpus_per_worker,
                                                         **({"GPU": 1} if cfg.use_gpu else {})},
                                   accelerator_type=cfg.accelerator_type)


def make_trainer(cfg: TrainConfig, data_ref, trial_dir: str | Path, storage_path: str | Path, name: str,
                 callbacks: list | None = None, in_tune: bool = False, max_failures: int = 1,
                 batch_size_cap: dict[str, int] | None = None):
    """A TorchTrainer for one run; ``cfg.num_workers == 0`` selects Ray Train's in-process local mode.

    ``batch_size_cap``: accelerator type → largest per-GPU batch (``fer_ray.placement.cap_batch_size``).
    """
    scaling = scaling_config(cfg)
    run = ray.train.RunConfig(name=name, storage_path=str(Path(storage_path).absolute()),
                              callbacks=callbacks or None,
                              failure_config=ray.train.FailureConfig(max_failures=max_failures))
    loop_config = {"train": cfg.to_dict(), "data_ref": data_ref, "trial_dir": str(Path(trial_dir).absolute()),
                   "in_tune": in_tune, "t_start": time.time(), "batch_size_cap": batch_size_cap or {}}
    return ray.train.torch.TorchTrainer(train_loop_per_worker, train_loop_config=loop_config, scaling_config=scaling,
                                        run_config=run)
