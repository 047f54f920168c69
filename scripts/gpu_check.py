#!/usr/bin/env python3
"""The GPU proof of issue 14: one process that shows fer_ray's GPU paths work, and how fast.

This script owns ``make gpu-check``. Its first five sections run without Ray: every model trains through
``fer_ray.loop.TrainingRun`` (the loop each Ray trial runs, ``fer_ray.train.train_loop_per_worker``) with small
hooks recording what the check needs (``Record``, ``OutputDtypes``, ``Budget``), so what the GPU proves is that
loop. It writes ``gpu_check_<date>.json`` and ``.md`` into ``--out``. Sections, in this order, each written to both
files as it progresses (a run cut short keeps what it finished), each wrapped so that an exception is recorded
(with its traceback tail) and the next section still runs:

a. ``environment``: GPU, compute capability, memory, torch/CUDA, arch list, ``gpu.preflight``'s verdict, the AMP
   dtype ``engine.autocast_dtype`` picks, package versions;
b. ``correctness``: ``TrainingRun.fit`` of 30 one-step epochs on a fixed batch for a seed CNN, a ResNet and a timm
   model in fp32, bf16 autocast and fp16 + GradScaler (finite, decreasing loss); a world-size-1
   ``torch.distributed`` group (nccl; gloo on the CPU) around ``DistributedDataParallel`` (``TrainingRun``'s
   ``wrap``); ``tta.tta_logits`` of a trained model on the device against the CPU (fp32, TF32 off, within 1e-3);
c. ``throughput``: training and TTA-inference images/s of every registered model at its resolution, fp32 and AMP,
   channels-last, with GMACs and achieved TFLOP/s against the bf16 matmul peak measured in the same run;
d. ``accuracy``: the recipe of ``--recipe`` (``sweeps/fer2013_gpu.yaml``) trained on FER-2013 Training for a wall
   budget with the hooks a trial runs (EMA, early stopping), the best-val weights TTA-scored on PublicTest (plus a
   snapshot ensemble of the best epochs);
e. ``packing``: aggregate training images/s of 1, 2 and 4 concurrent processes training basic_cnn on the one
   device, and the GPU fraction per trial it recommends.

``--device cpu --smoke`` runs every section on synthetic data in a few CPU minutes (``tests/test_gpu_check.py``).
The smoke does fixed work (``Plan.smoke``: steps and epochs, never seconds) with every budget off, so no verdict of
it depends on the machine's speed; the budgets (``--*-s``) hold for the real run, and the tests drive them with an
injected clock (``Context.clock``, ``Budget``). The repository root is put on ``sys.path``, so fer_ray need not be
installed.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT / "scripts"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fer_ray import engine, flops  # noqa: E402
from fer_ray.config import AugmentConfig, TrainConfig  # noqa: E402
from fer_ray.data import FERData, split_indices, synthetic  # noqa: E402
from fer_ray.loop import EMA, EarlyStopping, Hook, TrainingRun, build_model  # noqa: E402
from fer_ray.models import list_models, model_cfg  # noqa: E402

SECTIONS = ("environment", "correctness", "throughput", "accuracy", "packing", "ray")
RAY_FREE = SECTIONS[:-1]
"""The sections that never import Ray (the report records ``ray_imported`` after each)."""
CORRECTNESS_MODELS = ("basic_cnn", "resnet_fer", "timm/resnet18")
PRECISIONS = {"fp32": "off", "bf16": "bf16", "fp16": "fp16"}
TTA_VIEWS = ("identity", "hflip", "shift2,0")


@dataclass
class Plan:
    """Sizes of every section; ``smoke()`` shrinks them to a CPU minute on synthetic data."""

    steps: int = 30
    batch: int = 64
    loss_window: int = 5
    ddp_steps: int = 5
    tta_images: int = 256
    models: list[str] = field(default_factory=list)
    tp_batch: int = 256
    tp_batch_large: int = 128
    tp_infer_batch: int = 1024
    tp_target_s: float = 0.6
    mm_n: int = 8192
    correctness_img_size: dict = field(default_factory=dict)
    """Model → input size for the correctness runs (default: the model's own)."""
    tp_img_size: dict = field(default_factory=dict)
    """Model → input size for the throughput rows (default: the model's own; the smoke shrinks the big ones)."""
    acc_model: str | None = None
    synthetic_n: int = 2000
    packing_ks: tuple[int, ...] = (1, 2, 4)
    packing_s: float = 8.0
    packing_batch: int = 64
    # Fixed work instead of timed work (``--smoke``): no verdict of the smoke may depend on the machine's speed.
    tp_steps: int | None = None
    """Timed training steps (and ``tp_steps × tp_infer_batch`` TTA images) per throughput row, instead of filling
    ``tp_target_s``."""
    acc_epochs: int | None = None
    """Accuracy epochs, instead of the epochs a timing probe says fit the budget."""
    packing_steps: int | None = None
    """Training steps per worker and packing round, instead of ``packing_s`` seconds."""
    ray_epochs: int = 2
    ray_synthetic_n: int = 2000
    fp16_models: tuple[str, ...] | None = None
    """The correctness models also trained in fp16 + GradScaler (``None``: every one). The smoke runs fp16 for its
    first model only (at 24 px): on a CPU fp16 autocast's convolution backward takes a slow path (18-21 s a run of
    basic_cnn at 48 px where fp32 and bf16 take 1-3 s, measured 2026-12-07), and its code path, autocast plus the
    scaler, is the same whatever the model; the GPU run trains every model in fp16."""

    def precisions(self, model: str) -> list[str]:
        """The precisions the correctness section trains ``model`` in."""
        return [p for p in PRECISIONS if p != "fp16" or self.fp16_models is None or model in self.fp16_models]

    @classmethod
    def smoke(cls) -> Plan:
        return cls(steps=12, batch=8, loss_window=3, ddp_steps=2, tta_images=16, models=["basic_cnn", "resnet_fer"],
                   tp_batch=16, tp_batch_large=8, tp_infer_batch=32, tp_target_s=0.15, mm_n=256,
                   correctness_img_size={"basic_cnn": 24, "resnet_fer": 16, "timm/resnet18": 16},
                   tp_img_size={"resnet_fer": 16}, acc_model="basic_cnn",
                   synthetic_n=600, packing_ks=(1, 2), packing_s=1.0, packing_batch=16, tp_steps=4, acc_epochs=2,
                   packing_steps=16, ray_synthetic_n=300, fp16_models=("basic_cnn",))


@dataclass
class Context:
    args: argparse.Namespace
    device: torch.device
    plan: Plan
    emit: Callable
    deadline: float
    trained: dict = field(default_factory=dict)
    clock: Callable[[], float] = time.perf_counter
    """What ``left`` reads (the tests inject one): budgets are the only thing the wall clock decides."""

    def left(self) -> float:
        """Seconds left of the section's budget (``inf`` with ``--smoke``, whose sections do fixed work)."""
        return self.deadline - self.clock()


def log(section: str, msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] [{section}] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def amp_name(dtype: torch.dtype | None) -> str:
    """An AMP dtype as reported: ``torch.bfloat16``/``torch.float16``, or ``off (fp32)`` for no autocast."""
    return str(dtype) if dtype else "off (fp32)"


def jsonable(x):
    """Report values as strict JSON: NaN/inf → null, dtypes and devices → str, tuples → lists."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, float | np.floating):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, bool | int | str) or x is None:
        return x
    return str(x)


# ----------------------------------------------------------------------------------------------------- the report


class Report:
    """The JSON + Markdown pair, rewritten atomically after every update so a killed run leaves a valid report."""

    def __init__(self, out: Path, meta: dict, stem: str | None = None):
        out.mkdir(parents=True, exist_ok=True)
        stem = stem or f"gpu_check_{datetime.date.today().isoformat()}"
        self.json_path, self.md_path = out / f"{stem}.json", out / f"{stem}.md"
        self.doc = {"meta": jsonable(meta), "sections": {}}

    def update(self, name: str, **values) -> None:
        self.doc["sections"].setdefault(name, {"status": "running"}).update(jsonable(values))
        self.write()

    def run(self, name: str, fn, ctx: Context) -> None:
        log(name, "start")
        self.update(name, status="running")
        t0 = time.perf_counter()
        ctx.emit = lambda **kv: self.update(name, **kv)
        try:
            result = fn(ctx) or {}
            self.update(name, **({"status": "ok"} | result))  # a section may say it was skipped
        except Exception as e:  # noqa: BLE001 - record it and go on with the next section
            self.update(name, status="error", error=f"{type(e).__name__}: {e}",
                        traceback=traceback.format_exc()[-4000:])
            log(name, f"ERROR {type(e).__name__}: {e}")
        self.update(name, elapsed_s=time.perf_counter() - t0, ray_imported="ray" in sys.modules)
        log(name, f"{self.doc['sections'][name]['status']} in {time.perf_counter() - t0:.1f} s")

    def write(self) -> None:
        self.doc["meta"]["updated"] = datetime.datetime.now().isoformat(timespec="seconds")
        self.doc["meta"]["ray_imported"] = "ray" in sys.modules
        _atomic_write(self.json_path, json.dumps(self.doc, indent=1, allow_nan=False) + "\n")
        _atomic_write(self.md_path, render_markdown(self.doc))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list | dict):
        return json.dumps(v)
    return "" if v is None else str(v)


def _table(rows: list[dict]) -> list[str]:
    cols = [c for c in dict.fromkeys(k for r in rows for k in r) if c not in ("traceback", "losses")]  # JSON only
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return lines + [""]


def render_markdown(doc: dict) -> str:
    meta = doc["meta"]
    lines = [f"# fer_ray GPU check, {meta['date']}: {meta['device_name']}", "",
             f"`{meta['command']}` (updated {meta['updated']}; Ray imported: {meta['ray_imported']})", ""]
    for name, sec in doc["sections"].items():
        lines += [f"## {'abcdef'[SECTIONS.index(name)]}. {name}: {sec.get('status')} ({_cell(sec.get('elapsed_s'))} s)",
                  ""]
        for key, value in sec.items():
            if key in ("status", "elapsed_s", "traceback", "ray_imported"):
                continue
            if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
                lines += [f"**{key}**", "", *_table(value)]
            else:
                lines.append(f"- {key}: {_cell(value)}")
        if "traceback" in sec:
            lines += ["", "```", sec["traceback"].rstrip(), "```"]
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ shared helpers
#
# Every model here trains through ``fer_ray.loop.TrainingRun``, the loop each Ray trial runs
# (``fer_ray.train.train_loop_per_worker``), with the hooks below recording what the check needs: what the GPU
# proves is that loop, not a copy of it.


def run_arrays(images: np.ndarray, labels: np.ndarray, train: np.ndarray | None = None,
               val: np.ndarray | None = None) -> dict:
    """The ``arrays`` a ``TrainingRun`` takes (``FERData.to_arrays()`` plus ``splits``; the trial gets the same from
    the object store); ``train``/``val`` default to every image."""
    every = np.arange(len(images))
    return {"images": images, "labels": labels.astype(np.int64),
            "splits": {"train": every if train is None else train, "val": every if val is None else val}}


def synthetic_arrays(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    d = synthetic.generate(n, seed=seed)
    return d.images, d.labels.astype(np.int64)


def random_arrays(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random 48-px faces and balanced labels: throughput and packing need shapes, not content."""
    g = np.random.default_rng(seed)
    return g.integers(0, 256, (n, 48, 48), dtype=np.uint8), np.arange(n, dtype=np.int64) % 7


class Record(Hook):
    """Keeps every epoch's metrics and the ``keep`` best-val states (``(val_acc, epoch, state)``, the later epoch on
    ties, as ``fer_ray.loop.best_entry`` selects); ``on_epoch(run, metrics)`` is called after each epoch."""

    def __init__(self, keep: int = 0, on_epoch: Callable | None = None):
        self.keep, self.on_epoch = keep, on_epoch
        self.epochs: list[dict] = []
        self.best: list[tuple[float, int, dict]] = []

    def after_epoch(self, run: TrainingRun, metrics: dict) -> None:
        self.epochs.append(metrics)
        if self.keep:
            state = {k: v.detach().clone() for k, v in run.module.state_dict().items()}
            self.best = sorted([*self.best, (metrics["val_acc"], run.epoch, state)],
                               key=lambda b: (-b[0], -b[1]))[:self.keep]
        if self.on_epoch:
            self.on_epoch(run, metrics)


class OutputDtypes(Hook):
    """The dtypes of the model's outputs while the run trains (autocast's doing: bf16/fp16 logits under AMP)."""

    def __init__(self):
        self.dtypes: set[str] = set()
        self._handle = None

    def before_train(self, run: TrainingRun) -> None:
        self._handle = run.module.register_forward_hook(lambda m, i, o: self.dtypes.add(str(o.dtype)))

    def after_train(self, run: TrainingRun) -> None:
        self._handle.remove()


class Budget(Hook):
    """Ends training (``run.stop``) when the next epoch would end past ``seconds`` after training began, at the mean
    epoch time so far; ``inf`` never stops. ``clock``: injected by the tests."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.perf_counter):
        self.seconds, self.clock, self.stopped, self.t0, self.epochs = seconds, clock, False, 0.0, 0

    def before_train(self, run: TrainingRun) -> None:
        self.t0, self.epochs = self.clock(), 0

    def after_epoch(self, run: TrainingRun, metrics: dict) -> None:
        self.epochs += 1
        elapsed = self.clock() - self.t0
        if elapsed * (self.epochs + 1) / self.epochs > self.seconds and run.epoch < run.cfg.epochs:
            run.stop = self.stopped = True


def train_steps(run: TrainingRun, steps: int, epoch: int) -> dict:
    """``steps`` optimizer steps of ``engine.train_one_epoch`` on the run's first ``steps`` batches, with the run's
    own model, optimizer, preprocess, augment, GradScaler and loss (the call ``TrainingRun.train_epoch`` makes),
    without the evaluation: what the throughput table times."""
    b = run.cfg.batch_size
    return engine.train_one_epoch(run.model, run.train_x[:steps * b], run.train_y[:steps * b], run.optimizer,
                                  run.preprocess, run.augment, run.cfg, epoch, scaler=run.scaler, loss_fn=run.loss_fn)


def load_data(args: argparse.Namespace, plan: Plan) -> tuple[FERData, str]:
    """The synthetic set with ``--smoke``, else the ``--data`` pack (``scripts/pack_fer2013.py``'s format)."""
    if args.smoke:
        return synthetic.generate(plan.synthetic_n, seed=0), f"synthetic ({plan.synthetic_n} images)"
    if not args.data:
        raise ValueError("--data PATH (a pack written by scripts/pack_fer2013.py) is needed without --smoke")
    from pack_fer2013 import read_pack

    return read_pack(args.data), str(args.data)


# --------------------------------------------------------------------------------------------- a. environment


def _cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` is empty on most Linux hosts)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown"
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown")


def section_environment(ctx: Context) -> dict:
    from importlib import metadata

    from fer_ray.gpu import preflight

    dev = ctx.device
    out = {"device": str(dev), "python": sys.version.split()[0], "platform": platform.platform(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "cpu_count": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "cpu_model": _cpu_model()}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        out |= {"gpu": props.name, "capability": ".".join(map(str, torch.cuda.get_device_capability(dev))),
                "memory_gib": props.total_memory / 2**30, "multiprocessors": props.multi_processor_count,
                "arch_list": torch.cuda.get_arch_list(), "driver_cuda_ok": torch.cuda.is_available()}
    try:
        preflight(dev)
        out["preflight"] = "ok"
    except Exception as e:  # noqa: BLE001 - the verdict is the result
        out["preflight"] = f"{type(e).__name__}: {e}"
    out["amp_dtype_auto"] = amp_name(engine.autocast_dtype(TrainConfig(), dev))
    out["amp_dtype"] = {amp: amp_name(engine.autocast_dtype(TrainConfig(amp=amp), dev)) for amp in ("bf16", "fp16")}
    out["grad_scaler_for_fp16"] = type(engine.grad_scaler(dev, torch.float16)).__name__
    versions = {}
    for pkg in ("timm", "kornia", "kornia_rs", "fvcore", "iopath", "numpy", "torchvision", "pyyaml", "ray", "pydantic",
                "aiohttp", "grpcio", "protobuf", "pandas", "pyarrow"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "absent"
    out |= {"packages": versions, "fvcore_error": flops.FVCORE_ERROR}
    log("environment", f"{out.get('gpu', 'cpu')} preflight={out['preflight']} amp(auto)={out['amp_dtype_auto']}")
    return out


# --------------------------------------------------------------------------------------------- b. correctness


def fixed_batch_config(name: str, precision: str, plan: Plan, **kw) -> TrainConfig:
    return TrainConfig(model=name, img_size=plan.correctness_img_size.get(name), amp=PRECISIONS[precision],
                       batch_size=plan.batch, epochs=plan.steps, optimizer="adam", lr=1e-3, scheduler="none",
                       augment=AugmentConfig(strength=0.0, hflip=0.5), num_workers=0, **kw)


def train_fixed_batch(ctx: Context, name: str, precision: str) -> dict:
    """``TrainingRun.fit`` of ``plan.steps`` one-step epochs on one fixed batch (train and val: it must overfit);
    the fp32 run is kept in ``ctx.trained`` for the TTA comparison."""
    plan, dev = ctx.plan, ctx.device
    cfg = fixed_batch_config(name, precision, plan)
    run = TrainingRun(cfg, run_arrays(*synthetic_arrays(plan.batch, seed=1)), dev)
    rec, dtypes = Record(), OutputDtypes()
    t0 = time.perf_counter()
    run.fit([dtypes, rec])
    losses = [m["train_loss"] for m in rec.epochs]
    w = plan.loss_window
    first, last = float(np.mean(losses[:w])), float(np.mean(losses[-w:]))
    ok = bool(np.all(np.isfinite(losses)) and last < first and len(losses) == plan.steps)
    row = {"model": name, "img_size": run.fer_cfg["img_size"], "precision": precision,
           "amp_dtype": amp_name(run.amp_dtype), "logits_dtype": ",".join(sorted(dtypes.dtypes)),
           "scaler": type(run.scaler).__name__ if run.scaler else None,
           "scale": run.scaler.get_scale() if run.scaler else None, "steps": len(losses),
           f"loss_first{w}": first, f"loss_last{w}": last, "finite": bool(np.all(np.isfinite(losses))),
           "decreasing": last < first, "pass": ok, "s": time.perf_counter() - t0,
           "losses": [round(float(x), 6) for x in losses], "threads": torch.get_num_threads()}
    log("correctness", f"{name} {precision}: loss {first:.3f} -> {last:.3f} ({'ok' if ok else 'FAIL'})")
    if precision == "fp32":
        ctx.trained[name] = run
    return row


def ddp_check(ctx: Context) -> dict:
    """A world-size-1 process group (nccl on CUDA, gloo on the CPU) around DDP (``TrainingRun``'s ``wrap``, as Ray
    Train's ``prepare_model`` wraps it), trained by ``TrainingRun.fit`` under the trainer's AMP rule."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dev, plan = ctx.device, ctx.plan
    backend = "nccl" if dev.type == "cuda" else "gloo"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, rank=0, world_size=1, timeout=datetime.timedelta(seconds=120))
    try:
        t = torch.full((4,), 3.0, device=dev)
        dist.all_reduce(t)
        cfg = TrainConfig(model="basic_cnn", batch_size=plan.batch, epochs=plan.ddp_steps, num_workers=1,
                          scheduler="none")
        ids = [dev.index or 0] if dev.type == "cuda" else None
        run = TrainingRun(cfg, run_arrays(*synthetic_arrays(plan.batch, seed=2)), dev, rank=0, world=1,
                          wrap=lambda m: DistributedDataParallel(m, device_ids=ids))
        before = [p.detach().clone() for p in run.module.parameters()]
        rec = Record()
        run.fit([rec])
        losses = [m["train_loss"] for m in rec.epochs]
        changed = any(not torch.equal(a, b) for a, b in zip(before, run.module.parameters()))
        wrapped = type(run.model).__name__
    finally:
        dist.destroy_process_group()
    ok = bool(t.sum().item() == 12.0 and changed and np.all(np.isfinite(losses))
              and wrapped == "DistributedDataParallel")
    log("correctness", f"DDP {backend} world 1: losses {[round(x, 3) for x in losses]} ({'ok' if ok else 'FAIL'})")
    return {"backend": backend, "all_reduce_ok": t.sum().item() == 12.0, "amp_dtype": amp_name(run.amp_dtype),
            "wrapped_as": wrapped, "losses": losses, "params_changed": changed, "pass": ok}


def tta_device_vs_cpu(ctx: Context, run: TrainingRun) -> dict:
    """``tta_logits`` of one trained run's model (through a saved state dict) on the device and on the CPU, fp32."""
    from fer_ray import tta

    dev, model = ctx.device, run.module
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    cpu_model = build_model(run.cfg)
    cpu_model.load_state_dict(torch.load(buf, map_location="cpu", weights_only=True))
    images = torch.from_numpy(synthetic_arrays(ctx.plan.tta_images, seed=3)[0])
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        on_dev = tta.tta_logits(model, images.to(dev), list(TTA_VIEWS)).cpu()
        on_cpu = tta.tta_logits(cpu_model, images, list(TTA_VIEWS))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    diff = (on_dev - on_cpu).abs().max().item()
    agree = (on_dev.mean(0).argmax(1) == on_cpu.mean(0).argmax(1)).float().mean().item()
    log("correctness", f"TTA {run.cfg.model} {dev.type} vs cpu: max |diff| {diff:.2e}")
    return {"model": run.cfg.model, "views": list(TTA_VIEWS), "images": len(images),
            "max_abs_diff": diff, "argmax_agreement": agree, "tolerance": 1e-3, "pass": diff <= 1e-3}


def attempt(what: str, fn, *args, section: str = "correctness") -> dict:
    """``fn(*args)``, or ``{"pass": False, "error": ...}`` when it raises: one failed check does not end the section."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - recorded in the report
        log(section, f"{what}: ERROR {type(e).__name__}: {e}")
        return {"pass": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}


def section_correctness(ctx: Context) -> dict:
    rows, skipped = [], []
    for name in CORRECTNESS_MODELS:
        if ctx.trained and ctx.left() <= 0:
            skipped.append(name)
            continue
        for precision in ctx.plan.precisions(name):
            rows.append({"model": name, "precision": precision}
                        | attempt(f"{name} {precision}", train_fixed_batch, ctx, name, precision))
            ctx.emit(training=rows, skipped_for_budget=skipped)
    ddp = attempt("DDP", ddp_check, ctx)
    ctx.emit(ddp=ddp)
    trained = ctx.trained.get("resnet_fer") or next(iter(ctx.trained.values()), None)
    tta_cmp = attempt("TTA device vs cpu", tta_device_vs_cpu, ctx, trained)
    failed = [f"{r['model']}/{r['precision']}" for r in rows if not r["pass"]]
    failed += [name for name, check in (("ddp", ddp), ("tta_device_vs_cpu", tta_cmp)) if not check["pass"]]
    return {"training": rows, "skipped_for_budget": skipped, "ddp": ddp, "tta_device_vs_cpu": tta_cmp,
            "failed_checks": failed}


# ---------------------------------------------------------------------------------------------- c. throughput


def matmul_peak_tflops(device: torch.device, n: int, repeat: int = 10) -> float:
    """bf16 ``torch.mm`` of two ``n``×``n`` matrices: 3 warm-ups, then the mean of ``repeat`` timed products."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b)
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            torch.mm(a, b)
        end.record()
        torch.cuda.synchronize(device)
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(repeat):
            torch.mm(a, b)
        seconds = time.perf_counter() - t0
    return 2 * n**3 * repeat / seconds / 1e12


def time_training(run: TrainingRun, target_s: float, steps: int | None = None) -> dict:
    """Warm up, probe the step time, then time enough ``train_steps`` passes over the run's images to fill
    ``target_s`` (each pass ends in ``.item()``, so the device is synchronised); ``steps``: exactly that many
    timed steps instead (fixed work)."""
    b = run.cfg.batch_size
    train_steps(run, 2, 0)  # warm-up: kernels, cuDNN algorithm choice, allocator
    if steps is None:
        probe = train_steps(run, 3, 1)
        steps = max(3, int(target_s / max(probe["train_time_s"] / 3, 1e-6)))
    per_pass = min(steps, len(run.train_x) // b)
    seen, seconds, epoch = 0, 0.0, 2
    while seen < steps * b:
        stats = train_steps(run, per_pass, epoch)
        seen, seconds, epoch = seen + stats["images"], seconds + stats["train_time_s"], epoch + 1
    return {"train_img_s": seen / seconds, "train_steps": seen // b}


def time_inference(model: torch.nn.Module, images: torch.Tensor, amp_dtype, batch: int, target_s: float,
                   n: int | None = None) -> dict:
    """TTA images/s of ``tta_logits`` (``TTA_VIEWS``: one forward pass per image and view) under ``amp_dtype``,
    over enough images to fill ``target_s``, or over ``n`` images (fixed work)."""
    from fer_ray import tta

    dev, views = images.device, list(TTA_VIEWS)
    fast = tta.inference_model(model)
    per = max(1, batch // len(views))

    def run(n: int) -> float:
        t0 = time.perf_counter()
        with engine.autocast(dev, amp_dtype):
            for lo in range(0, n, len(images)):
                tta.tta_logits(fast, images[:min(n - lo, len(images))], views, batch_size=batch)
        sync(dev)
        return time.perf_counter() - t0

    run(per)
    if n is None:
        probe = run(2 * per) / (2 * per)
        n = max(per, int(target_s / max(probe, 1e-7)))
    seconds = run(n)
    return {"infer_img_s": n / seconds, "infer_fwd_s": n * len(views) / seconds, "infer_batch": per * len(views)}


def measure_model(ctx: Context, name: str, amp_cfg: str, peak: float) -> list[dict]:
    plan, dev = ctx.plan, ctx.device
    size = plan.tp_img_size.get(name, model_cfg(name).img_size)
    batch = plan.tp_batch if size <= 96 else plan.tp_batch_large
    arrays = run_arrays(*random_arrays((64 if dev.type == "cuda" else 8) * batch), val=np.arange(7))
    rows, gmacs = [], None
    for precision, amp in (("fp32", "off"), ("amp", amp_cfg)):
        cfg = TrainConfig(model=name, img_size=size, amp=amp, batch_size=batch, optimizer="sgd", lr=0.01, num_workers=0,
                          augment=AugmentConfig(hflip=0.5, rotate=10.0, translate=0.2, scale=0.2, erasing=0.5))
        run = TrainingRun(cfg, arrays, dev)
        if gmacs is None:  # counted once per model: TrainingRun's own profile where it keeps one
            gmacs = (getattr(run, "profile", None) or {}).get("gmacs", None)
            gmacs = flops.count_gmacs(run.module) if gmacs is None else gmacs
        row = {"model": name, "img_size": size, "precision": precision, "amp_dtype": amp_name(run.amp_dtype),
               "batch": batch, "gmacs": gmacs}
        row |= time_training(run, plan.tp_target_s, plan.tp_steps)
        row |= time_inference(run.module, run.train_x.base, run.amp_dtype, plan.tp_infer_batch, plan.tp_target_s,
                              plan.tp_steps and plan.tp_steps * plan.tp_infer_batch)
        row["train_tflops"] = 2 * gmacs * 3 * row["train_img_s"] / 1e3
        row["infer_tflops"] = 2 * gmacs * row["infer_fwd_s"] / 1e3
        row["train_frac_peak"], row["infer_frac_peak"] = row["train_tflops"] / peak, row["infer_tflops"] / peak
        rows.append(row)
        log("throughput", f"{name}@{size} {precision}: train {row['train_img_s']:.0f} img/s, "
                          f"TTA {row['infer_img_s']:.0f} img/s ({row['train_tflops']:.3g} TFLOP/s train)")
        del run
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def section_throughput(ctx: Context) -> dict:
    plan, dev = ctx.plan, ctx.device
    peak = matmul_peak_tflops(dev, plan.mm_n)
    log("throughput", f"bf16 mm {plan.mm_n}^3: {peak:.1f} TFLOP/s")
    rule = engine.autocast_dtype(TrainConfig(), dev)
    amp_cfg = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(rule, "bf16")
    note = "the rule's dtype" if rule else "rule gives fp32 here; bf16 forced to exercise autocast"
    ctx.emit(mm_peak_bf16_tflops=peak, mm_n=plan.mm_n, amp=amp_cfg, amp_note=note, tta_views=list(TTA_VIEWS))
    names = plan.models or sorted(list_models(), key=lambda m: (model_cfg(m).img_size, m))
    rows, skipped = [], []
    for name in names:
        if ctx.left() <= 0:
            skipped.append(name)
            continue
        try:
            rows += measure_model(ctx, name, amp_cfg, peak)
        except Exception as e:  # noqa: BLE001 - one model's failure is a row, not the end of the table
            rows.append({"model": name, "error": f"{type(e).__name__}: {e}"})
            log("throughput", f"{name}: ERROR {type(e).__name__}: {e}")
        ctx.emit(table=rows, skipped_for_budget=skipped)
    return {"table": rows, "skipped_for_budget": skipped, "channels_last": True,
            "errors": [r["model"] for r in rows if "error" in r]}


# ------------------------------------------------------------------------------------------------ d. accuracy


def recipe_config(ctx: Context, sweep) -> TrainConfig:
    """The recipe's ``train`` config run in-process (no DDP workers, no weights download), with the smoke model if
    asked. Its LR schedule becomes a cosine over the epochs run (set in ``train_recipe``): a plateau schedule built
    for 300 epochs would not decay at all in a few minutes."""
    cfg = sweep.train.replace(num_workers=0, scheduler="cosine", pretrained=False)
    model = ctx.args.acc_model or ctx.plan.acc_model
    if model:
        cfg = cfg.replace(model=model)
    if ctx.args.smoke:  # the CPU smoke checks the path, not the recipe's 10 crops per image
        cfg = cfg.replace(aug_repeats=min(cfg.aug_repeats, 2))
    return cfg


def epochs_config(cfg: TrainConfig, epochs: int) -> TrainConfig:
    return cfg.replace(epochs=epochs, warmup_epochs=min(cfg.warmup_epochs, epochs // 10),
                       freeze_epochs=min(cfg.freeze_epochs, epochs - 1))


def plan_epochs(ctx: Context, cfg: TrainConfig, arrays: dict, budget: float) -> tuple[int, float]:
    """Epochs that fit ``budget``: a throwaway ``TrainingRun`` on the first (up to) 25 batches of the training split
    trains two epochs, the second timed, extrapolated to an epoch plus its evaluation (forward only, counted as a
    third of a training step; twice with EMA weights)."""
    splits, b = arrays["splits"], cfg.batch_size
    n_train, n_val = len(splits["train"]), len(splits["val"])
    steps = min(25, max(1, n_train // b))
    probe = TrainingRun(epochs_config(cfg, 2), arrays | {"splits": {"train": splits["train"][:steps * b],
                                                                    "val": splits["val"][:b]}}, ctx.device)
    probe.train_epoch()  # warm-up: kernels, cuDNN algorithm choice, allocator
    m = probe.train_epoch()
    del probe
    per_image = m["train_time_s"] / max(m["images"] / cfg.aug_repeats, 1)  # per dataset image
    epoch_s = per_image * (n_train + n_val / 3 * (2 if cfg.ema.decay else 1))
    return max(1, int(budget / epoch_s)), epoch_s


def train_recipe(ctx: Context, cfg: TrainConfig, arrays: dict, budget: float) -> dict:
    """``TrainingRun.fit`` with the hooks a trial runs (EMA weights when the recipe has them, early stopping), a
    ``Record`` of the 3 best-val states (in memory) and a ``Budget`` that ends training in time. The epochs are
    ``plan.acc_epochs`` (fixed work), else what a timing probe says fits 90 % of the budget."""
    if ctx.plan.acc_epochs:  # fixed work (--smoke): no timing probe decides how much is trained
        epochs, est = ctx.plan.acc_epochs, None
    else:
        epochs, est = plan_epochs(ctx, cfg, arrays, budget * 0.9)
    cfg = epochs_config(cfg, epochs)
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    t0, history = time.perf_counter(), []

    def progress(run: TrainingRun, m: dict) -> None:
        history.append({k: m[k] for k in ("epoch", "train_loss", "val_acc", "val_loss", "val_acc_ema", "lr")
                        if k in m} | {"wall_s": time.perf_counter() - t0})
        log("accuracy", f"{cfg.model} epoch {run.epoch}/{epochs}: val_acc {m['val_acc']:.4f} "
                        f"({time.perf_counter() - t0:.0f} s)")
        ctx.emit(epochs=history)

    run = TrainingRun(cfg, arrays, ctx.device)
    record, budget_stop = Record(keep=3, on_epoch=progress), Budget(budget, ctx.clock)
    hooks = [EMA(cfg.ema.decay, cfg.ema.warmup)] if cfg.ema.decay else []
    run.fit([*hooks, EarlyStopping(cfg.early_stopping), record, budget_stop])
    train_s = time.perf_counter() - t0
    return {"cfg": cfg, "model": run.module, "history": history, "best": record.best, "train_s": train_s,
            "planned_epochs": epochs, "estimated_epoch_s": est, "stopped_by_budget": budget_stop.stopped,
            "hooks": [type(h).__name__ for h in run.hooks]}


def score_public(ctx: Context, run: dict, images: torch.Tensor, labels: torch.Tensor, views: list[str]) -> dict:
    """TTA accuracy on PublicTest of the best-val weights, and of the snapshot ensemble of the best epochs."""
    from fer_ray import tta

    model, cfg = run["model"], run["cfg"]
    amp = engine.autocast_dtype(cfg, ctx.device)
    member_logits = []
    for _, _, state in run["best"]:
        model.load_state_dict(state)
        with engine.autocast(ctx.device, amp):
            member_logits.append(tta.tta_logits(model, images, views, batch_size=1024).float())
    top = member_logits[0]
    acc = lambda logits: (logits.argmax(1) == labels).float().mean().item()  # noqa: E731
    return {"public_test_acc_single_view": acc(top[0]), "public_test_acc_tta": acc(top.mean(0)),
            "snapshot_ensemble_epochs": [b[1] for b in run["best"]],
            "public_test_acc_snapshot_ensemble": acc(torch.stack([m.mean(0) for m in member_logits]).mean(0)),
            "tta_views": views, "best_epoch": run["best"][0][1], "best_val_acc": run["best"][0][0]}


def section_accuracy(ctx: Context) -> dict:
    from fer_ray.config import load_sweep
    from fer_ray.views import expand_views

    args, dev = ctx.args, ctx.device
    sweep = load_sweep(ROOT / args.recipe)
    t0 = time.perf_counter()
    data, source = load_data(args, ctx.plan)
    load_s = time.perf_counter() - t0
    dedup_info = {"mode": sweep.data.dedup}
    if sweep.data.dedup != "none":
        from fer_ray.data.quality import dedup

        data, info = dedup(data, sweep.data.dedup, threshold=sweep.data.near_dup_threshold)
        dedup_info |= {"before": info["before"], "after": info["after"]}
    splits = split_indices(data, sweep.data.val_fraction, sweep.data.split_seed)
    cfg = recipe_config(ctx, sweep)
    ctx.emit(data=source, load_s=load_s, dedup=dedup_info, recipe=args.recipe, budget_s=args.budget_s,
             split_sizes={k: len(v) for k, v in splits.items()}, config=cfg.to_dict())
    run = train_recipe(ctx, cfg, run_arrays(data.images, data.labels, splits["train"], splits["val"]), args.budget_s)
    pub = torch.from_numpy(splits["public_test"])
    images = torch.from_numpy(data.images)[pub].to(dev)
    labels = torch.from_numpy(data.labels.astype(np.int64))[pub].to(dev)
    scores = score_public(ctx, run, images, labels, expand_views(sweep.tta_views))
    log("accuracy", f"PublicTest {scores['public_test_acc_tta']:.4f} (TTA), "
                    f"{scores['public_test_acc_snapshot_ensemble']:.4f} (snapshot ensemble)")
    n_ep = len(run["history"])
    return {"epochs": run["history"], "epochs_run": n_ep, "planned_epochs": run["planned_epochs"],
            "estimated_epoch_s": run["estimated_epoch_s"], "train_s": run["train_s"],
            "epochs_per_s": n_ep / run["train_s"], "model": run["cfg"].model, "loop_hooks": run["hooks"],
            "amp_dtype": amp_name(engine.autocast_dtype(run["cfg"], dev)),
            "stopped_by_budget": run["stopped_by_budget"],
            "img_s_incl_eval": n_ep * len(splits["train"]) / run["train_s"], **scores}


# ------------------------------------------------------------------------------------------------- e. packing


def packing_worker(spec: dict) -> None:
    """Worker ``rank`` of the packing rounds: a ``TrainingRun`` of basic_cnn, warmed up by one epoch, signals ready;
    then in each round ``k`` with ``rank < k``, it waits for that round's go file, runs ``train_epoch`` for
    ``seconds`` (or ``steps`` steps) and writes its images/s. One start-up for all rounds."""
    dev, rank = torch.device(spec["device"]), spec["rank"]
    if dev.type == "cpu":  # all workers run at once: oversubscribed intra-op threads would stall each other
        torch.set_num_threads(max(1, spec["cpus"] // max(spec["rounds"])))
    cfg = TrainConfig(model="basic_cnn", batch_size=spec["batch"], optimizer="sgd", lr=0.01, num_workers=0,
                      scheduler="none", augment=AugmentConfig(hflip=0.5, rotate=10.0, translate=0.2, scale=0.2,
                                                              erasing=0.5))
    run = TrainingRun(cfg, run_arrays(*random_arrays(spec["batch"] * 8, seed=rank), val=np.arange(7)), dev)
    run.train_epoch()
    tmp = Path(spec["dir"])
    (tmp / f"ready_{rank}").touch()
    for k in spec["rounds"]:
        if rank >= k:
            continue
        give_up = time.monotonic() + spec["wait_s"]
        while not (tmp / f"go_{k}").exists():
            if time.monotonic() > give_up:
                raise SystemExit(f"packing worker {rank}: no go signal for round {k}")
            time.sleep(0.005)
        n, t0 = 0, time.perf_counter()
        while (n < spec["steps"] * spec["batch"]) if spec["steps"] else (time.perf_counter() - t0 < spec["seconds"]):
            n += run.train_epoch()["images"]
        seconds = time.perf_counter() - t0
        # Atomically: the driver reads the file as soon as it exists (a half-written one failed a loaded CI run).
        _atomic_write(tmp / f"result_{k}_{rank}.json", json.dumps({"images": n, "seconds": seconds}))


def _wait_for(paths: list[Path], procs: list[subprocess.Popen], timeout: float, what: str, tmp: Path) -> None:
    give_up = time.perf_counter() + timeout
    while not all(p.exists() for p in paths):
        if any(p.poll() not in (None, 0) for p in procs) or time.perf_counter() > give_up:
            errors = " | ".join(e.read_text()[-600:] for e in sorted(tmp.glob("err_*")) if e.read_text().strip())
            raise RuntimeError(f"packing workers failed ({what}): {errors or 'timed out'}")
        time.sleep(0.01)


def packing_rounds(ctx: Context, tmp: Path) -> tuple[list[dict], float, float]:
    """Start max(k) worker processes once; release k of them together per round; sum their images/s. Each round
    runs ``plan.packing_s`` seconds (within the budget), or ``plan.packing_steps`` steps per worker (fixed work;
    ``seconds`` is then ``None`` and the waits allow minutes for what takes seconds)."""
    plan, ks = ctx.plan, sorted(ctx.plan.packing_ks)
    seconds = None if plan.packing_steps else max(0.5, min(plan.packing_s, (ctx.left() - 20) / len(ks)))
    spec = {"device": str(ctx.device), "batch": plan.packing_batch, "seconds": seconds, "rounds": ks,
            "steps": plan.packing_steps, "dir": str(tmp), "cpus": os.cpu_count() or 1, "wait_s": 600}
    procs, t0 = [], time.perf_counter()
    for rank in range(ks[-1]):
        with open(tmp / f"err_{rank}", "w") as err:
            procs.append(subprocess.Popen([sys.executable, __file__, "--packing-worker", json.dumps(spec | {
                "rank": rank})], stdout=subprocess.DEVNULL, stderr=err))
    rows = []
    try:
        _wait_for([tmp / f"ready_{r}" for r in range(ks[-1])], procs, 300, "start", tmp)
        startup_s = time.perf_counter() - t0
        log("packing", f"{ks[-1]} worker processes warm after {startup_s:.1f} s")
        for k in ks:
            (tmp / f"go_{k}").touch()
            results = [tmp / f"result_{k}_{r}.json" for r in range(k)]
            _wait_for(results, procs, 300 if seconds is None else seconds + 120, f"round {k}", tmp)
            per = [(d := json.loads(p.read_text()))["images"] / d["seconds"] for p in results]
            rows.append({"processes": k, "aggregate_img_s": sum(per), "per_process_img_s": per,
                         "gain_vs_1": sum(per) / (rows[0]["aggregate_img_s"] if rows else sum(per))})
            log("packing", f"{k} concurrent: {sum(per):.0f} img/s in all ({', '.join(f'{v:.0f}' for v in per)})")
            ctx.emit(table=rows, workers_startup_s=startup_s, seconds_per_round=seconds)
        for p in procs:
            p.wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return rows, startup_s, seconds


def section_packing(ctx: Context) -> dict:
    plan = ctx.plan
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()  # hand the earlier sections' cached blocks back before the workers start
    with tempfile.TemporaryDirectory(prefix="gpu_check_pack") as tmp:
        rows, startup_s, seconds = packing_rounds(ctx, Path(tmp))
    good = [r for r in rows if r["gain_vs_1"] >= 1.3]
    best = max(good, key=lambda r: r["gain_vs_1"]) if good else rows[0]
    return {"table": rows, "model": "basic_cnn", "img_size": 48, "batch": plan.packing_batch,
            "seconds_per_round": seconds, "steps_per_round": plan.packing_steps, "workers_startup_s": startup_s,
            "rule": "1/k for the k with the best aggregate gain >= 1.3x, else 1",
            "recommended_gpus_per_trial": 1.0 / best["processes"]}


# ----------------------------------------------------------------------------------------------------- f. ray


def ray_session():
    """``(init_ray, put_dataset)``: from ``fer_ray.cluster`` (the Ray session's module), else from ``fer_ray.train``
    (where they lived before)."""
    try:
        from fer_ray.cluster import init_ray, put_dataset
    except ImportError:
        from fer_ray.train import init_ray, put_dataset
    return init_ray, put_dataset


def ray_train_config(ctx: Context) -> TrainConfig:
    """One Ray Train run: one DDP worker (nccl on the GPU, gloo on the CPU), AMP: ``auto`` on the GPU, ``native``
    on the CPU (bf16 where the CPU has it, fp32 where bf16 would be emulated at ~1/10 the speed; the correctness
    section proves CPU bf16 autocast on every CPU)."""
    cuda = ctx.device.type == "cuda"
    return TrainConfig(model="basic_cnn", epochs=ctx.plan.ray_epochs, batch_size=32, num_workers=1,
                       cpus_per_worker=1.0, use_gpu=cuda, amp="auto" if cuda else "native", scheduler="cosine")


def ray_sweep_config(ctx: Context, cache: Path):
    """The Tune sweep: 4 in-process trials (``num_workers: 0``) packed onto the one GPU at ``gpu_fraction: 0.25``
    (one CPU each on the CPU: two at a time, in two trial processes that Tune reuses, where half a CPU each started
    four and cost the smoke 118 busy CPU-s against 86), synchronous successive halving over ``plan.ray_epochs``
    epochs of synthetic data."""
    from fer_ray.config import SweepConfig

    cuda, epochs = ctx.device.type == "cuda", ctx.plan.ray_epochs
    train = {"model": "basic_cnn", "epochs": epochs, "batch_size": 32, "num_workers": 0, "amp": "auto" if cuda
             else "native", "use_gpu": cuda, "gpu_fraction": 0.25 if cuda else 1.0,
             "cpus_per_worker": 2.0 if cuda else 1.0}
    return SweepConfig.from_dict({
        "name": "gpu_check_ray", "data": {"synthetic_n": ctx.plan.ray_synthetic_n, "val_fraction": 0.15,
                                          "cache_dir": str(cache)},
        "train": train, "search_space": {"drop_rate": {"grid": [0.1, 0.2, 0.3, 0.4]}}, "num_samples": 1,
        "asha": {"max_t": epochs, "grace_period": max(1, epochs // 2), "reduction_factor": 2, "synchronous": True},
        "max_concurrent_trials": 4, "tta_views": ["identity", "hflip"], "ensemble_top_k": 2}, "gpu_check")


def ray_train_trial(ctx: Context, tmp: Path) -> dict:
    """``fer_ray.train.make_trainer``'s TorchTrainer of one run, fitted: a Ray Train worker group running
    ``TrainingRun`` with the trial's hooks, its checkpoints persisted by Ray."""
    from fer_ray.config import DataConfig
    from fer_ray.data import prepare_dataset
    from fer_ray.experiment import Experiment
    from fer_ray.train import make_trainer

    cfg, put_dataset = ray_train_config(ctx), ray_session()[1]
    data, splits = prepare_dataset(DataConfig(synthetic_n=ctx.plan.ray_synthetic_n, val_fraction=0.15,
                                              cache_dir=str(tmp / "cache")))
    t0 = time.perf_counter()
    result = make_trainer(cfg, put_dataset(data, splits), Experiment(str(tmp / "train")), "one").fit()
    m = result.metrics or {}
    ok = bool(result.error is None and m.get("epoch") == cfg.epochs and result.checkpoint is not None
              and m.get("world_size") == 1)
    log("ray", f"Ray Train run: {m.get('epoch')} epochs, val_acc {m.get('val_acc')} ({'ok' if ok else 'FAIL'})")
    return {"wall_s": time.perf_counter() - t0, "num_workers": cfg.num_workers, "use_gpu": cfg.use_gpu,
            "amp": cfg.amp, "epochs": m.get("epoch"), "val_acc": m.get("val_acc"), "world_size": m.get("world_size"),
            "startup_s": m.get("startup_s"), "checkpoint": result.checkpoint is not None,
            "error": None if result.error is None else str(result.error)[-1000:], "pass": ok}


def ray_sweep(ctx: Context, tmp: Path) -> dict:
    """``run_sweep`` (Tune, synchronous halving, 4 packed trials), then the logit store (``tta_stage``), an ensemble
    (``ensemble_stage``) and the leaderboard (``report_stage``), each timed."""
    from fer_ray.data import prepare_dataset
    from fer_ray.pipeline import ensemble_stage, report_stage, tta_stage
    from fer_ray.sweep import run_sweep

    cfg = ray_sweep_config(ctx, tmp / "cache")
    exp, out, walls = str(tmp / "sweep"), {}, {}
    t0 = time.perf_counter()
    prepared = prepare_dataset(cfg.data)
    trials = run_sweep(cfg, exp, prepared=prepared)
    walls["sweep_s"] = time.perf_counter() - t0
    epochs = sorted(int(e) for e in trials.epochs_run)
    out |= {"trials": len(trials), "epochs_run": epochs, "gpu_fraction": cfg.train.gpu_fraction,
            "cpus_per_trial": cfg.train.cpus_per_worker, "best_val_acc": float(trials.best_val_acc.max())}
    ctx.emit(sweep=out | walls)
    t1 = time.perf_counter()
    stored = tta_stage(exp, prepared=prepared)
    walls["tta_s"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    ensemble = ensemble_stage(exp, cfg.ensemble_top_k)
    walls["ensemble_s"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    board = report_stage(exp, str(tmp / "report"))
    walls["report_s"] = time.perf_counter() - t1
    cols = [c for c in ("name", "kind", "arch", "tta_views", "oof_acc_val", "acc_val", "acc_public_test")
            if c in board.columns]
    top = board[cols].head(5).to_dict("records")
    n, a = cfg.num_trials(), cfg.asha  # one halving: the better half goes on from grace_period to max_t
    halving = [a.grace_period] * (n - n // 2) + [a.max_t] * (n // 2)
    checks = {"trials": len(trials) == n, "halving": epochs == sorted(halving),
              "logit_store": len(stored) >= len(trials), "ensemble": bool((board.kind == "ensemble").any())}
    log("ray", f"sweep {len(trials)} trials {epochs} epochs, {len(stored)} logit files, ensemble "
               f"{ensemble.get('name')}; checks {checks}")
    return out | walls | {"logit_files": len(stored), "ensemble": ensemble.get("name"), "leaderboard_top": top,
                          "checks": checks, "pass": all(checks.values())}


def section_ray(ctx: Context) -> dict:
    """Ray on this machine, when it imports (the GPU machine gets it from ``scripts/pack_ray.py``'s pack): a local
    Ray started with explicit CPUs (``init_ray``), one Ray Train run and a Tune sweep through the logit store and an
    ensemble; Ray is shut down at the end (nothing else is stopped)."""
    try:
        import ray
    except ImportError as e:
        return {"status": "skipped", "reason": f"ray does not import here ({e}); scripts/pack_ray.py packs it"}
    cuda = ctx.device.type == "cuda"
    num_cpus = 2 if ctx.args.smoke and not cuda else min(os.cpu_count() or 2, 8)
    # Workers import fer_ray (and a carried Ray) through PYTHONPATH, absolute: they do not start in this folder.
    paths = [str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([*paths, str(ROOT)]))
    if not ctx.args.join_ray:
        os.environ.pop("RAY_ADDRESS", None)  # this check's own local Ray, never a cluster's
    os.environ.setdefault("WANDB_MODE", "disabled")
    t0 = time.perf_counter()
    ray_session()[0](num_cpus=num_cpus, num_gpus=1 if cuda else 0)
    out = {"ray": ray.__version__, "num_cpus": num_cpus, "init_s": time.perf_counter() - t0,
           "resources": ray.cluster_resources()}
    ctx.emit(**out)
    try:
        with tempfile.TemporaryDirectory(prefix="gpu_check_ray") as tmp:
            out["train_trial"] = attempt("Ray Train run", ray_train_trial, ctx, Path(tmp), section="ray")
            ctx.emit(train_trial=out["train_trial"])
            out["sweep"] = attempt("Tune sweep", ray_sweep, ctx, Path(tmp), section="ray")
    finally:
        ray.shutdown()  # a joined Ray goes on: shutdown only disconnects this driver
        if not ctx.args.join_ray:
            os.environ.pop("RAY_ADDRESS", None)
    out["failed_checks"] = [k for k in ("train_trial", "sweep") if not out[k]["pass"]]
    return out


# ----------------------------------------------------------------------------------------------------- driver


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="fer_ray GPU check (issue 14): one process, JSON + Markdown report")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", help="FER-2013 pack from scripts/pack_fer2013.py (.gpu/fer2013.npz)")
    p.add_argument("--out", default=str(ROOT / "docs" / "gpu"), help="report folder")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on synthetic data (CI: --device cpu --smoke)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset, in the fixed order")
    p.add_argument("--recipe", default="sweeps/fer2013_gpu.yaml", help="sweep file whose train config is trained")
    p.add_argument("--acc-model", help="train this registered model with the recipe (default: the recipe's)")
    p.add_argument("--correctness-s", type=float, default=None, help="budget (default 60; smoke: none)")
    p.add_argument("--throughput-s", type=float, default=None, help="budget (default 90; smoke: none)")
    p.add_argument("--budget-s", type=float, default=None, help="accuracy training budget (default 240; smoke: none)")
    p.add_argument("--packing-s", type=float, default=None, help="budget (default 60; smoke: none)")
    p.add_argument("--join-ray", action="store_true",
                   help="ray section: join the Ray at RAY_ADDRESS (the test suite's session Ray) instead of starting "
                        "a local one")
    p.add_argument("--name", help="report file stem (default gpu_check_<date>; make gpu-check-ray: ..._ray)")
    p.add_argument("--packing-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # The smoke does fixed work (``Plan.smoke``) with no budget: a slow machine makes it slower, never different.
    defaults = (math.inf,) * 4 if args.smoke else (60, 90, 240, 60)
    for name, value in zip(("correctness_s", "throughput_s", "budget_s", "packing_s"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.packing_worker:
        packing_worker(json.loads(args.packing_worker))
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    plan = Plan.smoke() if args.smoke else Plan()
    if args.smoke and device.type == "cpu":
        torch.set_num_threads(1)  # intra-op threads stall when the box is shared (CI): one thread times predictably
    budgets = {"environment": math.inf if args.smoke else 60, "correctness": args.correctness_s,
               "throughput": args.throughput_s, "accuracy": args.budget_s, "packing": args.packing_s,
               "ray": math.inf}  # fixed work: one run and one 4-trial sweep
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    report = Report(Path(args.out), {"date": datetime.date.today().isoformat(), "device_name": device_name,
                                     "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                                     "smoke": args.smoke, "budgets_s": budgets}, args.name)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    ctx = Context(args, device, plan, emit=lambda **kv: None, deadline=0.0)
    for name in SECTIONS:
        if name in wanted:
            ctx.deadline = time.perf_counter() + budgets[name]
            report.run(name, globals()[f"section_{name}"], ctx)
    failed = [n for n, s in report.doc["sections"].items() if s["status"] not in ("ok", "skipped")]
    print(f"report: {report.json_path} and {report.md_path}; sections failed: {failed or 'none'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
