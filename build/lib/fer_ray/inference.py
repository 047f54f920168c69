"""Inference on the cluster: checkpoints scored with TTA as Ray tasks, one task per checkpoint, in parallel.

Each task asks for the resources its trial trained with (one GPU for a GPU trial, the trial's CPUs otherwise,
capped at what the cluster has), reads its checkpoint from the experiment's storage (sha256-verified: a bucket, NFS
or a local path; never the driver's disk) and the images from one object-store copy, runs the TTA views stacked in
one forward pass of the inference copy of the model (on the GPU with the trial's AMP dtype where it trained with
one) and returns the logits; the driver writes them to the logit store as each task finishes, one progress line per
checkpoint. ``score_checkpoint`` is the task's whole body, so the same call in-process (``on_ray=False``: the
serial path, and the reference the tests compare against) gives the same numbers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from fer_ray import engine
from fer_ray.checkpoint import load_checkpoint, model_from_checkpoint
from fer_ray.config import TrainConfig
from fer_ray.data import FERData
from fer_ray.tta import inference_model, tta_logits
from fer_ray.views import expand_views


@dataclass
class ScoreJob:
    """One checkpoint to score: its location, its trial's train config and the images to score, per split."""

    location: str
    config: dict
    index: dict[str, np.ndarray]
    """Split name → positions in the shared image array."""
    label: str = ""
    views: list[str] | None = None
    """TTA views (``score_checkpoints``'s ``views`` when ``None``)."""
    weights: str = "raw"
    """Which weights of the checkpoint: ``raw``, or the ``ema`` average saved beside them."""


SCORE_MAX_RETRIES = 3
"""Times Ray runs a scoring task again when its worker process or its node dies (a system failure; an exception
raised by the task is not retried). Ray's default for tasks, stated here so that a lost node during TTA costs a
rescore of its checkpoints on another node, never the stage."""


def task_options(cfg: TrainConfig, cluster_cpus: float | None = None, label: str = "") -> dict:
    """Everything ``score_checkpoints`` submits a scoring task with: ``task_resources``, the retries on a lost
    worker or node (``SCORE_MAX_RETRIES``) and the task's name (``fer_ray.score <label>``)."""
    return {**task_resources(cfg, cluster_cpus), "max_retries": SCORE_MAX_RETRIES, "retry_exceptions": False,
            "name": f"fer_ray.score {label}"[:120]}


def task_resources(cfg: TrainConfig, cluster_cpus: float | None = None) -> dict[str, float]:
    """Ray task options for scoring a checkpoint of a trial trained with ``cfg``: its GPU (or GPU share), else the
    trial's CPUs (capped at the cluster's)."""
    if cfg.use_gpu:
        return {"num_gpus": cfg.gpu_fraction, "num_cpus": 1}
    cpus = cfg.cpus_per_worker * max(1, cfg.num_workers)
    return {"num_cpus": min(cpus, cluster_cpus) if cluster_cpus else cpus}


def score_checkpoint(location: str, images: np.ndarray, index: dict[str, np.ndarray], views: Sequence[str],
                     device: str = "cpu", batch_size: int = 256, weights: str = "raw") -> dict:
    """``{"logits": {split: [V, N, C] float32}, "epoch": int, "seconds": float}`` for the checkpoint at ``location``."""
    t0 = time.perf_counter()
    ckpt = load_checkpoint(location)
    dev = torch.device(device)
    model = inference_model(model_from_checkpoint(ckpt, weights)).to(dev)
    amp = engine.autocast_dtype(TrainConfig.from_dict(ckpt["config"], "checkpoint config"), dev)
    out = {}
    for split, idx in index.items():
        x = torch.from_numpy(np.ascontiguousarray(images[np.asarray(idx)])).to(dev)
        out[split] = tta_logits(model, x, views, batch_size, amp_dtype=amp).cpu().numpy()
    return {"logits": out, "epoch": int(ckpt["epoch"]), "seconds": time.perf_counter() - t0}


def _score_task(location: str, images: np.ndarray, index: dict, views: list[str], device: str, threads: int,
                weights: str) -> dict:
    torch.set_num_threads(threads)
    return score_checkpoint(location, images, index, views, device, weights=weights)


def score_checkpoints(jobs: list[ScoreJob], images: np.ndarray, views: Sequence[str] = (),
                      on_ray: bool = True) -> Iterator[tuple[int, dict]]:
    """Score every job with its views (or ``views``); yields ``(job index, score_checkpoint result)`` as each
    finishes (Ray tasks, in parallel). ``on_ray=False`` scores them one after another in this process instead."""
    if not on_ray:
        for i, job in enumerate(jobs):
            yield i, score_checkpoint(job.location, images, job.index, list(job.views or views), weights=job.weights)
        return
    import ray

    from fer_ray.cluster import init_ray

    init_ray()
    task = ray.remote(_score_task)
    images_ref = ray.put(images)
    cluster_cpus = ray.cluster_resources().get("CPU")
    pending = {}
    for i, job in enumerate(jobs):
        res = task_options(TrainConfig.from_dict(job.config, "trial config"), cluster_cpus, job.label)
        device = "cuda" if res.get("num_gpus") else "cpu"
        ref = task.options(**res).remote(
            job.location, images_ref, job.index, list(job.views or views), device, max(1, round(res["num_cpus"])),
            job.weights)
        pending[ref] = i
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        yield pending.pop(done[0]), ray.get(done[0])


def fill_store(exp, data: FERData, splits: dict[str, np.ndarray], views: Sequence[str], roles: dict[str, str],
               trials: pd.DataFrame | None = None, progress: bool = True, on_ray: bool = True) -> list[str]:
    """Store TTA logits of each trial's best checkpoint (``trials``: default the experiment's ``trials.parquet``)
    for every split in ``roles`` except ``fit`` ones, as Ray tasks (``score_checkpoints``); returns the store files.

    A (trial, split) already stored with the same checkpoint sha256 and views is kept as it is.
    """
    from fer_ray.checkpoint import checkpoint_sha256
    from fer_ray.experiment import as_experiment
    from fer_ray.store import write_logits

    exp = as_experiment(exp)
    asked = expand_views(views)
    trials = exp.trials() if trials is None else trials
    scored = [s for s, r in roles.items() if r != "fit" and s in splits]
    jobs, rows, written = [], [], []
    kept_views = _ensemble_views(exp)
    for row in trials.itertuples():
        sha = checkpoint_sha256(row.checkpoint)
        # The store keeps the views every built ensemble of this member uses, so re-scoring with other views
        # never leaves an ensemble unreproducible.
        views = asked + [v for v in kept_views.get(row.trial_id, []) if v not in asked]
        need = [s for s in scored if not _is_current(exp, row.trial_id, s, sha, views)]
        written += [exp.logits_rel(row.trial_id, s) for s in scored if s not in need]
        if need:
            jobs.append(ScoreJob(row.checkpoint, json.loads(row.config), {s: splits[s] for s in need},
                                 f"{row.trial_id} ({row.arch} @ {row.img_size}px)", views,
                                 weights=getattr(row, "weights", None) or "raw"))
            rows.append((row, sha))
    if on_ray and jobs:  # before any task: the placement groups stopped trials left hold what the tasks need
        from fer_ray import cluster, footprint

        cluster.init_ray()
        footprint.release_quietly(exp)
    for n, (i, res) in enumerate(score_checkpoints(jobs, data.images, on_ray=on_ray), 1):
        row, sha, views = *rows[i], jobs[i].views
        for split, logits in res["logits"].items():
            idx = splits[split]
            meta = {"member": row.trial_id, "arch": row.arch, "img_size": int(row.img_size),
                    "in_chans": int(row.in_chans), "params": int(row.params), "gmacs_per_view": float(row.gmacs),
                    "checkpoint": row.checkpoint, "checkpoint_sha256": sha, "epoch": res["epoch"],
                    "weights": jobs[i].weights,
                    "split": split, "role": roles[split], "views": list(views), "config": json.loads(row.config)}
            write_logits(exp, row.trial_id, split, logits, data.labels[idx], data.ids[idx].astype(str), views, meta)
            written.append(exp.logits_rel(row.trial_id, split))
        if progress:
            print(f"[tta] {n}/{len(jobs)} {jobs[i].label}: {len(views)} views × {', '.join(res['logits'])} "
                  f"({res['seconds']:.1f}s)", flush=True)
    return written


def _ensemble_views(exp) -> dict[str, list[str]]:
    """Member → the views of every built ensemble that uses it (in first-seen order)."""
    out: dict[str, list[str]] = {}
    for name in exp.ensemble_names():
        info = exp.ensemble(name)
        for m in info["members"]:
            out.setdefault(m, []).extend(v for v in info["views"] if v not in out.get(m, []))
    return out


def _is_current(exp, member: str, split: str, sha: str, views: Sequence[str]) -> bool:
    from fer_ray.store import read_meta

    if not exp.has_logits(member, split):
        return False
    meta = read_meta(exp, member, split)
    return meta.get("checkpoint_sha256") == sha and list(meta.get("views", [])) == list(views)
