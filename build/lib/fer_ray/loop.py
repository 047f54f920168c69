"""The training loop without Ray: ``TrainingRun`` (set-up, one epoch at a time, its whole state to and from a
checkpoint payload) and ``Hook`` (before training, after every optimizer step, after each epoch, after training:
detectron2's ``HookBase``), with the hooks that need no Ray: ``EarlyStopping`` and ``EMA`` (averaged weights).

``fer_ray.train`` runs it under Ray Train with hooks that checkpoint and report, stop early and inject faults (for
the tests); ``scripts/gpu_check.py`` and the benchmarks run it bare. The state after ``epoch`` epochs (weights,
optimizer, LR scheduler, GradScaler, history, freeze phase) is one ``state_dict()``, and ``load_state_dict`` puts
it back exactly: with every random draw of an epoch seeded from (seed, epoch, rank) (``engine.seed_epoch``), a run
resumed at any epoch, the unfreeze epoch of the two-phase recipe included, continues as the uninterrupted one.
Set-up also counts the model's size and compute once, on rank 0 (``profile``: parameters, GMACs by fvcore when
it is installed), and every checkpoint carries them, so collecting a trial (``fer_ray.sweep.trial_row``) never
rebuilds its model.

The speed-recipe levers that change set-up or stepping live here as ``TrainConfig`` fields, not hooks the caller
must remember: the whitened stem (``whiten``: ``fer_ray.whiten``, before the optimizer sees the parameters),
``compile``, per-step learning-rate schedules (stepped after every optimizer step) and progressive resizing
(``resize_stages``: each epoch's training batches resized on the device; evaluation always at the model's size).
"""

from __future__ import annotations

import logging
import math
import time
import warnings

import numpy as np
import torch

from fer_ray import engine, flops
from fer_ray.checkpoint import make_payload
from fer_ray.config import STEP_SCHEDULERS, TrainConfig
from fer_ray.data.augment import Augment, Preprocess
from fer_ray.models import create_model
from fer_ray.whiten import whiten_stem

log = logging.getLogger(__name__)


class Hook:
    """Something done around the loop; override what you need. ``run.stop = True`` ends training."""

    def before_train(self, run: TrainingRun) -> None:
        pass

    def after_step(self, run: TrainingRun) -> None:
        pass

    def after_epoch(self, run: TrainingRun, metrics: dict) -> None:
        pass

    def after_train(self, run: TrainingRun) -> None:
        pass


class EarlyStopping(Hook):
    """Stop after ``patience`` epochs without a better validation accuracy (``None``: never)."""

    def __init__(self, patience: int | None):
        self.patience = patience

    def after_epoch(self, run: TrainingRun, metrics: dict) -> None:
        if self.patience and run.epoch - metrics["best_epoch"] >= self.patience:
            run.stop = True


class EMA(Hook):
    """EMA weights (timm's ``ModelEmaV3``), updated after every optimizer step, evaluated on val each epoch
    (``val_acc_ema``/``val_loss_ema`` in the metrics and history) and saved in the checkpoint
    (``ema_state_dict``); a resumed run continues from the saved average. Runs on every DDP rank (the ranks hold
    identical weights, and evaluation is a collective)."""

    def __init__(self, decay: float, warmup: bool = False):
        self.decay, self.warmup, self.ema = decay, warmup, None

    def before_train(self, run: TrainingRun) -> None:
        from timm.utils import ModelEmaV3

        self.ema = ModelEmaV3(run.module, decay=self.decay, use_warmup=self.warmup)
        saved = (run.restored or {}).get("ema_state_dict")
        if saved:
            self.ema.module.load_state_dict(saved)

    def after_step(self, run: TrainingRun) -> None:
        self.ema.update(run.module)

    def after_epoch(self, run: TrainingRun, metrics: dict) -> None:
        m = engine.evaluate(self.ema.module, run.val_x, run.val_y, run.preprocess, run.cfg, rank=run.rank,
                            world_size=run.world)
        ema = {"val_acc_ema": m["val_acc"], "val_loss_ema": m["val_loss"]}
        metrics |= ema
        run.history[-1] |= ema
        run.extra_state["ema_state_dict"] = {k: v.detach().cpu() for k, v in self.ema.module.state_dict().items()}


def best_entry(history: list[dict]) -> dict:
    """The epoch a run selects: highest ``val_acc``, the later epoch on ties (as Ray's ``CheckpointConfig`` keeps)."""
    return max(history, key=lambda h: (h["val_acc"], h["epoch"]))


def build_model(cfg: TrainConfig) -> torch.nn.Module:
    """The model of ``cfg``; its ``fer_cfg`` also records how a face becomes its input (``cfg.input``)."""
    model = create_model(cfg.model, num_classes=7, in_chans=cfg.in_chans, img_size=cfg.img_size,
                         drop_rate=cfg.drop_rate, pretrained=cfg.pretrained or None, **cfg.model_kwargs)
    if cfg.input != "resize":
        model.fer_cfg["input"] = cfg.input
    return model


def profile(module: torch.nn.Module) -> dict:
    """``fer_ray.flops.profile_model`` of a freshly built model, on CPU, leaving the random state as it was; a model
    fvcore cannot trace gets NaN GMACs (with a warning) rather than failing the run."""
    with torch.random.fork_rng(devices=[]):
        try:
            return flops.profile_model(module)
        except Exception as e:  # noqa: BLE001  (tracing raises many types)
            log.warning("GMACs of %s not counted (%s: %s)", module.fer_cfg.get("arch"), type(e).__name__, e)
            return {"img_size": module.fer_cfg["img_size"], "in_chans": module.fer_cfg["in_chans"],
                    "params": flops.count_params(module), "gmacs": math.nan}


def split_tensors(arrays: dict, device: torch.device) -> dict[str, tuple[engine.IndexedImages, torch.Tensor]]:
    """Train and val as (images view, labels) on ``device``, without copying the images per split.

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


class TrainingRun:
    """One model trained on ``arrays`` (``images``, ``labels``, ``splits``, optional ``teacher_logits``) on ``device``.

    ``rank``/``world`` shard each epoch for DDP; ``wrap`` turns the model into its DDP wrapper (the Ray layer passes
    ``ray.train.torch.prepare_model``). ``static_metrics`` are merged into every epoch's metrics (the start-up
    profile, where the run trains); the history keeps an epoch's numbers and strings.
    """

    def __init__(self, cfg: TrainConfig, arrays: dict, device: torch.device, *, rank: int = 0, world: int = 1,
                 wrap=None):
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world
        self._wrap = wrap or (lambda m: m)
        torch.manual_seed(cfg.seed)
        module = build_model(cfg)
        self.fer_cfg = module.fer_cfg
        self.profile = profile(module) if rank == 0 else {}
        """The model's size and compute (``fer_ray.flops.profile_model``), counted once on rank 0 when it is built and
        recorded in every checkpoint (``profile``) for ``fer_ray.sweep.trial_row``; empty on the other ranks."""
        self.module = module.to(device, memory_format=torch.channels_last)
        self.preprocess = Preprocess.for_model(self.fer_cfg).to(device)
        self.augment = Augment(cfg.augment, crop=self.fer_cfg["img_size"] if cfg.input == "center_crop" else 0)
        self.augment = self.augment.to(device)
        self.amp_dtype = engine.autocast_dtype(cfg, device)
        self.scaler = engine.grad_scaler(device, self.amp_dtype)
        splits = split_tensors(arrays, device)
        (self.train_x, self.train_y), (self.val_x, self.val_y) = splits["train"], splits["val"]
        self.loss_fn = engine.LossFn(cfg, self.train_y)
        teacher = arrays.get("teacher_logits")
        if cfg.distill_alpha > 0 and teacher is None:
            raise ValueError("distill_alpha > 0 needs teacher_logits in the shared dataset (use `fer-ray distill`)")
        self.teacher = None if teacher is None else torch.from_numpy(np.array(teacher, dtype=np.float32)).to(device)
        if cfg.resize_stages and cfg.resize_stages[-1][1] != self.fer_cfg["img_size"]:
            raise ValueError(f"resize_stages: the last stage's size ({cfg.resize_stages[-1][1]}) must be the model's "
                             f"input size ({self.fer_cfg['img_size']}): evaluation runs at it")
        self._stage_preprocess: dict[int, Preprocess] = {}
        if cfg.whiten.enabled:  # before the optimizer and DDP see which parameters train
            whiten_stem(self.module, self.train_x, self.preprocess, cfg.whiten, seed=cfg.seed)
        self.run_config = dict(cfg.to_dict(), img_size=self.fer_cfg["img_size"], in_chans=self.fer_cfg["in_chans"])
        self.epoch, self.history, self.stop, self.static_metrics = 0, [], False, {}
        self.hooks: list[Hook] = []
        self.extra_state: dict = {}
        """What hooks add to the checkpoint payload (``EMA``: ``ema_state_dict``)."""
        self.restored: dict | None = None
        """The payload this run continued from (``load_state_dict``), for hooks to restore their own state."""
        self._set_phase(frozen=cfg.freeze_epochs > 0)

    def _set_phase(self, frozen: bool) -> None:
        """(Re)build the trainable view for a freeze phase: DDP wrapper, optimizer and scheduler. DDP only
        synchronises parameters that required grad when it was built, so each phase wraps anew."""
        cfg = self.cfg
        if cfg.freeze_epochs and not engine.set_backbone_frozen(self.module, frozen):
            raise ValueError(f"freeze_epochs needs a model with freeze_backbone(); {cfg.model} has none")
        self.frozen = frozen
        self.model = self._wrap(self.module)
        if cfg.compile:
            self.model = engine.compile_model(self.model, self.device)
        self.optimizer = engine.build_optimizer(cfg, engine.param_groups(cfg, self.module))
        steps = engine.steps_per_epoch(len(self.train_x), cfg, self.world)
        self.scheduler = engine.build_scheduler(cfg, self.optimizer, steps)

    def train_preprocess(self, epoch: int) -> Preprocess:
        """The preprocessing of ``epoch``'s training batches: the model's, or ``resize_stages``' size for it."""
        size = self.cfg.resize_at(epoch)
        if size is None or size == self.fer_cfg["img_size"]:
            return self.preprocess
        if size not in self._stage_preprocess:
            fer = self.fer_cfg
            self._stage_preprocess[size] = Preprocess(size, fer["in_chans"], tuple(fer["mean"]),
                                                      tuple(fer["std"])).to(self.device)
        return self._stage_preprocess[size]

    def train_epoch(self) -> dict:
        """Train and evaluate one epoch; returns its metrics (also appended to ``history``, with the best so far)."""
        cfg, t0 = self.cfg, time.perf_counter()
        if self.frozen and self.epoch >= cfg.freeze_epochs:  # phase 2: unfreeze, re-wrap DDP, new optimizer
            self._set_phase(frozen=False)
        stepped = [h.after_step for h in self.hooks if type(h).after_step is not Hook.after_step]
        per_step = self.scheduler is not None and cfg.scheduler in STEP_SCHEDULERS
        if per_step:
            stepped.append(lambda _run: self.scheduler.step())
        on_step = (lambda: [step(self) for step in stepped]) if stepped else None
        preprocess = self.train_preprocess(self.epoch)
        metrics = engine.train_one_epoch(self.model, self.train_x, self.train_y, self.optimizer, preprocess,
                                         self.augment, cfg, self.epoch, rank=self.rank, world_size=self.world,
                                         scaler=self.scaler, loss_fn=self.loss_fn, teacher=self.teacher,
                                         on_step=on_step)
        metrics |= engine.evaluate(self.model, self.val_x, self.val_y, self.preprocess, cfg, rank=self.rank,
                                   world_size=self.world)
        self.epoch += 1
        metrics |= {"epoch": self.epoch, "lr": self.optimizer.param_groups[0]["lr"],
                    "epoch_time_s": time.perf_counter() - t0, "finished_at": time.time(),
                    "img_size": self.fer_cfg["img_size"], "world_size": self.world, **self.static_metrics}
        if self.scheduler is not None and not per_step:
            self.scheduler.step(metrics["val_acc"]) if cfg.scheduler == "plateau" else self.scheduler.step()
        self.history.append({k: v for k, v in metrics.items() if isinstance(v, int | float | str)})
        best = best_entry(self.history)
        return metrics | {"best_val_acc": best["val_acc"], "best_epoch": best["epoch"]}

    def fit(self, hooks: list[Hook] = ()) -> list[dict]:
        """Train up to ``cfg.epochs`` (from wherever the run stands), calling ``hooks``; returns the history."""
        self.hooks = list(hooks)
        for hook in hooks:
            hook.before_train(self)
        while self.epoch < self.cfg.epochs and not self.stop:
            metrics = self.train_epoch()
            for hook in hooks:
                hook.after_epoch(self, metrics)
        for hook in hooks:
            hook.after_train(self)
        return self.history

    def state_dict(self) -> dict:
        """The self-describing checkpoint payload of the run as it stands (``fer_ray.checkpoint``)."""
        return make_payload(self.module, self.epoch, self.run_config, {"history": self.history, **self.history[-1]},
                            self.optimizer.state_dict(), self.scheduler.state_dict() if self.scheduler else None,
                            self.scaler.state_dict() if self.scaler else None, frozen=self.frozen, profile=self.profile,
                            **self.extra_state)

    def _carry_on_at(self, fresh: list[tuple[float, float | None]]) -> None:
        """Continue the restored optimizer and schedule at this config's base lr and weight decay. A plain resume
        changes nothing (the checkpoint's are this config's); population-based training hands a trial another
        trial's checkpoint with a mutated lr / weight decay: the schedule goes on where it stood (warm-up, decay or
        plateau cuts kept as a ratio) from the new base."""
        groups = self.optimizer.param_groups
        if len(groups) != len(fresh):
            return
        for group, (base, decay) in zip(groups, fresh, strict=True):
            old_base = group.get("initial_lr", group["lr"])
            if old_base and old_base != base:
                for key in ("lr", "initial_lr", "max_lr", "min_lr"):  # max/min: OneCycleLR's per-group bounds
                    if key in group:
                        group[key] *= base / old_base
            if decay is not None:
                group["weight_decay"] = decay
        for scheduler in [self.scheduler, *getattr(self.scheduler, "_schedulers", [])]:  # SequentialLR's parts
            if hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs = [base for base, _ in fresh]

    def load_state_dict(self, ckpt: dict) -> None:
        """Continue from a payload of ``state_dict``: weights, optimizer, scheduler, GradScaler, history, phase."""
        self.module.load_state_dict(ckpt["state_dict"])
        self.restored = ckpt
        self.epoch, self.history = int(ckpt["epoch"]), list(ckpt["metrics"].get("history", []))
        # The optimizer state belongs to the phase that trained the checkpoint's last epoch; the next
        # ``train_epoch`` switches phase (with a fresh optimizer) exactly where the uninterrupted run did.
        frozen = bool(ckpt.get("frozen", self.cfg.freeze_epochs and self.epoch <= self.cfg.freeze_epochs))
        if frozen != self.frozen:
            self._set_phase(frozen)
        # This config's base lr and weight decay per parameter group, before the checkpoint's replace them.
        fresh = [(g.get("initial_lr", g["lr"]), g.get("weight_decay")) for g in self.optimizer.param_groups]
        if ckpt.get("optimizer"):
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt.get("scheduler"):
            self.scheduler.load_state_dict(ckpt["scheduler"])
        self._carry_on_at(fresh)
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
