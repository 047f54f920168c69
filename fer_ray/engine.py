"""Pure-torch training core: batching, one training epoch, evaluation, optimiser and scheduler factories
(parameter groups, Nesterov SGD with decoupled weight decay, Lookahead, per-step schedules), ``torch.compile``.

No Ray imports: ``fer_ray.train`` wraps these in Ray Train, and benchmarks call them in a bare loop.
Images stay uint8 on the device until ``Augment``/``Preprocess`` turn each batch into model input; a split can be
an ``IndexedImages`` view (the full array plus the split's indices), so no process copies its split to train on it.
Distributed runs pass ``rank``/``world_size``: every rank sees the same seeded permutation and takes its own
equal-sized slice, so DDP ranks always run the same number of steps. Every random draw of an epoch (batch order,
augmentation, dropout, mixup) derives from ``(seed, epoch, rank)``, so a run resumed from an epoch checkpoint
continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fer_ray.config import STEP_SCHEDULERS, TrainConfig

log = logging.getLogger(__name__)


def shard_batches(n: int, batch_size: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                  drop_last: bool = True, weights: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Index batches of this rank's shard; ``batch_size`` is per rank. ``weights`` draws with replacement."""
    if weights is not None:
        order = torch.multinomial(weights, n, replacement=True, generator=torch.Generator().manual_seed(seed))
    elif shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    else:
        order = torch.arange(n)
    per_rank = n // world_size if drop_last else math.ceil(n / world_size)
    mine = order[rank * per_rank:(rank + 1) * per_rank]
    steps = len(mine) // batch_size if drop_last else math.ceil(len(mine) / batch_size)
    for i in range(steps):
        yield mine[i * batch_size:(i + 1) * batch_size]


class IndexedImages:
    """The images ``base[index]`` without gathering them: indexing with a batch's positions gathers just that batch.

    Duck-types the uint8 image tensor the loops below take (``len``, ``device``, ``[slice]``, ``[index tensor]``),
    so a trial trains on its split of the shared, zero-copy dataset without holding a private copy of the split.
    """

    def __init__(self, base: torch.Tensor, index: torch.Tensor):
        self.base, self.index = base, index.to(base.device)
        self.device, self.dtype = base.device, base.dtype

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return IndexedImages(self.base, self.index[key])
        return self.base[self.index[key]]


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """Seed the global RNGs an epoch draws from (torch: kornia augmentation, dropout; numpy: timm Mixup/CutMix)
    from ``(seed, epoch, rank)``: an epoch draws the same numbers whether the run started at epoch 0 or resumed
    from a checkpoint; ranks draw differently."""
    value = (seed * 1_000_003 + epoch) * 1_009 + rank
    torch.manual_seed(value)
    np.random.seed(value % 2**32)


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (avx512_bf16 or AMX): oneDNN's bf16 kernels are fast there and
    emulated elsewhere (measured on an AVX2-only AMD EPYC: see docs/cluster.md, "bf16 on the CPU")."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def amp_rule(amp: str, capability: tuple[int, int] | None, cpu_bf16: bool | None = None) -> torch.dtype | None:
    """The AMP dtype for ``TrainConfig.amp`` on a device of compute ``capability`` (``None``: the CPU).

    ``fp16``/``bf16`` are used as asked, on any device (the CPU runs them through ``torch.autocast("cpu")``, which
    is how CI exercises the GPU's AMP code). ``auto``: bf16 on sm_80 and newer (Ampere+: native bf16 tensor cores),
    fp16 + GradScaler on sm_70/sm_75 (Volta, Turing: fp16 tensor cores; ``torch.cuda.is_bf16_supported()`` answers
    True there too, through slow emulation, so it is not asked), fp32 below sm_70 and on the CPU. ``native``:
    ``auto``'s rule on a GPU, and on the CPU bf16 where it is native (``cpu_bf16``, default
    ``cpu_native_bf16()``), else fp32: what a CPU recipe asks for to be fast on any CPU.
    """
    if amp == "off":
        return None
    if amp in ("fp16", "bf16"):
        return torch.float16 if amp == "fp16" else torch.bfloat16
    if capability is None:
        native = cpu_native_bf16() if cpu_bf16 is None else cpu_bf16
        return torch.bfloat16 if amp == "native" and native else None
    if capability < (7, 0):
        return None
    return torch.bfloat16 if capability >= (8, 0) else torch.float16


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """``amp_rule`` for ``cfg.amp`` on ``device`` (its compute capability when it is a GPU)."""
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    if cap is None and cfg.amp == "bf16" and not cpu_native_bf16():
        _warn_emulated_bf16()
    return amp_rule(cfg.amp, cap)


@functools.cache
def _warn_emulated_bf16() -> None:
    log.warning("train.amp: bf16 on a CPU without avx512_bf16 or AMX runs emulated, many times slower than fp32; "
                "amp: native takes bf16 only where it is native")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` on ``device`` with ``dtype``, or a no-op context for fp32 (``dtype`` ``None``)."""
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """A ``GradScaler`` for fp16 training on ``device`` (CUDA or CPU), ``None`` for bf16/fp32 (nothing to scale)."""
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


def param_groups(cfg: TrainConfig, module: nn.Module) -> list[dict]:
    """The trainable parameters of ``module`` as optimizer groups, each with its ``lr_mult``: with
    ``cfg.bn_bias_lr_mult`` ≠ 1 the BatchNorm biases form a group of their own, otherwise there is one group."""
    bn_biases = {id(m.bias) for m in module.modules()
                 if isinstance(m, nn.modules.batchnorm._NormBase) and m.bias is not None}
    params = [p for p in module.parameters() if p.requires_grad]
    if cfg.bn_bias_lr_mult == 1:
        return [{"params": params, "lr_mult": 1.0}]
    groups = [{"params": [p for p in params if id(p) not in bn_biases], "lr_mult": 1.0},
              {"params": [p for p in params if id(p) in bn_biases], "lr_mult": cfg.bn_bias_lr_mult}]
    return [g for g in groups if g["params"]]


def group_hparams(cfg: TrainConfig, lr_mult: float = 1.0) -> tuple[float, float]:
    """torch's ``(lr, weight_decay)`` for a parameter group with learning-rate multiplier ``lr_mult``.

    ``sgd_nesterov`` (airbench's decoupling): torch's lr is ``lr·(1−m)·lr_mult`` (m: momentum), so ``lr`` is the
    step per unit gradient once momentum has built up; coupled L2 decay through momentum shrinks the weights by
    ``lr_torch·wd_torch/(1−m)`` a step, which is set to ``D = weight_decay·batch_size/1024``: torch's weight decay is
    ``D/(lr·lr_mult)``, and per epoch (``N/batch_size`` steps) the weights shrink by ``weight_decay·N/1024`` whatever
    the lr, batch size, momentum and multiplier (both scale with the schedule). The others: ``lr·lr_mult`` and
    ``weight_decay`` as given."""
    if cfg.optimizer != "sgd_nesterov":
        return cfg.lr * lr_mult, cfg.weight_decay
    lr = cfg.lr * (1 - cfg.momentum) * lr_mult
    return lr, cfg.weight_decay * cfg.batch_size / 1024 / (cfg.lr * lr_mult)


def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over ``params`` (parameters, or ``param_groups``' groups), in timm's ``Lookahead`` with
    ``cfg.lookahead.k``."""
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params, "lr_mult": 1.0}]
    groups = [{k: v for k, v in g.items() if k != "lr_mult"}
              | dict(zip(("lr", "weight_decay"), group_hparams(cfg, g.get("lr_mult", 1.0)))) for g in groups]
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(groups, lr=cfg.lr)
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=cfg.lr)
    else:
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    if cfg.lookahead.k:
        from timm.optim import Lookahead

        opt = Lookahead(opt, alpha=cfg.lookahead.alpha, k=cfg.lookahead.k)
    return opt


def steps_per_epoch(n: int, cfg: TrainConfig, world_size: int = 1) -> int:
    """Optimizer steps of one epoch over ``n`` training images (``shard_batches`` with ``drop_last``)."""
    return (n // world_size) // max(1, cfg.batch_size // world_size)


def step_factor(cfg: TrainConfig, step: int, total: int) -> float:
    """``scheduler: linear``'s lr multiplier at optimizer step ``step`` (0-based) of ``total``: ``(step+1)/W`` over
    the ``W = round(warmup_fraction·total)`` warm-up steps, then ``(total−step)/(total−W)`` down to ``1/(total−W)``
    at the last step."""
    warm = round(cfg.warmup_fraction * total)
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / max(1, total - warm))


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps: int | None = None):
    """The LR scheduler, or ``None``. Per epoch (``step(val_acc)`` for plateau, ``step()`` otherwise) or, for
    ``STEP_SCHEDULERS``, ``step()`` after every optimizer step over ``steps`` steps an epoch."""
    sched = torch.optim.lr_scheduler
    if cfg.scheduler in STEP_SCHEDULERS:
        if not steps:
            raise ValueError(f"scheduler {cfg.scheduler} needs the steps per epoch")
        total = steps * cfg.epochs
        if cfg.scheduler == "linear":
            return sched.LambdaLR(optimizer, lambda s: step_factor(cfg, s, total))
        return sched.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total,
                                pct_start=cfg.warmup_fraction, cycle_momentum=False, div_factor=25.0,
                                final_div_factor=1e4)
    if cfg.scheduler == "cosine":  # linear warm-up (lr·k/(w+1) in epoch k-1 of w), then cosine to 0 at the end
        warm = cfg.warmup_epochs
        cosine = sched.CosineAnnealingLR(optimizer, T_max=max(1, cfg.epochs - warm))
        if not warm:
            return cosine
        linear = sched.LinearLR(optimizer, start_factor=1 / (warm + 1), end_factor=warm / (warm + 1),
                                total_iters=max(1, warm - 1))
        return sched.SequentialLR(optimizer, [linear, cosine], milestones=[warm])
    if cfg.scheduler == "step":
        return sched.StepLR(optimizer, step_size=max(1, cfg.epochs // 3), gamma=0.1)
    if cfg.scheduler == "plateau":
        return sched.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience)
    return None


def compile_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``torch.compile(model)`` (inductor), after a probe compile on ``device``; where inductor cannot run (no C++
    compiler, no Triton, an unsupported platform) one warning line and ``model`` itself."""
    try:
        probe = torch.compile(lambda t: t * 2 + 1, backend="inductor")
        probe(torch.ones(8, device=device))
    except Exception as e:  # noqa: BLE001  (inductor raises many types)
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        log.warning("compile: inductor unavailable on %s (%s: %s); training eagerly", device, type(e).__name__, first)
        return model
    return torch.compile(model)


def class_balance(labels: torch.Tensor, num_classes: int = 7) -> torch.Tensor:
    """Inverse-frequency weight per class (scikit-learn's ``balanced`` weights), normalised to mean 1 over the
    samples; a class absent from ``labels`` gets weight 1 (no sample carries it)."""
    from sklearn.utils.class_weight import compute_class_weight

    y = labels.cpu().numpy()
    present = np.unique(y)
    w = np.ones(num_classes)
    w[present] = compute_class_weight("balanced", classes=present, y=y)
    w = torch.as_tensor(w / w[y].mean(), dtype=torch.float32)
    return w


class LossFn:
    """Cross-entropy with optional label smoothing, class weights and timm Mixup/CutMix soft targets.

    With ``cfg.distill_alpha`` = α > 0 and teacher logits passed to ``__call__``, the loss is
    α·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) + (1-α)·CE (Hinton et al. 2015), T = ``cfg.distill_temperature``.
    """

    def __init__(self, cfg: TrainConfig, train_labels: torch.Tensor, num_classes: int = 7):
        self.cfg = cfg
        self.weight = class_balance(train_labels, num_classes).to(train_labels.device) if cfg.class_weighted else None
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            from timm.data import Mixup  # imported only when used: timm.data costs ~0.7 s of a trial's start-up

            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                               num_classes=num_classes)

    def mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mixup is None or len(x) % 2:
            return x, y
        return self.mixup(x, y)

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, teacher: torch.Tensor | None = None) -> torch.Tensor:
        hard = self._hard(logits, target)
        alpha = self.cfg.distill_alpha
        if teacher is None or alpha == 0:
            return hard
        t = self.cfg.distill_temperature
        kl = F.kl_div(F.log_softmax(logits.float() / t, -1), F.log_softmax(teacher.float() / t, -1),
                      reduction="batchmean", log_target=True)
        return alpha * t * t * kl + (1 - alpha) * hard

    def _hard(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.dim() == 2:  # soft targets from Mixup/CutMix
            per_sample = -(target * F.log_softmax(logits, dim=-1)).sum(-1)
            if self.weight is not None:
                per_sample = per_sample * (target @ self.weight)
            return per_sample.mean()
        return F.cross_entropy(logits, target, weight=self.weight, label_smoothing=self.cfg.label_smoothing)


def set_backbone_frozen(model: nn.Module, frozen: bool) -> bool:
    """Freeze/unfreeze a model's backbone if it supports it (``freeze_backbone``); returns whether it did."""
    module = model.module if hasattr(model, "module") else model
    if not hasattr(module, "freeze_backbone"):
        return False
    module.freeze_backbone(frozen)
    return True


def train_one_epoch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
                    preprocess: nn.Module, augment: nn.Module, cfg: TrainConfig, epoch: int, *, rank: int = 0,
                    world_size: int = 1, scaler: torch.amp.GradScaler | None = None,
                    loss_fn: LossFn | None = None, teacher: torch.Tensor | None = None,
                    on_step: Callable[[], None] | None = None) -> dict[str, float]:
    """One pass over this rank's shard; returns ``train_loss``, ``train_acc``, ``images``, ``train_time_s``.

    ``teacher``: optional ``[N, C]`` teacher logits aligned with ``images``, for ``LossFn``'s distillation term.
    ``on_step``: called after every optimizer step (``fer_ray.loop.Hook.after_step``: EMA weights).
    """
    model.train()
    seed_epoch(cfg.seed, epoch, rank)
    device = images.device
    amp_dtype = autocast_dtype(cfg, device)
    loss_fn = loss_fn or LossFn(cfg, labels)
    per_rank = max(1, cfg.batch_size // world_size)
    weights = class_balance(labels)[labels.cpu()] if cfg.balanced_sampling else None
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, t0 = 0, time.perf_counter()
    for idx in shard_batches(len(images), per_rank, shuffle=True, seed=cfg.seed * 1000 + epoch, rank=rank,
                             world_size=world_size, weights=weights):
        idx = idx.to(device, non_blocking=True)
        if cfg.aug_repeats > 1:  # batch augmentation: every image several times, each copy augmented on its own
            idx = idx.repeat_interleave(cfg.aug_repeats)
        x = preprocess(augment(preprocess.to_float(images[idx]), idx=idx, epoch=epoch, seed=cfg.seed))
        y = labels[idx]
        x, target = loss_fn.mix(x, y)
        with autocast(device, amp_dtype):
            logits = model(x)
            loss = loss_fn(logits, target) if teacher is None else loss_fn(logits, target, teacher[idx])
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if on_step is not None:
            on_step()
        loss_sum += loss.detach() * len(idx)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(idx)
    stats = _all_reduce(torch.stack([loss_sum.float(), correct.float(), torch.tensor(float(seen), device=device)]),
                        world_size)
    return {"train_loss": (stats[0] / stats[2].clamp(min=1)).item(),
            "train_acc": (stats[1] / stats[2].clamp(min=1)).item(),
            "images": int(stats[2].item()), "train_time_s": time.perf_counter() - t0}


@torch.inference_mode()
def predict_logits(model: nn.Module, images: torch.Tensor, preprocess: nn.Module, batch_size: int = 512,
                   amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Float32 logits ``[N, C]`` for uint8 ``images`` in order, in eval mode."""
    was_training = model.training
    model.eval()
    out = []
    for idx in shard_batches(len(images), batch_size, shuffle=False, drop_last=False):
        with autocast(images.device, amp_dtype):
            out.append(model(preprocess(images[idx.to(images.device)])).float())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


SCORE_TIEBREAK = 1e-6
"""``val_score = val_acc - SCORE_TIEBREAK * val_loss``: accuracy, ties broken by the lower loss. The term stays
below one image's share of accuracy for any validation set under ~10^5 images (losses below 10), so it orders
trials exactly as accuracy does wherever accuracies differ. Early in training many trials sit at the same
majority-class accuracy; ranked on ``val_acc`` alone they all tie and ASHA stops none of them."""


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, preprocess: nn.Module, cfg: TrainConfig,
             *, rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """``val_loss``, ``val_acc`` and ``val_score`` (see ``SCORE_TIEBREAK``) over ``images``; with DDP each rank
    scores a disjoint slice and results are summed."""
    n = len(images)
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    logits = predict_logits(model, images[lo:hi], preprocess, cfg.eval_batch_size,
                            autocast_dtype(cfg, images.device))
    y = labels[lo:hi]
    loss = F.cross_entropy(logits, y, reduction="sum") if len(y) else torch.zeros((), device=images.device)
    correct = (logits.argmax(1) == y).sum().float() if len(y) else torch.zeros((), device=images.device)
    stats = _all_reduce(torch.stack([loss.float(), correct, torch.tensor(float(len(y)), device=images.device)]),
                        world_size)
    val_loss, val_acc = (stats[0] / stats[2]).item(), (stats[1] / stats[2]).item()
    return {"val_loss": val_loss, "val_acc": val_acc, "val_score": val_acc - SCORE_TIEBREAK * val_loss}


def _all_reduce(t: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t
