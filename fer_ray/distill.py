"""Knowledge distillation of a stored ensemble into one student, trained under Ray Train and scored like a trial.

``distill`` owns the flow: it recovers the experiment's data and splits from its saved ``sweep.yaml``
(``prepare_dataset``), runs every member checkpoint of ``ensembles/<name>.json`` with the TTA views the ensemble
uses over the ``train`` split, and combines them with the ensemble's stored fitted numbers (``apply_fitted``: no
refitting) into teacher logits; as a check, the same rebuild on ``val`` must match the stored ensemble. The
student then trains with ``train_loop_per_worker`` (a ``TorchTrainer``; ``num_workers=0`` is Ray Train's local
mode) on loss = α·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) + (1-α)·CE (``engine.LossFn``), its checkpoint
is selected on ``val``, it is scored with the members' TTA views into the store as member ``distill:<student>``
(also on external splits added by ``fer-ray evaluate``), recorded in ``distilled.parquet`` (the columns of
``trials.parquet`` plus the teacher and KD settings; kept apart so top-k ensembles never pick up a student) and
the report is rewritten: the student's accuracy and GMACs sit beside the ensemble and its members.

Files: ``distill/<student>/`` holds the run (checkpoints, history.json) and ``teacher_train.parquet``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fer_ray.checkpoint import atomic_write_bytes, load_checkpoint, model_from_checkpoint
from fer_ray.config import ConfigError, TrainConfig, load_sweep
from fer_ray.data import FERData
from fer_ray.ensemble import apply_fitted, reproduce_ensemble
from fer_ray.flops import count_gmacs, count_params
from fer_ray.report import member_table, write_report
from fer_ray.store import StoreError, read_logits, write_logits
from fer_ray.tta import fill_store, tta_logits

TEACHER_CHECK_ATOL = 1e-3
"""Largest |difference| allowed between rebuilt and stored ensemble logits on ``val`` (batched float32 noise)."""


def ensemble_info(exp: Path, name: str) -> dict:
    path = exp / "ensembles" / f"{name}.json"
    if not path.is_file():
        have = ", ".join(sorted(p.stem for p in (exp / "ensembles").glob("*.json"))) or "none"
        raise ConfigError(f"--ensemble {name!r}: no {path} (ensembles here: {have})")
    return json.loads(path.read_text())


def teacher_logits(exp: Path, info: dict, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``[N, C]`` ensemble logits on ``images``: each member's checkpoint × the ensemble's TTA views, view-averaged
    in logit space, combined with the stored fitted numbers."""
    members = member_table(exp)
    x = torch.from_numpy(np.ascontiguousarray(images))
    stack = []
    for m in info["members"]:
        model = model_from_checkpoint(load_checkpoint(members.loc[m, "checkpoint"]))
        stack.append(tta_logits(model, x, info["views"], batch_size).numpy().mean(0))
    return apply_fitted(np.stack(stack), info["fitted"]).astype(np.float32)


def _check_teacher(exp: Path, info: dict, data: FERData, splits: dict[str, np.ndarray]) -> None:
    """The rebuilt teacher must reproduce the stored ensemble on its selection split (same images, checkpoints)."""
    sel = info.get("selected_on", "val")
    stored = read_logits(exp / "logits" / f"ensemble:{info['name']}" / f"{sel}.parquet")
    if sel not in splits or not np.array_equal(stored.ids.astype(str), data.ids[splits[sel]].astype(str)):
        raise StoreError(f"{exp}: the data recovered from sweep.yaml does not give the stored {sel} images")
    diff = np.abs(teacher_logits(exp, info, data.images[splits[sel]]) - reproduce_ensemble(exp, info["name"], sel))
    if diff.max() > TEACHER_CHECK_ATOL:
        raise StoreError(f"ensemble {info['name']!r}: rebuilt teacher differs from the stored logits on {sel} "
                         f"(max |Δ| {diff.max():.3g}); re-run `fer-ray tta` and `fer-ray ensemble`")


def student_config(base: TrainConfig, student: str, *, alpha: float, temperature: float, epochs: int | None,
                   img_size: int | None, num_workers: int | None, batch_size: int | None,
                   lr: float | None) -> TrainConfig:
    """The sweep's base training recipe for ``student``, with model-specific fields reset and KD switched on."""
    raw = base.to_dict() | {"model": student, "img_size": img_size, "in_chans": None, "drop_rate": None,
                            "model_kwargs": {}, "pretrained": False, "freeze_epochs": 0, "mixup": 0.0, "cutmix": 0.0,
                            "distill_alpha": alpha, "distill_temperature": temperature}
    for key, value in (("epochs", epochs), ("num_workers", num_workers), ("batch_size", batch_size), ("lr", lr)):
        if value is not None:
            raw[key] = value
    return TrainConfig.from_dict(raw, "distill")


def _student_row(member: str, run_dir: Path, cfg: TrainConfig, teacher: str) -> dict:
    history = json.loads((run_dir / "history.json").read_text())
    best = max(history, key=lambda h: h["val_acc"])
    ckpt_path = run_dir / "checkpoints" / f"epoch_{best['epoch']:03d}.pt"
    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt)
    return {"trial_id": member, "arch": cfg.model, "img_size": model.fer_cfg["img_size"],
            "in_chans": model.fer_cfg["in_chans"], "params": count_params(model), "gmacs": count_gmacs(model),
            "best_val_acc": best["val_acc"], "best_epoch": best["epoch"], "epochs_run": len(history),
            "stopped_early": len(history) < cfg.epochs, "checkpoint": str(ckpt_path),
            "config": json.dumps(ckpt["config"], sort_keys=True), "teacher": f"ensemble:{teacher}",
            "distill_alpha": cfg.distill_alpha, "distill_temperature": cfg.distill_temperature}


def _record(exp: Path, row: dict) -> pd.DataFrame:
    path = exp / "distilled.parquet"
    old = pd.read_parquet(path) if path.is_file() else pd.DataFrame()
    if len(old):
        old = old[old.trial_id != row["trial_id"]]
    df = pd.concat([old, pd.DataFrame([row])], ignore_index=True)
    atomic_write_bytes(path, lambda f: df.to_parquet(f, index=False))
    return df


def distill(results_dir: str | Path, ensemble: str, student: str, *, epochs: int | None = None,
            temperature: float = 4.0, alpha: float = 0.9, img_size: int | None = None, name: str | None = None,
            num_workers: int | None = 0, batch_size: int | None = None, lr: float | None = None,
            num_cpus: int | None = None, progress: bool = True) -> pd.Series:
    """Distil ensemble ``ensemble`` of an experiment into ``student``; returns the student's leaderboard row.

    Args:
        results_dir: The experiment folder (with ``sweep.yaml``, the logit store and ``ensembles/<ensemble>.json``).
        ensemble: Name of a built ensemble (the teacher).
        student: Registry name or ``timm/<name>``.
        epochs, img_size, batch_size, lr: Overrides of the sweep's base training recipe (``None`` keeps it).
        temperature, alpha: KD temperature T and weight α of the KL term.
        name: Member name suffix (default: the student name, ``/`` → ``_``); the member is ``distill:<name>``.
        num_workers: DDP workers (0: Ray Train local mode, in-process); ``None`` keeps the sweep's.
        num_cpus: CPUs of a local Ray (ignored with ``RAY_ADDRESS``).
        progress: Print TTA progress lines.

    Raises:
        ConfigError: Unknown ensemble or bad settings. StoreError: The recovered data or checkpoints do not
        reproduce the stored ensemble.
    """
    from fer_ray.evaluate import external_splits, load_external, score_members
    from fer_ray.placement import place_in_cluster
    from fer_ray.train import init_ray, make_trainer, prepare_dataset, put_dataset

    exp = Path(results_dir).absolute()
    info = ensemble_info(exp, ensemble)
    sweep = load_sweep(exp / "sweep.yaml")
    cfg = student_config(sweep.train, student, alpha=alpha, temperature=temperature, epochs=epochs,
                         img_size=img_size, num_workers=num_workers, batch_size=batch_size, lr=lr)
    safe = (name or student).replace("/", "_")
    member = f"distill:{safe}"
    roles = json.loads((exp / "split_roles.json").read_text())
    data, splits = prepare_dataset(sweep.data)
    _check_teacher(exp, info, data, splits)

    run_dir = exp / "distill" / safe
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # a fresh run, never a resume of an older one
    (run_dir / "history.json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    soft = teacher_logits(exp, info, data.images[splits["train"]])
    tr = splits["train"]
    write_logits(run_dir / "teacher_train.parquet", soft[None], data.labels[tr], data.ids[tr].astype(str),
                 ["combined"], {"member": f"ensemble:{ensemble}", "split": "train", "role": "fit",
                                "members": info["members"], "member_views": info["views"]})
    if progress:
        print(f"[distill] teacher ensemble:{ensemble} ({len(info['members'])} members × {len(info['views'])} views)"
              f" on {len(tr)} train images: {time.perf_counter() - t0:.1f}s", flush=True)
    init_ray(num_cpus=num_cpus)
    rule = sweep.rule_for(cfg.model)
    make_trainer(place_in_cluster(cfg, rule), put_dataset(data, splits, soft), run_dir, exp / "train",
                 name=f"distill_{safe}_{time.strftime('%Y%m%d_%H%M%S')}",
                 batch_size_cap=rule.batch_size_cap if rule else None).fit()

    row = _student_row(member, run_dir, cfg, ensemble)
    _record(exp, row)
    views = list(read_logits(next((exp / "logits" / info["members"][0]).glob("*.parquet"))).views)
    fill_store(exp, data, splits, views, roles, trials=pd.DataFrame([row]), progress=progress)
    for split, meta in external_splits(exp).items():
        score_members(exp, load_external(exp, meta["source"], meta["format"]), split,
                      member_table(exp).loc[[member]], progress=progress)
    board = pd.read_csv(write_report(exp, exp / "report")["csv"])
    return board.set_index("name").loc[member]
