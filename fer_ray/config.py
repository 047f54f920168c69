"""Typed run configuration: data, augmentation, training and sweep dataclasses, loaded from YAML.

Every dataclass rejects unknown keys, values of the wrong type (each value is checked against its field's type
hint) and impossible values with a one-line ``ConfigError`` naming the field. A sweep file (``sweeps/*.yaml``)
holds ``data``, ``train`` (the base trial config) and a ``search_space`` of dotted ``train`` field names (``lr``,
``augment.strength``) mapped to ``{choice|grid|uniform|loguniform|randint}``, every candidate (and both bounds of a
range) checked as a value of its field, optionally conditional on the trial's model (``when: {model: [...]}``);
``search`` picks the algorithm that proposes trials (``SearchConfig``: random or Optuna TPE). This module is a
leaf: it imports no torch and no other fer_ray module but the torch-free view grammar (``fer_ray.views``); model
names are checked where models live (``fer_ray.models.check_model_names``) when a sweep is loaded to run.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fer_ray.names import DEDUP_MODES, FORMATS, GPU_MEMORY_GB, path_name_problem


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the file or field."""


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    origin = typing.get_origin(hint) or hint
    if isinstance(origin, type) and issubclass(origin, _Config):
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(origin, getattr(origin, "__name__", str(origin)))


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as YAML gives it) fits the type hint ``hint``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    origin, args = typing.get_origin(hint) or hint, typing.get_args(hint)
    if hint is type(None):
        return value is None
    if origin is bool:
        return isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and (not args or all(_matches(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict) and (not args or all(_matches(k, args[0]) and _matches(v, args[1])
                                                           for k, v in value.items()))
    if isinstance(origin, type) and issubclass(origin, _Config):
        return isinstance(value, dict | origin)
    return isinstance(value, origin) if isinstance(origin, type) else True


def _type_error(where: str, value: Any, hint: Any) -> ConfigError:
    hint_text = ""
    if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value.strip()):
        hint_text = f" (YAML reads {value} as text: write it with a dot, e.g. {value.replace('e', '.0e', 1)})"
    return ConfigError(f"{where}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__}){hint_text}")


class _Config:
    """Mixin: ``from_dict`` with unknown-key rejection, type checks and nested dataclass fields; ``to_dict``."""

    @classmethod
    def from_dict(cls, raw: dict | None, where: str = "") -> Any:
        where = where or cls.__name__
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__} {raw!r:.60}")
        raw = dict(raw or {})
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(names))}")
        kwargs = {}
        for key, value in raw.items():
            sub = hints[key]
            if not _matches(value, sub):
                raise _type_error(f"{where}.{key}", value, sub)
            if isinstance(sub, type) and issubclass(sub, _Config):
                value = sub.from_dict(value, f"{where}.{key}") if isinstance(value, dict) else value
            elif sub is float or float in typing.get_args(sub):
                value = float(value) if isinstance(value, int) and not isinstance(value, bool) else value
            kwargs[key] = value
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{where}.{e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> Any:
        return dataclasses.replace(self, **changes)


def _check(cond: bool, field_name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name}: {msg}")


@dataclass
class DataConfig(_Config):
    """Where the faces come from and how Training is split."""

    path: str | None = None
    """A fer2013.csv, an image-folder root or a torchvision FER2013 folder; ``None`` draws the synthetic set."""
    format: str = "auto"
    """``auto``, ``csv``, ``folders`` or ``torchvision``."""
    synthetic_n: int = 6000
    """Images drawn when ``path`` is ``None``."""
    synthetic_seed: int = 0
    val_fraction: float = 0.1
    """Stratified share of Training held out as the selection split ``val``."""
    split_seed: int = 0
    cache_dir: str | None = ".cache/fer_ray"
    on_bad_row: str = "error"
    """``error`` stops at the first malformed row; ``skip`` drops bad rows and reports how many."""
    dedup: str = "leakage"
    """Duplicate removal after loading (``fer_ray.data.quality.dedup``): ``leakage`` (the default) drops Training
    images that exactly or nearly duplicate a PublicTest/PrivateTest image (919 of them in FER-2013: kept, they
    inflate every test score); ``within`` keeps one image per exact-duplicate group in each split; ``both``;
    ``none`` keeps everything."""
    near_dup_threshold: int = 4
    """Largest perceptual-hash Hamming distance (of 64 bits) counted as a near duplicate."""
    ferplus: str | None = None
    """FER+ ``fer2013new.csv`` whose majority votes relabel a ``fer2013.csv`` source (``fer_ray.data.ferplus``)."""
    group_duplicates: bool | str = "near"
    """Carve ``val`` by duplicate groups so no copy straddles train/val: ``near`` (the default: exact copies and
    near duplicates within ``near_dup_threshold``, 1-px shifts included), ``exact`` (pixel-identical only; ``true``
    means this), ``none`` (``false``)."""

    def __post_init__(self) -> None:
        _check(self.format in ("auto", *FORMATS), "format", f"must be auto or one of {FORMATS}, got {self.format!r}")
        _check(self.synthetic_n >= 70, "synthetic_n", f"must be >= 70, got {self.synthetic_n}")
        _check(0 < self.val_fraction < 1, "val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        _check(self.on_bad_row in ("error", "skip"), "on_bad_row", f"must be error or skip, got {self.on_bad_row!r}")
        _check(self.dedup in DEDUP_MODES, "dedup", f"must be one of {DEDUP_MODES}, got {self.dedup!r}")
        if isinstance(self.group_duplicates, bool):
            self.group_duplicates = "exact" if self.group_duplicates else "none"
        _check(self.group_duplicates in ("near", "exact", "none"), "group_duplicates",
               f"must be near, exact or none, got {self.group_duplicates!r}")
        _check(isinstance(self.near_dup_threshold, int) and 0 <= self.near_dup_threshold <= 16, "near_dup_threshold",
               f"must be an integer in [0, 16], got {self.near_dup_threshold!r}")


@dataclass
class AugmentConfig(_Config):
    """Per-sample random augmentation of whole batches on the training device (``fer_ray.data.augment``)."""

    strength: float = 1.0
    """Multiplies rotation, translation, scale and jitter ranges; 0 turns augmentation off (flip aside)."""
    hflip: float = 0.5
    """Probability of a horizontal flip."""
    rotate: float = 10.0
    """Max rotation in degrees."""
    translate: float = 0.1
    """Max shift as a fraction of the image side."""
    scale: float = 0.1
    """Zoom range ``1 ± scale``."""
    shear: float = 0.0
    """Max shear in degrees."""
    affine_p: float = 1.0
    """Probability of the affine (rotation, shift, zoom, shear) per image."""
    brightness: float = 0.0
    contrast: float = 0.0
    jitter_p: float = 1.0
    """Probability of the brightness/contrast jitter per image."""
    erasing: float = 0.0
    """Probability of random erasing (cutout)."""
    resized_crop: float = 0.0
    """Probability of a random resized crop (area 70-100 %, aspect 3/4-4/3) back to the batch's size."""
    alternate_flip: bool = False
    """Deterministic flips instead of random ones (airbench): every training image has a fixed random phase (drawn
    from the run's seed and its position in the split) and is flipped in the epochs of one parity, so it is seen
    in both orientations on consecutive epochs. Replaces the random flip (leave ``hflip`` at 0.5: about half the
    images are flipped each epoch either way)."""

    def __post_init__(self) -> None:
        _check(self.strength >= 0, "strength", f"must be >= 0, got {self.strength}")
        _check(not self.alternate_flip or self.hflip == 0.5, "alternate_flip",
               f"replaces the random flip: leave hflip at 0.5, got {self.hflip}")
        for name in ("hflip", "erasing", "resized_crop", "affine_p", "jitter_p"):
            _check(0 <= getattr(self, name) <= 1, name, f"must be a probability, got {getattr(self, name)}")
        for name in ("rotate", "translate", "scale", "shear", "brightness", "contrast"):
            _check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        _check(self.translate * self.strength < 0.5, "translate", "translate × strength must stay below 0.5")
        _check(self.scale * self.strength < 1, "scale", "scale × strength must stay below 1")


@dataclass
class EmaConfig(_Config):
    """An exponential moving average of the weights (``fer_ray.loop.EMA``: timm's ``ModelEmaV3``), updated after
    every optimizer step, evaluated on val each epoch beside the raw weights and checkpointed with them."""

    decay: float = 0.0
    """Weight of the running average per step (0.999 ≈ the last ~1,000 steps); 0 turns EMA off."""
    warmup: bool = False
    """timm's EMA warm-up: the decay ramps up over the first steps (useful for short runs)."""

    def __post_init__(self) -> None:
        _check(0 <= self.decay < 1, "decay", f"must be in [0, 1), got {self.decay}")


@dataclass
class LookaheadConfig(_Config):
    """Lookahead (Zhang et al. 2019; timm's ``timm.optim.Lookahead``) around the optimizer: every ``k`` steps the
    slow weights move ``alpha`` of the way to the fast ones and the fast ones restart from them."""

    k: int = 0
    """Fast steps per slow update; 0 turns Lookahead off."""
    alpha: float = 0.5
    """Slow-weight step size in (0, 1]."""

    def __post_init__(self) -> None:
        _check(self.k >= 0, "k", f"must be >= 0 (0: off), got {self.k}")
        _check(0 < self.alpha <= 1, "alpha", f"must be in (0, 1], got {self.alpha}")


@dataclass
class WhitenConfig(_Config):
    """A whitened first layer (``fer_ray.whiten``, airbench): the stem conv's filters set, before training, to the
    eigenvectors ``±v / sqrt(λ + eps)`` of the covariance of the stem-sized patches of a sample of training images
    (preprocessed as the model sees them); on models that declare their stem (``stem_conv()``)."""

    enabled: bool = False
    frozen: bool = True
    """Keep the whitened filters fixed (``requires_grad=False``); the stem's bias, if any, still trains."""
    eps: float = 5e-4
    """Added to each eigenvalue before the square root: limits the gain of near-constant directions."""
    images: int = 5000
    """Training images sampled (seeded by the run's seed) to estimate the patch covariance."""

    def __post_init__(self) -> None:
        _check(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        _check(self.images >= 1, "images", f"must be >= 1, got {self.images}")


OPTIMIZERS = ("adam", "adamw", "sgd", "sgd_nesterov")
LR_SCHEDULERS = ("none", "cosine", "step", "plateau", "linear", "onecycle")
"""``TrainConfig.scheduler``'s values (the learning-rate schedule; ``SweepConfig.scheduler`` picks trials)."""
STEP_SCHEDULERS = ("linear", "onecycle")
"""Schedulers that set the learning rate every optimizer step (the others step once an epoch)."""


@dataclass
class TrainConfig(_Config):
    """One training run: model, optimisation, augmentation and DDP layout."""

    model: str = "advanced_emotion_net"
    """Registry name (``fer-ray models``) or ``timm/<name>``."""
    img_size: int | None = None
    """Input side in px; ``None`` uses the model's default."""
    in_chans: int | None = None
    drop_rate: float | None = None
    model_kwargs: dict = field(default_factory=dict)
    pretrained: bool | str = False
    """``True`` downloads through timm's hub, a path loads a local weights file."""
    epochs: int = 10
    batch_size: int = 64
    """Global batch size, split evenly across DDP workers."""
    optimizer: str = "adam"
    """``adam``, ``adamw``, ``sgd`` (Nesterov, torch's units) or ``sgd_nesterov``: Nesterov SGD with lr and weight
    decay decoupled (airbench): ``lr`` is the step per unit gradient once momentum has built up (torch's lr is
    ``lr·(1 − momentum)``) and ``weight_decay`` shrinks the weights by ``weight_decay`` per 1,024 training images at
    the schedule's peak, whatever ``lr``, ``batch_size`` and ``momentum`` (``fer_ray.engine.param_groups``)."""
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    bn_bias_lr_mult: float = 1.0
    """Learning-rate multiplier of the BatchNorm biases (their own parameter group; airbench uses 64 with
    ``sgd_nesterov``). With ``sgd_nesterov`` their weight decay per step stays that of the other weights."""
    lookahead: LookaheadConfig = field(default_factory=LookaheadConfig)
    """Lookahead around the optimizer (``lookahead: {k: 5, alpha: 0.5}``); off by default."""
    scheduler: str = "cosine"
    """Per epoch: ``cosine`` (with ``warmup_epochs``), ``step``, ``plateau``, ``none``. Per optimizer step (with
    ``warmup_fraction``): ``linear`` (linear warm-up, then linear decay to 0) or ``onecycle`` (torch's
    ``OneCycleLR``: cosine from lr/25 up to lr, then down to lr/25e4; momentum kept)."""
    warmup_epochs: int = 0
    warmup_fraction: float = 0.0
    """``linear``/``onecycle``: share of all optimizer steps spent warming up (``onecycle`` needs it > 0)."""
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    amp: str = "auto"
    """``auto`` (bf16 on sm_80+, fp16 + GradScaler on sm_70/75, fp32 below and on the CPU: ``engine.amp_rule``),
    ``native`` (``auto`` on a GPU; on the CPU bf16 where it has avx512_bf16 or AMX, else fp32), ``off``, or
    ``fp16``/``bf16`` forced on any device (the CPU included; bf16 is emulated, many times slower, on a CPU without
    native bf16)."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    """EMA weights (``ema: {decay: 0.999}``); off by default."""
    mixup: float = 0.0
    """Mixup alpha (timm ``Mixup``); 0 turns it off."""
    cutmix: float = 0.0
    """CutMix alpha (timm ``Mixup``); 0 turns it off."""
    class_weighted: bool = False
    """Cross-entropy weighted by inverse class frequency of the training split."""
    balanced_sampling: bool = False
    """Draw each epoch's batches with probability inversely proportional to class frequency."""
    early_stopping: int | None = None
    """Stop after this many epochs without a better validation accuracy."""
    freeze_epochs: int = 0
    """Train only the head for this many epochs (models with ``freeze_backbone``), then everything."""
    eval_batch_size: int = 512
    input: str = "resize"
    """How a 48-px face becomes the model's ``img_size`` input: ``resize``, or ``center_crop`` (train on random
    ``img_size`` crops of the face, evaluate on its center crop: the 40-px crop recipes; with TTA views
    ``tenshift<(48 - img_size) / 2>`` the ten-crop policy)."""
    resize_stages: list[list[int]] = field(default_factory=list)
    """Progressive resizing: ``[[epoch, size], ...]`` (epochs increasing): from each ``epoch`` on, training batches
    are ``size`` px (resized on the device); epochs before the first stage, and every evaluation, use the model's
    input size, which the last stage must equal (``[[0, 32], [4, 40], [8, 48]]``)."""
    whiten: WhitenConfig = field(default_factory=WhitenConfig)
    """A whitened first layer (``whiten: {enabled: true, frozen: true}``); off by default."""
    compile: bool = False
    """``torch.compile`` (inductor) the training model; one warning line and eager mode where inductor cannot run."""
    aug_repeats: int = 1
    """Each image appears this many times per batch, each copy augmented on its own (batch augmentation; the
    published recipes train on all 5 or 10 crops of an image per step). ``batch_size`` counts images."""
    plateau_factor: float = 0.5
    """``scheduler: plateau``: LR multiplier when val accuracy stalls."""
    plateau_patience: int = 2
    """``scheduler: plateau``: epochs without improvement before the LR drops."""
    distill_alpha: float = 0.0
    """Weight α of the knowledge-distillation term (``fer-ray distill``): loss = α·T²·KL(teacher ‖ student at T)
    + (1-α)·CE; needs teacher logits in the shared dataset. 0 turns it off."""
    distill_temperature: float = 4.0
    """Softmax temperature T of the distillation term."""
    seed: int = 0
    num_workers: int = 2
    """DDP workers (Ray Train actors); 0 runs the loop in-process (Ray Train local mode)."""
    use_gpu: bool = False
    gpu_fraction: float = 1.0
    """Share of a GPU each worker asks Ray for (with ``use_gpu``). Below 1, Ray packs several trials on one GPU
    (``0.25``: four): for small 48-px nets that leave a big GPU mostly idle. Single-worker trials only (DDP ranks
    need a GPU each). ``scripts/gpu_check.py`` measures the packing gain and recommends a value per GPU."""
    cpus_per_worker: float = 1.0
    accelerator_type: str | None = None
    """Ray accelerator type every worker runs on (``A100``, ``GeForce-RTX-3090``): ``ScalingConfig(accelerator_type)``.
    ``None`` lets the sweep's ``placement`` rules pick one per trial (``fer_ray.placement``)."""

    def __post_init__(self) -> None:
        _check(isinstance(self.model, str) and bool(self.model), "model", "must be a model name")
        _check(self.img_size is None or 16 <= self.img_size <= 512, "img_size", f"out of range: {self.img_size}")
        _check(self.drop_rate is None or 0 <= self.drop_rate < 1, "drop_rate", f"must be in [0, 1): {self.drop_rate}")
        _check(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        _check(self.scheduler in LR_SCHEDULERS, "scheduler", f"must be one of {LR_SCHEDULERS}, got {self.scheduler!r}")
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(0 <= self.label_smoothing < 1, "label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        _check(self.amp in ("auto", "native", "off", "fp16", "bf16"), "amp",
               f"must be auto/native/off/fp16/bf16, got {self.amp!r}")
        _check(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        _check(self.input in ("resize", "center_crop"), "input", f"must be resize or center_crop, got {self.input!r}")
        _check(self.aug_repeats >= 1, "aug_repeats", f"must be >= 1, got {self.aug_repeats}")
        _check(0 < self.plateau_factor < 1 and self.plateau_patience >= 0, "plateau_factor",
               f"factor must be in (0, 1) and patience >= 0, got {self.plateau_factor}, {self.plateau_patience}")
        _check(0 < self.gpu_fraction <= 1, "gpu_fraction", f"must be in (0, 1], got {self.gpu_fraction}")
        _check(self.gpu_fraction == 1 or self.num_workers <= 1, "gpu_fraction",
               f"a fraction of a GPU is for single-worker trials (DDP ranks need a GPU each); num_workers is "
               f"{self.num_workers}")
        _check(self.warmup_epochs >= 0, "warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        _check(self.warmup_epochs == 0 or self.scheduler not in STEP_SCHEDULERS, "warmup_epochs",
               f"scheduler {self.scheduler} warms up by warmup_fraction; set warmup_epochs to 0")
        _check(0 <= self.warmup_fraction < 1, "warmup_fraction", f"must be in [0, 1), got {self.warmup_fraction}")
        _check(self.warmup_fraction == 0 or self.scheduler in STEP_SCHEDULERS, "warmup_fraction",
               f"is for scheduler linear or onecycle (scheduler is {self.scheduler}); use warmup_epochs")
        _check(self.scheduler != "onecycle" or self.warmup_fraction > 0, "warmup_fraction",
               "scheduler onecycle needs a warm-up share in (0, 1), e.g. 0.25")
        _check(self.bn_bias_lr_mult > 0, "bn_bias_lr_mult", f"must be > 0, got {self.bn_bias_lr_mult}")
        _check(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        self._check_resize_stages()
        _check(self.mixup >= 0 and self.cutmix >= 0, "mixup", "mixup and cutmix alphas must be >= 0")
        _check(0 <= self.distill_alpha <= 1, "distill_alpha", f"must be in [0, 1], got {self.distill_alpha}")
        _check(self.distill_temperature > 0, "distill_temperature", f"must be > 0, got {self.distill_temperature}")
        _check(not (self.distill_alpha > 0 and (self.mixup > 0 or self.cutmix > 0)), "distill_alpha",
               "distillation cannot be combined with mixup/cutmix (no teacher logits for mixed images)")
        _check(self.early_stopping is None or self.early_stopping >= 1, "early_stopping", "must be >= 1 or null")
        _check(0 <= self.freeze_epochs < self.epochs, "freeze_epochs", f"must be in [0, epochs), got "
               f"{self.freeze_epochs}")
        _check(self.accelerator_type is None or _is_type_name(self.accelerator_type), "accelerator_type",
               f"must be a Ray accelerator type name like A100 or GeForce-RTX-3090, got {self.accelerator_type!r}")
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig.from_dict(self.augment, "augment")
        if isinstance(self.ema, dict):
            self.ema = EmaConfig.from_dict(self.ema, "ema")
        if isinstance(self.lookahead, dict):
            self.lookahead = LookaheadConfig.from_dict(self.lookahead, "lookahead")
        if isinstance(self.whiten, dict):
            self.whiten = WhitenConfig.from_dict(self.whiten, "whiten")

    def _check_resize_stages(self) -> None:
        stages = self.resize_stages
        ok = all(len(s) == 2 and s[0] >= 0 and 16 <= s[1] <= 512 for s in stages)
        _check(ok, "resize_stages", f"must be [epoch >= 0, size in 16..512] pairs, got {stages!r}")
        starts = [s[0] for s in stages]
        _check(starts == sorted(set(starts)), "resize_stages", f"epochs must increase, got {starts}")
        _check(not stages or self.img_size is None or stages[-1][1] == self.img_size, "resize_stages",
               f"the last stage's size ({stages[-1][1] if stages else ''}) must be img_size ({self.img_size}): "
               "evaluation runs at img_size")

    def resize_at(self, epoch: int) -> int | None:
        """The training input size of ``epoch`` under ``resize_stages``; ``None``: the model's input size."""
        sizes = [size for start, size in self.resize_stages if start <= epoch]
        return sizes[-1] if sizes else None


def _is_type_name(name: object) -> bool:
    return isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) is not None


@dataclass
class PlacementRule(_Config):
    """Where one architecture's GPU trials may run (``SweepConfig.placement``; see ``fer_ray.placement``)."""

    accelerator_type: list[str] | str | None = None
    """Allowed Ray accelerator types (``A100``, ``GeForce-RTX-3090``), in order of preference; ``None``: any."""
    min_gpu_memory_gb: float | None = None
    """Keep only types whose memory (``fer_ray.names.GPU_MEMORY_GB``) is at least this many GB."""
    batch_size_cap: dict[str, int] = field(default_factory=dict)
    """Accelerator type → largest per-GPU batch on it; workers there train with min(batch_size, cap × workers)."""

    def __post_init__(self) -> None:
        if isinstance(self.accelerator_type, str):
            self.accelerator_type = [self.accelerator_type]
        types = self.accelerator_type
        _check(types is None or (isinstance(types, list) and types and all(_is_type_name(t) for t in types)),
               "accelerator_type", f"must be a non-empty list of Ray accelerator type names, got {types!r}")
        mem = self.min_gpu_memory_gb
        _check(mem is None or (isinstance(mem, int | float) and mem > 0), "min_gpu_memory_gb",
               f"must be > 0, got {mem!r}")
        unknown = [t for t in types or [] if t not in GPU_MEMORY_GB]
        if mem is not None and unknown:
            raise ConfigError(f"accelerator_type: memory of {unknown[0]!r} unknown (known: "
                              f"{', '.join(GPU_MEMORY_GB)}); drop min_gpu_memory_gb or list only known types")
        caps = self.batch_size_cap
        _check(isinstance(caps, dict) and all(_is_type_name(k) and isinstance(v, int) and v >= 1
                                              for k, v in caps.items()),
               "batch_size_cap", f"must map accelerator type names to batch sizes >= 1, got {caps!r}")
        _check(self.allowed() != [], "min_gpu_memory_gb", f"no allowed GPU type has >= {mem or 0:g} GB")

    def allowed(self) -> list[str] | None:
        """The allowed accelerator types after the memory rule, ``None`` for any."""
        if self.min_gpu_memory_gb is None:
            return self.accelerator_type
        return [t for t in self.accelerator_type or list(GPU_MEMORY_GB) if GPU_MEMORY_GB[t] >= self.min_gpu_memory_gb]

    def merged(self, default: PlacementRule | None) -> PlacementRule:
        """This rule with the fields it leaves out taken from ``default`` (batch caps: per type)."""
        if default is None:
            return self
        return PlacementRule(
            accelerator_type=self.accelerator_type if self.accelerator_type is not None else default.accelerator_type,
            min_gpu_memory_gb=default.min_gpu_memory_gb if self.min_gpu_memory_gb is None else self.min_gpu_memory_gb,
            batch_size_cap={**default.batch_size_cap, **self.batch_size_cap})


_SAMPLERS = ("choice", "uniform", "loguniform", "randint", "grid")
SEARCH_ALGORITHMS = ("random", "optuna")


def sampler_of(spec: dict) -> tuple[str, Any]:
    """A search-space entry's sampler and its values: its one key besides ``when`` (``{uniform: [lo, hi]}``)."""
    (sampler, values), = ((k, v) for k, v in spec.items() if k != "when")
    return sampler, values


def condition_of(spec: dict) -> list[str] | None:
    """The models a conditional search-space entry (``when: {model: [...]}``) applies to; ``None``: every model."""
    return spec["when"]["model"] if "when" in spec else None


@dataclass
class SearchConfig(_Config):
    """How the sweep proposes trial configs (``fer_ray.search``): random draws or Optuna's TPE, seeded by the sweep's
    ``seed`` either way."""

    algorithm: str = "random"
    """``random``: Ray Tune's variant generator (random draws; ``grid`` entries crossed with them). ``optuna``: Ray
    Tune's ``OptunaSearch`` with a seeded TPE sampler, which proposes each trial from the trials finished (or stopped
    by the scheduler) before it; ``grid`` entries are not supported."""
    max_concurrent: int | None = None
    """``optuna``: trials proposed and running at once (Tune's ``ConcurrencyLimiter``); ``null``: as many as fit on
    the cluster when the sweep starts (its CPUs and GPUs over one trial's). Fewer at once: more finished trials for
    TPE to learn from per proposal. Random search runs ``max_concurrent_trials`` at once."""
    n_startup_trials: int = 10
    """``optuna``: trials drawn at random (seeded) before TPE models the results (Optuna's default)."""
    multivariate: bool = False
    """``optuna``: multivariate TPE (Optuna's ``multivariate`` with ``group`` for the conditional fields): models the
    fields jointly instead of one by one."""

    def __post_init__(self) -> None:
        _check(self.algorithm in SEARCH_ALGORITHMS, "algorithm",
               f"must be one of {', '.join(SEARCH_ALGORITHMS)}, got {self.algorithm!r}")
        _check(self.max_concurrent is None or self.max_concurrent >= 1, "max_concurrent", "must be >= 1 or null")
        _check(self.n_startup_trials >= 0, "n_startup_trials", f"must be >= 0, got {self.n_startup_trials}")
        if self.algorithm != "optuna":
            defaults = SearchConfig(algorithm="optuna")
            for name in ("max_concurrent", "n_startup_trials", "multivariate"):
                _check(getattr(self, name) == getattr(defaults, name), name,
                       f"is an option of algorithm optuna (algorithm is {self.algorithm})")


@dataclass
class AshaConfig(_Config):
    """Successive halving in epochs: Ray Tune's ASHAScheduler, or with ``synchronous`` the synchronous kind."""

    max_t: int = 10
    grace_period: int = 1
    reduction_factor: float = 2.0
    synchronous: bool = False
    """Synchronous successive halving (``fer_ray.schedulers.SuccessiveHalving``): every trial runs to a rung and waits
    (paused, resumed from its epoch checkpoint) until all have reported it; then the top 1/``reduction_factor`` go
    on. ASHA instead decides each trial on the results seen so far, so early trials always go on; with few trials
    (tens) that costs epochs. Synchronous needs the trials' total known up front (``num_samples`` × grid)."""

    def __post_init__(self) -> None:
        _check(1 <= self.grace_period <= self.max_t, "grace_period", "must be in [1, max_t]")
        _check(self.reduction_factor > 1, "reduction_factor", "must be > 1")


SWEEP_SCHEDULERS = ("asha", "pbt")
_PBT_SAMPLERS = ("choice", "uniform", "loguniform")


@dataclass
class PbtConfig(_Config):
    """Population-based training (``scheduler: pbt``; Ray Tune's ``PopulationBasedTraining``): every
    ``perturbation_interval`` epochs a trial in the bottom ``quantile_fraction`` of the population (by ``metric``)
    continues from the latest checkpoint of one in the top quantile, with ``mutations``' fields perturbed (×0.8 or
    ×1.2, a neighbouring choice) or, with probability ``resample_probability``, drawn again. The trial's optimizer
    and schedule go on at the mutated lr and weight decay (``fer_ray.loop.TrainingRun.load_state_dict``); each
    exploit is recorded in the checkpoint and the leaderboard's ``mutations`` column."""

    perturbation_interval: int = 2
    """Epochs between a trial's exploit/explore decisions."""
    mutations: dict = field(default_factory=dict)
    """Dotted train field → ``{loguniform: [lo, hi]}``, ``{uniform: [lo, hi]}`` or ``{choice: [...]}`` (e.g. ``lr``,
    ``weight_decay``, ``augment.strength``): the fields PBT perturbs and resamples."""
    quantile_fraction: float = 0.25
    resample_probability: float = 0.25
    synch: bool = False
    """Synchronous PBT: decide once every trial has reached the interval (reproducible; slower trials hold the
    population up). Asynchronous (default): each trial is decided against the others' latest results."""

    def __post_init__(self) -> None:
        _check(self.perturbation_interval >= 1, "perturbation_interval", "must be >= 1")
        _check(0 < self.quantile_fraction <= 0.5, "quantile_fraction", "must be in (0, 0.5]")
        _check(0 <= self.resample_probability <= 1, "resample_probability", "must be in [0, 1]")
        _check(isinstance(self.mutations, dict), "mutations", "must map train fields to samplers")


@dataclass
class SweepConfig(_Config):
    """A Ray Tune sweep: one TorchTrainer run per trial, scheduled by successive halving or population-based
    training."""

    name: str = "sweep"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search_space: dict = field(default_factory=dict)
    """Dotted TrainConfig field → ``{choice: [...]}``, ``{uniform: [lo, hi]}``, ``{loguniform: [lo, hi]}``,
    ``{randint: [lo, hi]}`` or ``{grid: [...]}``; ``model_kwargs.<name>`` searches a keyword of the model's
    builder. ``when: {model: [...]}`` beside the sampler makes the field conditional: it is searched only in trials
    of those models, the others keep the ``train`` value (for a model keyword: the model's own default)."""
    num_samples: int = 4
    asha: AshaConfig = field(default_factory=AshaConfig)
    scheduler: str = "asha"
    """``asha``: successive halving (``asha``: ASHA, or synchronous); ``pbt``: population-based training (``pbt``)."""
    pbt: PbtConfig = field(default_factory=PbtConfig)
    metric: str = "val_score"
    """The per-epoch metric ASHA ranks trials on. ``val_score`` is validation accuracy with ties broken by the
    lower validation loss (``fer_ray.engine.SCORE_TIEBREAK``): on ``val_acc`` alone, trials still at the
    majority-class accuracy all tie at the first rung and all pass it. Checkpoints are chosen on ``val_acc``."""
    mode: str = "max"
    max_concurrent_trials: int = 1
    """Trials running at once with random search (``search.max_concurrent`` with ``optuna``)."""
    seed: int = 0
    """Seeds the search: random draws, or Optuna's TPE sampler."""
    search: SearchConfig = field(default_factory=SearchConfig)
    """How trial configs are proposed: ``{algorithm: random}`` (the default) or ``{algorithm: optuna}``."""
    max_failures: int = 1
    """Tune retries per trial (a retried trial resumes from its last epoch checkpoint)."""
    reuse_actors: bool = True
    """Tune's ``reuse_actors`` for sweeps whose trials all train in-process (``num_workers: 0``, every candidate):
    a finished trial's process takes the next trial of the same resources instead of a new process importing
    torch again. Sweeps with DDP trials always start a fresh driver per trial (``fer_ray.sweep.reuses_actors``).
    ``false``: a fresh process per trial."""
    tta_views: list = field(default_factory=lambda: ["identity", "hflip"])
    ensemble_top_k: int = 3
    wandb: bool = False
    """Log trials and the leaderboard to Weights & Biases (offline mode without an API key)."""
    wandb_project: str = "fer_ray"
    keep_checkpoints: str | dict = "best"
    """Which checkpoints a trial keeps: ``best`` (by val accuracy, plus the latest, for resuming) or a checkpoint
    library, ``{last_k: N}`` (also the last N epochs) or ``{every: N}`` (also every N-th epoch). Library epochs (and
    the EMA weights of kept epochs, with ``train.ema``) become ensemble members of their own (``fer-ray tta``);
    ensembles draw from them with ``members: {pool: library}``."""
    placement: dict = field(default_factory=dict)
    """GPU trials: model name (or ``default``) → ``PlacementRule`` (``accelerator_type`` list,
    ``min_gpu_memory_gb``, ``batch_size_cap``); a trial's DDP group never mixes GPU types (``fer_ray.placement``)."""
    time_limit: str | float | None = None
    """The whole run (sweep, TTA, ensembles, report) ends within this: ``45m``, ``90s``, ``1.5h`` or seconds;
    ``fer-ray sweep --time-limit`` overrides it. The sweep is planned from a short calibration and cut to fit
    (``fer_ray.budget``); ``null``: no limit."""

    def __post_init__(self) -> None:
        _check(path_name_problem(self.name) is None, "name", str(path_name_problem(self.name)))
        keep = self.keep_checkpoints
        ok = keep == "best" or (isinstance(keep, dict) and len(keep) == 1 and next(iter(keep)) in ("last_k", "every")
                                and isinstance(next(iter(keep.values())), int) and next(iter(keep.values())) >= 1)
        _check(ok, "keep_checkpoints", f"must be best, {{last_k: N}} or {{every: N}} with N >= 1, got {keep!r}")
        self._check_placement()
        _check(self.num_samples >= 1, "num_samples", "must be >= 1")
        _check(self.mode in ("max", "min"), "mode", "must be max or min")
        _check(self.max_concurrent_trials >= 1, "max_concurrent_trials", "must be >= 1")
        _check(self.ensemble_top_k >= 1, "ensemble_top_k", "must be >= 1")
        if self.time_limit is not None:
            from fer_ray.durations import parse_duration

            try:
                parse_duration(self.time_limit)
            except ValueError as e:
                raise ConfigError(f"time_limit: {e}") from None
        from fer_ray.views import expand_views, parse_view_spec  # a bad view fails before training

        for view in expand_views(self.tta_views):
            try:
                parse_view_spec(str(view))
            except ValueError as e:
                raise ConfigError(f"tta_views: {e} (quote views with commas in YAML: \"shift2,0\")") from None
        if isinstance(self.search, dict):
            self.search = SearchConfig.from_dict(self.search, "search")
        base = self.train.to_dict()
        for key, spec in self.search_space.items():
            _check(_has_path(base, key) or _is_model_kwarg(key), f"search_space.{key}",
                   "is not a train config field (nor model_kwargs.<name>, a keyword of the model's builder)")
            ok = isinstance(spec, dict) and len(set(spec) - {"when"}) == 1 and set(spec) - {"when"} <= set(_SAMPLERS)
            _check(ok, f"search_space.{key}", f"must be one mapping of {'/'.join(_SAMPLERS)} to values "
                                              "(and optionally when: {model: [...]})")
            sampler, values = sampler_of(spec)
            _check(sampler != "grid" or self.search.algorithm != "optuna", f"search_space.{key}",
                   "grid is not supported with search.algorithm optuna (use choice)")
            _check_space(base, key, sampler, values)
        for key, spec in self.search_space.items():  # once every entry (the model's among them) is known good
            if "when" in spec:
                self._check_condition(key, spec["when"])
        _check(self.search.algorithm != "optuna" or self.max_concurrent_trials == 1, "max_concurrent_trials",
               "with search.algorithm optuna set search.max_concurrent instead")
        _check(self.scheduler in SWEEP_SCHEDULERS, "scheduler", f"must be one of {', '.join(SWEEP_SCHEDULERS)}, "
                                                                f"got {self.scheduler!r}")
        if self.scheduler != "pbt" and self.asha.max_t > self.train.epochs:
            raise ConfigError(f"asha.max_t ({self.asha.max_t}) exceeds train.epochs ({self.train.epochs})")
        if isinstance(self.pbt, dict):
            self.pbt = PbtConfig.from_dict(self.pbt, "pbt")
        if self.scheduler == "pbt":
            self._check_pbt(base)

    def time_limit_s(self) -> float | None:
        """``time_limit`` in seconds (``None``: no limit)."""
        from fer_ray.durations import parse_duration

        return None if self.time_limit is None else parse_duration(self.time_limit)

    def _check_pbt(self, base: dict) -> None:
        """Population-based training's own rules, before any trial starts."""
        pbt = self.pbt
        _check(bool(pbt.mutations), "pbt.mutations", "must name at least one train field to mutate (e.g. lr)")
        for key, spec in pbt.mutations.items():
            where = f"pbt.mutations.{key}"
            _check(_has_path(base, key), where, "is not a train config field")
            ok = isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in _PBT_SAMPLERS
            _check(ok, where, f"must be one mapping of {'/'.join(_PBT_SAMPLERS)} to values")
            _check_space(base, key, *next(iter(spec.items())), where=where)
            _check(key not in self.search_space or "when" not in self.search_space[key], where,
                   "cannot also be a conditional search-space field")
        _check(pbt.perturbation_interval < self.train.epochs, "pbt.perturbation_interval",
               f"must be < train.epochs ({self.train.epochs}): no trial would ever be perturbed")
        _check(self.num_trials() >= 2, "num_samples", "pbt needs a population: at least 2 trials")
        _check(self.train.num_workers == 0, "train.num_workers",
               "must be 0 with scheduler pbt: PBT hands one trial's Tune checkpoint to another, and in-process "
               "trials are the ones whose checkpoints Tune holds (DDP trials' live in Ray Train)")
        _check(self.keep_checkpoints == "best", "keep_checkpoints",
               "must be best with scheduler pbt (a trial's earlier epochs may be another trial's)")
        _check(not self.train.ema.decay, "train.ema", "is not supported with scheduler pbt yet (the EMA member "
                                                      "would be chosen among epochs of several lineages)")
        _check(self.search.algorithm == "random", "search.algorithm",
               "must be random with scheduler pbt (PBT explores by itself; a model-based searcher would fight it)")

    def models(self) -> list:
        """The models this sweep's trials can have: ``search_space.model``'s candidates, else ``train.model``."""
        spec = self.search_space.get("model")
        return list(sampler_of(spec)[1]) if spec else [self.train.model]

    def _check_condition(self, key: str, when: Any) -> None:
        where = f"search_space.{key}.when"
        _check(key != "model", where, "the model field itself cannot be conditional")
        ok = isinstance(when, dict) and set(when) == {"model"} and isinstance(when["model"], list) and when["model"]
        _check(ok, where, f"must be {{model: [names]}}, got {when!r}")
        models = self.models()
        for name in when["model"]:
            _check(name in models, f"{where}.model", f"{name!r} is not a model of this sweep (its models: "
                                                     f"{', '.join(map(str, models))})")

    def conditioned(self, train: dict) -> dict:
        """A trial's train config (a dict) with every conditional field that does not apply to its model set back
        to the ``train`` value (random search draws every field; ``optuna`` suggests only the fields that apply)."""
        base = self.train.to_dict()
        for key, spec in self.search_space.items():
            models = condition_of(spec)
            if models is None or train.get("model") in models:
                continue
            if _has_path(base, key):
                train = set_path(train, key, _get_path(base, key))
            else:  # a model keyword the train config does not set: the model's own default
                kwargs = {k: v for k, v in train["model_kwargs"].items() if k != key.partition(".")[2]}
                train = set_path(train, "model_kwargs", kwargs)
        return train

    def num_trials(self) -> int:
        """How many trials Tune will create: ``num_samples`` × the product of the ``grid`` lengths."""
        n = self.num_samples
        for spec in self.search_space.values():
            if "grid" in spec:
                n *= len(spec["grid"])
        return n

    def _check_placement(self) -> None:
        _check(isinstance(self.placement, dict), "placement", "must map model names (or default) to rules")
        rules = {}
        for arch, rule in self.placement.items():
            _check(isinstance(rule, dict | PlacementRule), f"placement.{arch}", f"must be a mapping, got {rule!r}")
            if isinstance(rule, dict):
                rule = PlacementRule.from_dict(rule, f"placement.{arch}")
            rules[arch] = rule
        for arch, rule in rules.items():
            if arch != "default":
                try:
                    rule.merged(rules.get("default"))
                except ConfigError as e:
                    raise ConfigError(f"placement.{arch} with default: {e}") from None
        self.placement = rules

    def rule_for(self, model: str) -> PlacementRule | None:
        """The placement rule of ``model`` (merged with ``default``), or ``None``."""
        default = self.placement.get("default")
        rule = self.placement.get(model)
        return rule.merged(default) if rule else default


def _check_space(base: dict, key: str, sampler: str, values: Any, where: str | None = None) -> None:
    """A search-space entry's values, checked as values of the field they sample: every ``choice``/``grid``
    candidate, and both bounds of a range (floats for ``uniform``/``loguniform``, integers for ``randint``)."""
    where = where or f"search_space.{key}"
    _check(isinstance(values, list) and values, where, "needs a non-empty list")
    candidates = values
    if sampler in ("uniform", "loguniform", "randint"):
        kind = int if sampler == "randint" else float
        ok = len(values) == 2 and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        _check(ok and values[0] < values[1], where, "needs [low, high] numbers, low < high")
        _check(kind is float or all(float(v).is_integer() for v in values), where, "randint needs integer bounds")
        _check(sampler != "loguniform" or values[0] > 0, where, "loguniform needs low > 0")
        candidates = [kind(v) for v in values]
    for v in candidates:  # each one must make a valid TrainConfig
        try:
            TrainConfig.from_dict(set_path(base, key, v))
        except ConfigError as e:
            raise ConfigError(f"{where}: value {v!r} is invalid ({e})") from None


def _has_path(d: dict, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return False
        d = d[part]
    return True


def _is_model_kwarg(key: str) -> bool:
    return re.fullmatch(r"model_kwargs\.[A-Za-z_]\w*", key) is not None


def _get_path(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d[part]
    return d


def set_path(d: dict, dotted: str, value: Any) -> dict:
    """A copy of nested dict ``d`` with ``dotted`` (``augment.strength``) set to ``value``."""
    head, _, rest = dotted.partition(".")
    out = dict(d)
    out[head] = set_path(d[head], rest, value) if rest else value
    return out


def parse_yaml(text: str, where: str) -> dict:
    """A YAML mapping from ``text``; errors are one line naming ``where`` (a file or URI) and the line."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{where}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    return raw


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with file-naming one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    return parse_yaml(path.read_text(), str(path))


def parse_sweep(text: str, where: str, default_name: str = "sweep") -> SweepConfig:
    """A ``SweepConfig`` from YAML text; errors name ``where`` and the field."""
    raw = parse_yaml(text, where)
    raw.setdefault("name", default_name)
    try:
        return SweepConfig.from_dict(raw, "sweep")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def load_sweep(path: str | Path) -> SweepConfig:
    """Parse a sweep YAML file; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    return parse_sweep(path.read_text(), str(path), default_name=path.stem)
