"""Knowledge distillation of a stored ensemble into one student, trained under Ray Train and scored like a trial.

``distill`` owns the flow: it recovers the experiment's data and splits from its saved ``sweep.yaml``
(``prepare_dataset``), scores every member checkpoint of the ensemble with the TTA views it uses over the ``train``
split (Ray tasks, ``fer_ray.inference``) and combines them with the ensemble's stored fitted numbers
(``apply_fitted``: no refitting) into teacher logits; as a check, the same rebuild on ``val`` must match the stored
ensemble. The student then trains as a one-trial run of the sweep machinery (``run_sweep`` under the group
``distill/<name>``: Ray Tune → TorchTrainer, ``num_workers=0`` is Ray Train's local mode; checkpoints through Ray's
storage) on loss = α·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) + (1-α)·CE (``engine.LossFn``); its
checkpoint is selected on ``val``, it is scored with the members' TTA views into the store as member
``distill:<name>`` (also on external splits added by ``fer-ray evaluate``), recorded in ``distilled.parquet`` (the
columns of ``trials.parquet`` plus the teacher and KD settings; kept apart so top-k ensembles never pick up a
student) and the report is rewritten: the student's accuracy and GMACs sit beside the ensemble and its members.

Files: ``distill/<name>/`` holds the run (``tune/``, ``train/``, ``trials/``) and ``teacher_train.parquet``.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from fer_ray.config import ConfigError, SweepConfig, TrainConfig
from fer_ray.data import FERData
from fer_ray.data.dataset import fingerprint
from fer_ray.ensemble import apply_fitted, reproduce_ensemble
from fer_ray.experiment import Experiment, as_experiment
from fer_ray.inference import fill_store
from fer_ray.models import check_model_names
from fer_ray.names import path_name_problem
from fer_ray.report import leaderboard, member_table, write_report
from fer_ray.store import StoreError, logit_table, read_logits

TEACHER_CHECK_ATOL = 1e-3
"""Largest |difference| allowed between rebuilt and stored ensemble logits on ``val`` (batched float32 noise)."""


def teacher_logits(exp: Experiment, info: dict, images: np.ndarray) -> np.ndarray:
    """``[N, C]`` ensemble logits on ``images``: each member's checkpoint × the ensemble's TTA views (one Ray task per
    member), view-averaged in logit space, combined with the stored fitted numbers."""
    from fer_ray.inference import ScoreJob, score_checkpoints

    members = member_table(exp)
    jobs = [ScoreJob(members.loc[m, "checkpoint"], json.loads(members.loc[m, "config"]),
                     {"x": np.arange(len(images))}, m) for m in info["members"]]
    stack = [None] * len(jobs)
    for i, res in score_checkpoints(jobs, images, info["views"]):
        stack[i] = res["logits"]["x"].mean(0)
    return apply_fitted(np.stack(stack), info["fitted"]).astype(np.float32)


def _check_teacher(exp: Experiment, info: dict, data: FERData, splits: dict[str, np.ndarray]) -> None:
    """The rebuilt teacher must reproduce the stored ensemble on its selection split (same images, checkpoints)."""
    sel = info.get("selected_on", "val")
    stored = read_logits(exp, f"ensemble:{info['name']}", sel)
    if sel not in splits or not np.array_equal(stored.ids.astype(str), data.ids[splits[sel]].astype(str)):
        raise StoreError(f"{exp.uri}: the data recovered from sweep.yaml does not give the stored {sel} images")
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


def _record(exp: Experiment, row: dict) -> pd.DataFrame:
    old = exp.distilled()
    if old is not None and len(old):
        old = old[old.trial_id != row["trial_id"]]
    df = pd.concat([old, pd.DataFrame([row])], ignore_index=True) if old is not None else pd.DataFrame([row])
    exp.write_distilled(df)
    return df


def _train_student(exp: Experiment, sweep: SweepConfig, cfg: TrainConfig, group: str, data: FERData,
                   splits: dict[str, np.ndarray], soft: np.ndarray, num_cpus: int | None) -> dict:
    """Train the student as a one-trial run under ``group``; returns its ``trial_row``."""
    from fer_ray.cluster import init_ray, put_dataset
    from fer_ray.sweep import run_sweep

    one = sweep.replace(train=cfg, search_space={}, num_samples=1, max_concurrent_trials=1, keep_checkpoints="best",
                        asha=sweep.asha.replace(max_t=cfg.epochs, grace_period=cfg.epochs, synchronous=False))
    init_ray(num_cpus=num_cpus)
    rows = run_sweep(one, exp, group=group, data_ref=put_dataset(data, splits, soft))
    if len(rows) != 1:
        raise RuntimeError(f"{exp.uri_of(group)}: the student run left {len(rows)} trials, expected 1")
    return rows.iloc[0].to_dict()


def distill(exp: Experiment | str, ensemble: str, student: str, *, epochs: int | None = None,
            temperature: float = 4.0, alpha: float = 0.9, img_size: int | None = None, name: str | None = None,
            num_workers: int | None = 0, batch_size: int | None = None, lr: float | None = None,
            num_cpus: int | None = None, progress: bool = True) -> pd.Series:
    """Distil ensemble ``ensemble`` of an experiment into ``student``; returns the student's leaderboard row.

    Args:
        exp: The experiment (with ``sweep.yaml``, the logit store and ``ensembles/<ensemble>.json``).
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
    from fer_ray.cluster import init_ray
    from fer_ray.data import prepare_dataset
    from fer_ray.evaluate import external_splits, load_external, score_members

    safe = name or student.replace("/", "_")  # checked first: it names a folder that is replaced
    if path_name_problem(safe):
        raise ConfigError(f"--name: {path_name_problem(safe)}")
    exp = as_experiment(exp)
    info = exp.ensemble(ensemble)
    sweep = exp.sweep()
    cfg = student_config(sweep.train, student, alpha=alpha, temperature=temperature, epochs=epochs,
                         img_size=img_size, num_workers=num_workers, batch_size=batch_size, lr=lr)
    check_model_names(sweep.replace(train=cfg, search_space={}, placement={}))

    member, group = f"distill:{safe}", f"distill/{safe}"
    data, splits = prepare_dataset(sweep.data)
    exp.check_data(fingerprint(data, splits), sweep.data.path or "the synthetic generator")
    init_ray(num_cpus=num_cpus)
    _check_teacher(exp, info, data, splits)
    exp.remove(group)  # a fresh run, never a resume of an older one (only a folder fer_ray created)
    exp.mark_created(group)

    t0 = time.perf_counter()
    tr = splits["train"]
    soft = teacher_logits(exp, info, data.images[tr])
    table = logit_table(soft[None], data.labels[tr], data.ids[tr].astype(str), ["combined"],
                        {"member": f"ensemble:{ensemble}", "split": "train", "role": "fit",
                         "members": info["members"], "member_views": info["views"]})
    exp.write_with(f"{group}/teacher_train.parquet", lambda f: pq.write_table(table, f))
    if progress:
        print(f"[distill] teacher ensemble:{ensemble} ({len(info['members'])} members × {len(info['views'])} views)"
              f" on {len(tr)} train images: {time.perf_counter() - t0:.1f}s", flush=True)
    row = _train_student(exp, sweep, cfg, group, data, splits, soft, num_cpus)
    row |= {"trial_id": member, "teacher": f"ensemble:{ensemble}", "distill_alpha": cfg.distill_alpha,
            "distill_temperature": cfg.distill_temperature}
    _record(exp, row)
    views = list(read_logits(exp, info["members"][0], info.get("selected_on", "val")).views)
    fill_store(exp, data, splits, views, exp.roles(), trials=pd.DataFrame([row]), progress=progress)
    for split, meta in external_splits(exp).items():
        score_members(exp, load_external(exp, meta["source"], meta["format"]), split,
                      member_table(exp).loc[[member]], progress=progress)
    board = leaderboard(exp)
    write_report(exp, board=board)
    return board.set_index("name").loc[member]
