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

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fer_ray import engine
from fer_ray.checkpoint import load_checkpoint, model_from_checkpoint
from fer_ray.config import TrainConfig


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
    from fer_ray.tta import inference_model, tta_logits

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

    from fer_ray.train import init_ray

    init_ray()
    task = ray.remote(_score_task)
    images_ref = ray.put(images)
    cluster_cpus = ray.cluster_resources().get("CPU")
    pending = {}
    for i, job in enumerate(jobs):
        res = task_resources(TrainConfig.from_dict(job.config, "trial config"), cluster_cpus)
        device = "cuda" if res.get("num_gpus") else "cpu"
        ref = task.options(**res, name=f"fer_ray.score {job.label}"[:120]).remote(
            job.location, images_ref, job.index, list(job.views or views), device, max(1, round(res["num_cpus"])),
            job.weights)
        pending[ref] = i
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        yield pending.pop(done[0]), ray.get(done[0])
