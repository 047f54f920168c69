"""The time budget of one ``fer-ray sweep --time-limit`` invocation: durations, the calibration, the plan and the
sweep's deadline.

A time limit covers the whole run (data preparation, calibration, sweep, TTA, ensembles, report). This module owns:

- durations (``45m``, ``90s``, ``1.5h``, ``1h30m`` or plain seconds) are ``fer_ray.durations``, a leaf the config
  imports too.
- ``calibrate``: a short measurement of each (model, img_size) pair of the search space: training and inference
  images/s on a few fixed-size batches of the sweep's own data, with the base trial config (augmentation, AMP,
  batch size per DDP rank). It runs as **one Ray task with a trial's resources** (its GPU, or its CPUs:
  ``fer_ray.inference.task_resources``), so on a cluster it measures a worker node's device, not the driver's;
  a DDP trial's rates are one rank's times its world size (gradient all-reduce not counted).
- ``plan``: the estimate of the sweep under its scheduler (successive-halving rungs, trials at once), of the TTA
  stage (members × views × scored images) and of ensembles + report, and the cuts that make it fit, in this order:
  ``num_samples`` down to a floor (the ensemble's top-k, at least 2), ``asha.max_t`` down rung by rung to the
  grace period (the last rung is cut, never the TTA), the most expensive ``img_size`` candidates, ``num_samples``
  down to 1, the epochs down to 1. A limit that cannot hold one epoch of the cheapest trial (with its start-up,
  its TTA and the ensembles + report) is a one-line ``ConfigError`` before any trial starts.
- ``SweepDeadline``: the sweep's share enforced at epoch boundaries. After each result a trial whose next epoch
  (its longest measured ``epoch_time_s`` plus the report) would end after the deadline is stopped there, so every
  ranked trial's numbers are those of completed, validated epochs; no trial starts once even the cheapest one
  could not finish an epoch; at the deadline itself every trial still running is stopped (the backstop: Tune's
  ``time_budget_s`` is the same ``stop_all`` check, but Tune pickles it with the experiment, so a ``--resume``
  would be held to the first invocation's budget). The Tune adapter is ``fer_ray.sweep.BudgetGuard``; it reads the
  deadline ``arm`` sets for the running invocation, never a pickled one.
- ``summary_line``: what the budget cut, for the log, the leaderboard and the report (from ``budget.json``, which
  ``fer_ray.experiment.Experiment`` writes).

Every time read goes through an injectable clock (``clock``, default ``time.monotonic``), so the tests drive the
planner and the deadline with fixed numbers. This module imports no torch and no Ray at module level.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from fer_ray.config import ConfigError, SweepConfig, sampler_of
from fer_ray.durations import format_duration

Clock = Callable[[], float]

STARTUP_S = {"local": 3.0, "ddp": 10.0}
"""A trial's start-up (trial start → first batch) in seconds: in-process trials (``num_workers: 0``) and DDP trials
(Ray Train spawning its worker group), from BENCHMARKS.md #3 on the 2-core machine (1.0 s and 9.7 s, rounded up
for the Tune actor around them)."""
EPOCH_OVERHEAD_S = 1.0
"""Per trial epoch beyond training and validation: the checkpoint written, reported and persisted."""
TTA_STAGE_S = 10.0
"""The TTA stage's own start: Ray worker processes importing torch for the first scoring task (13 s for the whole
stage of two tiny checkpoints in tests/test_budget.py's sweep)."""
TTA_TASK_S = 1.5
"""Per scored checkpoint: load, verify, build the inference copy."""
ENSEMBLE_REPORT_S = 10.0
"""Ensembles (top-k mean, greedy NLL with temperature) and the report (plots, HTML) for a handful of members: 3 s
for 2 members, 6 s for 4 (2,400 scored images, 2 views) on the 2-core machine."""
ENSEMBLE_MEMBER_S = 0.5
"""Ensembles and report: the extra per member (logits loaded, greedy steps, leaderboard rows)."""
MARGIN = (0.02, 5.0)
"""The safety margin kept free: this share of the limit plus these seconds (process exit, Ray shutting down,
estimates that run long)."""
CAL_BATCHES = 6
"""Timed training batches per (model, img_size) in the calibration, after one warm-up batch."""
CAL_INFER_IMAGES = 512
"""Images timed for inference per (model, img_size), after a warm-up batch."""


# Durations: fer_ray.durations (a leaf, so the config can parse time_limit without this module).


def _at_least(seconds: float) -> str:
    """A limit to suggest: ``seconds`` rounded up to 10 s below two minutes, to whole minutes above."""
    step = 10 if seconds < 120 else 60
    return format_duration(math.ceil(seconds / step) * step)


# -- calibration -----------------------------------------------------------------------------------------------
@dataclass
class Rate:
    """One (model, img_size) pair's measured speed, in images/s of a whole trial (a DDP trial: all its ranks)."""

    model: str
    img_size: int | None
    """As the search space names it (``None``: the model's default)."""
    input_size: int
    """The side the model ran at."""
    train_ips: float
    infer_ips: float


@dataclass
class Calibration:
    """What ``calibrate`` measured, and the cluster it measured on."""

    rates: list[Rate]
    seconds: float
    """Wall time of the calibration (Ray task start included)."""
    cluster_cpus: float
    cluster_gpus: float = 0.0
    device: str = "cpu"

    def rate(self, model: str, img_size: int | None) -> Rate:
        for r in self.rates:
            if r.model == model and r.img_size == img_size:
                return r
        raise KeyError(f"no calibration of {model}@{img_size}")

    def to_dict(self) -> dict:
        return asdict(self)


def pairs(cfg: SweepConfig) -> list[tuple[str, int | None]]:
    """The (model, img_size) pairs a trial of ``cfg`` can have: the search space's models × its ``img_size``
    candidates (``choice``/``grid``; else the ``train`` value, ``None`` for the model's own)."""
    return [(m, s) for m in cfg.models() for s in _sizes(cfg)]


def _sizes(cfg: SweepConfig) -> list[int | None]:
    spec = cfg.search_space.get("img_size")
    if spec and sampler_of(spec)[0] in ("choice", "grid"):
        return list(sampler_of(spec)[1])
    return [cfg.train.img_size]


def calibrate(cfg: SweepConfig, data, splits: dict, num_cpus: int | None = None, clock: Clock = time.monotonic,
              batches: int = CAL_BATCHES, infer_images: int = CAL_INFER_IMAGES) -> Calibration:
    """Measure training and inference images/s of every pair (``pairs``) as one Ray task with a trial's resources
    (see the module docstring), on the first training and validation images of ``splits``."""
    import numpy as np
    import ray

    from fer_ray import cluster
    from fer_ray.inference import task_resources

    t0 = clock()
    cluster.init_ray(num_cpus=num_cpus)
    resources = ray.cluster_resources()
    train = cfg.train
    world = max(1, train.num_workers)
    per_rank = max(1, train.batch_size // world)
    n_train = min(len(splits["train"]), per_rank * (batches + 1) * world)
    n_val = min(len(splits["val"]), infer_images)
    index = np.concatenate([splits["train"][:n_train], splits["val"][:n_val]])
    arrays = {"images": data.images[index], "labels": data.labels[index], "n_train": n_train}
    options = task_resources(train, resources.get("CPU"))
    device = "cuda" if options.get("num_gpus") else "cpu"
    threads = max(1, round(train.cpus_per_worker))
    task = ray.remote(_measure).options(**options, max_retries=0, name="fer_ray.calibrate")
    rates = ray.get(task.remote(arrays, train.to_dict(), pairs(cfg), device, threads, world))
    return Calibration([Rate(**r) for r in rates], clock() - t0, float(resources.get("CPU", 0)),
                       float(resources.get("GPU", 0)), device)


def _measure(arrays: dict, train: dict, todo: list, device: str, threads: int, world: int) -> list[dict]:
    """The calibration task's body: ``_measure_pair`` for each (model, img_size) of ``todo``."""
    import torch

    torch.set_num_threads(threads)
    dev = torch.device(device)
    images = torch.from_numpy(arrays["images"]).to(dev)
    labels = torch.from_numpy(arrays["labels"].astype("int64")).to(dev)
    n = arrays["n_train"]
    return [_measure_pair(train | {"model": m, "img_size": z}, images[:n], labels[:n], images[n:], world) | {
        "model": m, "img_size": z} for m, z in todo]


def _measure_pair(train: dict, x, y, val, world: int) -> dict:
    """One DDP rank's training on ``x`` (one warm-up batch, then every batch of ``x``: ``engine.train_one_epoch``)
    and inference of ``val``; images/s of the whole trial (× ``world``)."""
    import torch

    from fer_ray import engine
    from fer_ray.config import TrainConfig
    from fer_ray.data.augment import Augment, Preprocess
    from fer_ray.loop import build_model

    cfg = TrainConfig.from_dict(train, "train")
    torch.manual_seed(cfg.seed)
    dev = x.device
    model = build_model(cfg).to(dev, memory_format=torch.channels_last)
    fer = model.fer_cfg
    preprocess = Preprocess.for_model(fer).to(dev)
    augment = Augment(cfg.augment, crop=fer["img_size"] if cfg.input == "center_crop" else 0).to(dev)
    optimizer = engine.build_optimizer(cfg, engine.param_groups(cfg, model))
    one_batch = max(1, cfg.batch_size // world) * world
    for epoch, n in enumerate((one_batch, len(x))):  # warm-up (allocations, the optimizer's first step), then timed
        timed = engine.train_one_epoch(model, x[:n], y[:n], optimizer, preprocess, augment, cfg, epoch, rank=0,
                                       world_size=world)
    amp = engine.autocast_dtype(cfg, dev)
    engine.predict_logits(model, val[:64], preprocess, cfg.eval_batch_size, amp)  # warm-up
    t0 = time.perf_counter()
    engine.predict_logits(model, val, preprocess, cfg.eval_batch_size, amp)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return {"input_size": int(fer["img_size"]),
            "train_ips": world * timed["images"] / max(timed["train_time_s"], 1e-6),
            "infer_ips": world * len(val) / max(time.perf_counter() - t0, 1e-6)}


# -- the plan --------------------------------------------------------------------------------------------------
@dataclass
class Sizes:
    """How many images each stage touches: trained per epoch, validated per epoch, scored by TTA (every split
    the report scores, the validation split included)."""

    train: int
    val: int
    scored: int

    @classmethod
    def of(cls, splits: dict, roles: dict[str, str]) -> Sizes:
        return cls(len(splits["train"]), len(splits["val"]),
                   sum(len(v) for k, v in splits.items() if roles.get(k, "fit") != "fit"))


@dataclass
class BudgetPlan:
    """The shares of the limit, the sweep's planned shape and what was cut to get there."""

    limit_s: float
    source: str
    """Where the limit came from, for messages: ``--time-limit 45m`` or ``time_limit 45m``."""
    shares_s: dict[str, float]
    """``calibration`` (everything before the sweep, spent), ``sweep`` (its deadline), ``tta``,
    ``ensembles_report``, ``margin``; they add up to the limit."""
    estimate_s: dict[str, float]
    """The planned sweep's estimate, and the TTA and ensembles + report estimates the shares reserve."""
    num_samples: int
    max_t: int
    grace_period: int
    epochs: int
    img_sizes: list | None
    """The ``img_size`` candidates kept (``None``: the search space has no discrete ``img_size``)."""
    cuts: list[str] = field(default_factory=list)
    """What the plan cut, as people read it: ``num_samples 16 → 6``, ``asha.max_t 10 → 6``, ``img_size 64 dropped``."""
    new_trial_s: float = 0.0
    """Start-up plus one epoch of the cheapest trial: no trial starts with less than this left before the deadline."""
    epoch_overhead_s: float = EPOCH_OVERHEAD_S
    resumed: bool = False
    """``--resume``: the trials and epochs are the experiment's (Tune restores them); only the deadline is new."""

    @property
    def max_epochs(self) -> int:
        """The epochs a trial runs at most: ``max_t`` under successive halving, ``epochs`` under PBT."""
        return self.max_t

    def apply(self, cfg: SweepConfig) -> SweepConfig:
        """``cfg`` with the planned ``num_samples``, ``asha.max_t``/``grace_period``, ``train.epochs`` and
        ``img_size`` candidates (validated again as a sweep file is)."""
        raw = cfg.to_dict()
        raw["num_samples"] = self.num_samples
        if cfg.scheduler != "pbt":
            raw["asha"] = raw["asha"] | {"max_t": self.max_t, "grace_period": self.grace_period}
        raw["train"] = raw["train"] | {"epochs": self.epochs}
        if self.img_sizes is not None:
            sampler, _ = sampler_of(cfg.search_space["img_size"])
            raw["search_space"] = raw["search_space"] | {
                "img_size": cfg.search_space["img_size"] | {sampler: list(self.img_sizes)}}
        return SweepConfig.from_dict(raw, "sweep")

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        """The plan for the log."""
        sh, est = self.shares_s, self.estimate_s
        d = format_duration
        out = [f"{self.source} {d(self.limit_s)}: calibration {d(sh['calibration'])}, sweep {d(sh['sweep'])} "
               f"(estimate {d(est['sweep'])}), TTA {d(sh['tta'])}, ensembles+report {d(sh['ensembles_report'])}, "
               f"margin {d(sh['margin'])}"]
        if self.resumed:
            out.append("resumed: the trials and epochs are the experiment's; the deadline is this invocation's")
        out.append("cuts: " + ("; ".join(self.cuts) if self.cuts else "none"))
        return out


@dataclass
class _Shape:
    """The sweep's shape the planner varies."""

    n: int
    max_t: int
    grace: int
    epochs: int
    sizes: list | None


def rungs(grace: int, eta: float, max_t: int) -> list[int]:
    """The epochs where successive halving decides: ``grace·η^k`` below ``max_t``, then ``max_t`` (where trials end)."""
    out, r = [], float(grace)
    while round(r) < max_t:
        out.append(int(round(r)))
        r *= eta
    return out + [max_t]


def scheduled_epochs(n: int, grace: int, eta: float, max_t: int) -> tuple[int, int]:
    """``(epochs, resumes)`` of ``n`` trials under successive halving: ⌈n/η^k⌉ trials train from rung k−1 to rung
    k; ``resumes`` counts the trials that go on past a rung (under synchronous halving each restarts from a pause)."""
    total, prev, resumes = 0, 0, 0
    for k, r in enumerate(rungs(grace, eta, max_t)):
        alive = max(1, math.ceil(n / eta ** k - 1e-9))
        total += alive * (r - prev)
        resumes += alive if k else 0
        prev = r
    return total, resumes


class _Estimator:
    """Seconds of each stage for a sweep shape, from a calibration."""

    def __init__(self, cfg: SweepConfig, cal: Calibration, sizes: Sizes):
        from fer_ray.placement import trials_that_fit
        from fer_ray.views import expand_views

        self.cfg, self.cal, self.sizes = cfg, cal, sizes
        t = cfg.train
        self.startup = STARTUP_S["ddp" if t.num_workers > 0 else "local"]
        cap = cfg.max_concurrent_trials if cfg.search.algorithm != "optuna" else cfg.search.max_concurrent or 10**6
        self.concurrency = max(1, min(cap, trials_that_fit([t], {"CPU": cal.cluster_cpus, "GPU": cal.cluster_gpus})))
        task_cpus = min(t.cpus_per_worker * max(1, t.num_workers), cal.cluster_cpus or 1)
        self.tta_concurrency = max(1, math.floor((cal.cluster_cpus or 1) / task_cpus + 1e-9)) if not t.use_gpu else (
            max(1, math.floor((cal.cluster_gpus or 1) / t.gpu_fraction + 1e-9)))
        self.views = len(expand_views(cfg.tta_views))
        grid = cfg.num_trials() // cfg.num_samples
        spec = cfg.search_space.get("img_size")
        self.size_grid = bool(spec) and sampler_of(spec)[0] == "grid"
        self.other_grid = grid // len(_sizes(cfg)) if self.size_grid else grid

    def epoch_s(self, model: str, size) -> float:
        r = self.cal.rate(model, size)
        return self.sizes.train / r.train_ips + self.sizes.val / r.infer_ips + EPOCH_OVERHEAD_S

    def trials(self, s: _Shape) -> int:
        return s.n * self.other_grid * (len(s.sizes) if self.size_grid and s.sizes else 1)

    def combos(self, s: _Shape) -> list[tuple[str, int | None]]:
        return [(m, z) for m in self.cfg.models() for z in (s.sizes if s.sizes is not None else _sizes(self.cfg))]

    def members_per_trial(self, s: _Shape) -> int:
        keep, length = self.cfg.keep_checkpoints, s.max_t
        extra = 0 if keep == "best" else min(keep["last_k"], length) - 1 if "last_k" in keep else (
            length // keep["every"])
        return (1 + max(0, extra)) * (2 if self.cfg.train.ema.decay else 1)

    def stages(self, s: _Shape, combos: list | None = None) -> dict[str, float]:
        """The seconds of the sweep, the TTA stage and ensembles + report for shape ``s`` (trials drawn evenly from
        ``combos``, default every (model, img_size) pair ``s`` keeps)."""
        combos = combos or self.combos(s)
        epoch = sum(self.epoch_s(*c) for c in combos) / len(combos)
        infer = sum(1 / self.cal.rate(*c).infer_ips for c in combos) / len(combos)  # seconds per image
        n = self.trials(s)
        if self.cfg.scheduler == "pbt":
            epochs, resumes = n * s.epochs, 0
        else:
            epochs, resumes = scheduled_epochs(n, s.grace, self.cfg.asha.reduction_factor, s.max_t)
            resumes = resumes if self.cfg.asha.synchronous else 0
        sweep = ((n + resumes) * self.startup + epochs * epoch) / min(self.concurrency, n)
        members = n * self.members_per_trial(s)
        tta = TTA_STAGE_S + members * (TTA_TASK_S + self.views * self.sizes.scored * infer) / min(
            self.tta_concurrency, members)
        return {"sweep": sweep, "tta": tta, "ensembles_report": ENSEMBLE_REPORT_S + ENSEMBLE_MEMBER_S * members}

    def cheapest(self) -> tuple[tuple[str, int | None], float]:
        """The cheapest trial's pair and the seconds of its start-up plus one epoch."""
        best = min(pairs(self.cfg), key=lambda c: self.epoch_s(*c))
        return best, self.startup + self.epoch_s(*best)


def margin_s(limit_s: float) -> float:
    return MARGIN[0] * limit_s + MARGIN[1]


def plan(cfg: SweepConfig, cal: Calibration, sizes: Sizes, limit_s: float, elapsed_s: float = 0.0,
         source: str = "time_limit", resumed: bool = False) -> BudgetPlan:
    """The sweep's share of ``limit_s`` and the cuts (module docstring) that fit ``cfg`` into it, ``elapsed_s``
    being spent already (data, calibration). ``resumed``: nothing is cut (Tune restores the trials), only the
    shares are planned. Raises a one-line ``ConfigError`` when one epoch of the cheapest trial cannot fit."""
    est = _Estimator(cfg, cal, sizes)
    limited = f"{source} {format_duration(limit_s)}"
    (model, size), first = est.cheapest()
    need = elapsed_s + sum((est.stages(_Shape(1, 1, 1, 1, None), [(model, size)]) | {"sweep": first}).values())
    if need + margin_s(limit_s) > limit_s:
        rate = cal.rate(model, size)
        suggest = (need + MARGIN[1]) / (1 - MARGIN[0])
        raise ConfigError(f"{limited}: one epoch of the cheapest trial ({model}@{rate.input_size}) needs "
                          f"~{format_duration(need)} with the calibration, its start-up, its TTA and the "
                          f"ensembles+report (calibrated on {cal.device}: {rate.train_ips:.0f} training, "
                          f"{rate.infer_ips:.0f} inference images/s); give at least {_at_least(suggest)}")
    a = cfg.asha
    pbt = cfg.scheduler == "pbt"
    spec = cfg.search_space.get("img_size")
    discrete = bool(spec) and sampler_of(spec)[0] in ("choice", "grid")
    shape = _Shape(cfg.num_samples, cfg.train.epochs if pbt else a.max_t, cfg.train.epochs if pbt else a.grace_period,
                   cfg.train.epochs, list(sampler_of(spec)[1]) if discrete else None)
    budget = limit_s - elapsed_s - margin_s(limit_s)

    def fits(s: _Shape) -> bool:
        return sum(est.stages(s).values()) <= budget

    cuts: list[str] = []
    if not resumed:
        shape, cuts = _cut(cfg, est, shape, fits)
    stages = est.stages(shape)
    if not fits(shape) and not resumed:  # resumed: the estimate is the whole sweep's, not what is left of it
        cuts.append(f"estimate still {format_duration(sum(stages.values()) - budget)} over: the deadline decides")
    reserve = stages["tta"] + stages["ensembles_report"]
    shares = {"calibration": elapsed_s, "sweep": max(0.0, budget - reserve), "tta": stages["tta"],
              "ensembles_report": stages["ensembles_report"], "margin": margin_s(limit_s)}
    return BudgetPlan(limit_s, source, shares, stages, shape.n, shape.max_t, shape.grace, shape.epochs, shape.sizes,
                      cuts, first, resumed=resumed)


def _cut(cfg: SweepConfig, est: _Estimator, s: _Shape, fits: Callable[[_Shape], bool]) -> tuple[_Shape, list[str]]:
    """Cut ``s`` in the documented order until it ``fits``; returns the shape and the cuts as people read them."""
    pbt, eta = cfg.scheduler == "pbt", cfg.asha.reduction_factor
    was = _Shape(s.n, s.max_t, s.grace, s.epochs, list(s.sizes) if s.sizes else s.sizes)
    floor_n = min(s.n, max(2, cfg.ensemble_top_k))
    floor_len = max(1, cfg.train.freeze_epochs + 1, cfg.pbt.perturbation_interval + 1 if pbt else 1)
    epochs_follow = "epochs" not in cfg.search_space and (pbt or cfg.asha.max_t == cfg.train.epochs)

    def shorter(s: _Shape, to_grace: bool) -> bool:
        """The last rung cut (``to_grace``: not below the first rung), else one epoch less."""
        if pbt or s.max_t == s.grace:
            if to_grace and not pbt or s.max_t <= floor_len:
                return False
            s.max_t = s.grace = s.max_t - 1
        else:
            s.max_t = rungs(s.grace, eta, s.max_t)[-2]
        s.epochs = s.max_t if epochs_follow else s.epochs
        return True

    steps = [lambda s: s.n > floor_n and _dec(s),
             lambda s: shorter(s, to_grace=True),
             lambda s: s.sizes is not None and len(s.sizes) > 1 and _drop_size(est, s),
             lambda s: s.n > 1 and _dec(s),
             lambda s: shorter(s, to_grace=False)]
    for step in steps:
        while not fits(s) and step(s):
            pass
    cuts = []
    if s.n != was.n:
        cuts.append(f"num_samples {was.n} → {s.n}")
    if s.max_t != was.max_t and not pbt:
        cuts.append(f"asha.max_t {was.max_t} → {s.max_t}" + (f" (grace_period {was.grace} → {s.grace})"
                                                            if s.grace != was.grace else ""))
    if s.epochs != was.epochs:
        cuts.append(f"train.epochs {was.epochs} → {s.epochs}")
    cuts += [f"img_size {z} dropped" for z in (was.sizes or []) if z not in (s.sizes or [])]
    return s, cuts


def _dec(s: _Shape) -> bool:
    s.n -= 1
    return True


def _drop_size(est: _Estimator, s: _Shape) -> bool:
    """Drop the ``img_size`` candidate whose epochs cost the most (over the sweep's models)."""
    worst = max(s.sizes, key=lambda z: sum(est.epoch_s(m, z) for m in est.cfg.models()))
    s.sizes = [z for z in s.sizes if z != worst]
    return True


# -- the sweep's deadline --------------------------------------------------------------------------------------
@dataclass
class SweepDeadline:
    """The sweep's end on ``clock``, enforced at epoch boundaries (module docstring); it records what it cut.

    Tune's adapter (``fer_ray.sweep.BudgetGuard``) asks ``stop_trial`` after every result and ``stop_sweep`` after
    every step of its loop, and tells ``running`` which trials run.
    """

    end: float
    """``clock()`` time by which the sweep's trials are done."""
    new_trial_s: float
    """Start-up plus one epoch of the cheapest trial (``BudgetPlan.new_trial_s``)."""
    max_epochs: int
    """Epochs a trial runs at most: a result at this epoch ends its trial anyway, and is not a cut."""
    epoch_overhead_s: float = EPOCH_OVERHEAD_S
    clock: Clock = time.monotonic
    epoch_s: dict[str, float] = field(default_factory=dict)
    """Trial → its longest measured epoch (``epoch_time_s``) so far."""
    running: set[str] | None = None
    """The trials Tune had running at the end of its last step (``None``: not told yet)."""
    cut: dict[str, dict] = field(default_factory=dict)
    """Trial → ``{"epoch", "of", "why"}`` for each trial the budget stopped."""
    stopped_sweep: str | None = None
    """Why the sweep was ended early (no trial could finish an epoch any more, or the deadline), if it was."""
    guarded: bool = False
    """Set by the Tune adapter when the sweep starts: a resumed experiment from before time limits has none."""
    last_epoch: dict[str, int] = field(default_factory=dict)

    def left(self) -> float:
        return self.end - self.clock()

    def stop_trial(self, trial_id: str, result: dict) -> bool:
        """Whether ``trial_id`` stops after this result: its next epoch would end after the deadline."""
        epoch = int(result.get("epoch", 0))
        self.last_epoch[trial_id] = epoch
        seen = float(result.get("epoch_time_s", 0.0))
        self.epoch_s[trial_id] = next_epoch = max(self.epoch_s.get(trial_id, 0.0), seen)
        left = self.left()
        if epoch >= self.max_epochs or left >= next_epoch + self.epoch_overhead_s:
            return False
        self.cut[trial_id] = {"epoch": epoch, "of": self.max_epochs,
                              "why": f"its next epoch (~{format_duration(next_epoch)}) would end after the sweep's "
                                     f"deadline ({format_duration(max(left, 0))} left)"}
        print(f"[budget] {trial_id} stopped after epoch {epoch} of {self.max_epochs}: {self.cut[trial_id]['why']}",
              flush=True)
        return True

    def stop_sweep(self) -> bool:
        """Whether the whole sweep ends now: the deadline has passed (every running trial is stopped, its completed
        epochs kept), or nothing runs and not even the cheapest trial could start and finish an epoch."""
        if self.stopped_sweep:
            return True
        left = self.left()
        if left <= 0:
            for t in sorted(self.running or ()):
                self.cut.setdefault(t, {"epoch": self.last_epoch.get(t, 0), "of": self.max_epochs,
                                        "why": "running at the sweep's deadline (its completed epochs are kept)"})
            self.stopped_sweep = "the sweep's deadline passed"
        elif self.running == set() and left < self.new_trial_s:
            self.stopped_sweep = (f"no trial could start and finish an epoch in the {format_duration(left)} left "
                                  f"(the cheapest needs ~{format_duration(self.new_trial_s)})")
        if self.stopped_sweep:
            print(f"[budget] sweep ended: {self.stopped_sweep}", flush=True)
        return bool(self.stopped_sweep)

    def record(self) -> dict:
        """What the deadline did, for ``budget.json``."""
        return {"cut_trials": self.cut, "stopped_sweep": self.stopped_sweep, "guarded": self.guarded}


_ARMED: list[SweepDeadline] = []


@contextlib.contextmanager
def arm(deadline: SweepDeadline | None) -> Iterator[None]:
    """Make ``deadline`` the one Tune's budget guard enforces while the block runs (``None``: no deadline)."""
    _ARMED.append(deadline)
    try:
        yield
    finally:
        _ARMED.pop()


def armed() -> SweepDeadline | None:
    """The deadline of the sweep running in this process, if it has one."""
    return _ARMED[-1] if _ARMED else None


def start(cfg: SweepConfig, exp, data, splits: dict, limit_s: float, stages: StageClock, source: str = "time_limit",
          resumed: bool = False, num_cpus: int | None = None) -> tuple[SweepConfig, SweepDeadline]:
    """Calibrate, plan and print the plan; write it to ``budget.json`` (``exp``: an ``Experiment``); return the
    planned sweep config (``cfg`` itself on ``--resume``) and its deadline. Raises ``plan``'s one-line error."""
    from fer_ray.names import SPLIT_ROLES

    cal = calibrate(cfg, data, splits, num_cpus=num_cpus, clock=stages.clock)
    p = plan(cfg, cal, Sizes.of(splits, {k: SPLIT_ROLES[k] for k in splits}), limit_s, stages.elapsed(), source,
             resumed)
    stages.mark("calibration")
    print(f"[budget] calibrated {len(cal.rates)} model/size pair(s) on {cal.device} in {cal.seconds:.1f}s: "
          + ", ".join(f"{r.model}@{r.input_size} {r.train_ips:.0f}/{r.infer_ips:.0f} img/s" for r in cal.rates)
          + " (training/inference)", flush=True)
    for line in p.lines():
        print(f"[budget] {line}", flush=True)
    kept = (exp.budget() or {}).get("cut_trials", {})  # a resumed experiment's earlier cuts
    exp.write_budget({"limit_s": limit_s, "source": source, "calibration": cal.to_dict(), "plan": p.to_dict(),
                      "cut_trials": kept})
    deadline = SweepDeadline(end=stages.t0 + p.shares_s["calibration"] + p.shares_s["sweep"],
                             new_trial_s=p.new_trial_s, max_epochs=p.max_epochs, clock=stages.clock)
    return (cfg if resumed else p.apply(cfg)), deadline


def finish(exp, stages: StageClock, final: bool = False) -> str:
    """Write the stage times so far into ``budget.json`` (``final``: with the total) and return the summary line."""
    info = exp.budget()
    info["actual_s"] = dict(stages.times) | ({"total": stages.elapsed()} if final else {})
    exp.write_budget(info)
    return summary_line(info)


def record_deadline(exp, deadline: SweepDeadline) -> None:
    """Add what ``deadline`` did to the experiment's ``budget.json`` (trials cut by an earlier invocation stay)."""
    info = exp.budget() or {}
    rec = deadline.record()
    with_history = set(exp.trial_ids())  # a trial stopped before its first epoch has none
    for trial_id, cut in rec["cut_trials"].items():  # an epoch can end at the deadline, after Tune's last report
        if trial_id in with_history:
            cut["epoch"] = max(cut["epoch"], len(exp.history(trial_id)))
    info["cut_trials"] = info.get("cut_trials", {}) | rec["cut_trials"]
    info["stopped_sweep"], info["guarded"] = rec["stopped_sweep"], rec["guarded"]
    if not deadline.guarded:
        print("[budget] this experiment's Tune state has no budget guard (it started before fer_ray had time "
              "limits): its sweep was not held to the deadline", flush=True)
    exp.write_budget(info)


# -- what the budget did ---------------------------------------------------------------------------------------
class StageClock:
    """The invocation's stage times on ``clock`` from ``t0`` (the command's start)."""

    def __init__(self, t0: float, clock: Clock = time.monotonic):
        self.t0, self.clock, self.times, self._last = t0, clock, {}, t0

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def mark(self, stage: str) -> float:
        """End ``stage`` now; returns its seconds."""
        now = self.clock()
        self.times[stage] = now - self._last
        self._last = now
        return self.times[stage]


def summary_line(info: dict) -> str:
    """One line from ``budget.json``: the limit, each stage against its share, what the budget cut."""
    p = info["plan"]
    sh, actual = p["shares_s"], info.get("actual_s", {})
    parts = [f"time limit {format_duration(p['limit_s'])}"]
    if "sweep" in actual:
        parts.append(f"sweep {format_duration(actual['sweep'])} (planned {format_duration(sh['sweep'])})")
    cuts = info.get("cut_trials", {})
    if cuts:
        at = sorted({c["epoch"] for c in cuts.values()})
        parts.append(f"{len(cuts)} trial{'s' if len(cuts) > 1 else ''} stopped early by the budget at epoch "
                     f"{', '.join(map(str, at))} of {next(iter(cuts.values()))['of']}")
    if info.get("stopped_sweep"):
        parts.append(f"sweep ended early ({info['stopped_sweep']})")
    if p["cuts"]:
        parts.append("plan cut " + ", ".join(p["cuts"]))
    for stage, name in (("tta", "TTA"), ("ensembles_report", "ensembles+report")):
        if stage in actual:
            parts.append(f"{name} {format_duration(actual[stage])} (planned {format_duration(sh[stage])})")
    if "total" in actual:
        over = actual["total"] - p["limit_s"]
        parts.append(f"finished {format_duration(actual['total'])}" + (
            f" ({100 * over / p['limit_s']:.1f} % over)" if over > 0 else ""))
    return "; ".join(parts)
