"""Benchmark 2: epoch wall time of one model trained through Ray Train (1 worker, and local mode) vs the same
model, data, batches and engine in a bare PyTorch loop in this process. The Ray figure is the epoch time the
worker measured itself (``train_time_s`` in its history: the training pass only, as in the bare loop). To
locate the gap, the bare loop runs twice: before Ray starts and again in this process while the (idle) Ray
cluster is up, which shows what Ray's own processes (GCS, raylet, dashboard, log monitor) cost on 2 cores."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from common import emit, parser

from fer_ray import engine
from fer_ray.cluster import init_ray, put_dataset
from fer_ray.config import TrainConfig
from fer_ray.data import split_indices
from fer_ray.data.augment import Augment, Preprocess
from fer_ray.data.synthetic import generate
from fer_ray.experiment import Experiment
from fer_ray.models import create_model
from fer_ray.train import make_trainer


def bare_epochs(cfg: TrainConfig, images, labels, epochs: int) -> list[float]:
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, img_size=cfg.img_size).to(memory_format=torch.channels_last)
    pre, aug = Preprocess.for_model(model.fer_cfg), Augment(cfg.augment)
    opt = engine.build_optimizer(cfg, model.parameters())
    times = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        engine.train_one_epoch(model, images, labels, opt, pre, aug, cfg, epoch)
        times.append(time.perf_counter() - t0)
    return times


def ray_epochs(cfg: TrainConfig, ref, tmp: Path, name: str) -> list[float]:
    make_trainer(cfg, ref, tmp, name).fit()
    return [h["train_time_s"] for h in Experiment(tmp).history(name)]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", default=None, help="default advanced_emotion_net (smoke: basic_cnn, the cheapest)")
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    args.model = args.model or ("basic_cnn" if args.smoke else "advanced_emotion_net")
    n, epochs = (200, 1) if args.smoke else (3000, args.epochs)  # smoke: ~140 train images, two batches of 64
    data = generate(n, seed=0)
    splits = split_indices(data, 0.1, 0)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    cfg = TrainConfig(model=args.model, img_size=48, epochs=epochs, batch_size=64, num_workers=1,
                      cpus_per_worker=threads, eval_batch_size=256)
    images = torch.from_numpy(data.images[splits["train"]])
    labels = torch.from_numpy(data.labels[splits["train"]])
    tmp = Path(tempfile.mkdtemp(prefix="fer_bench_"))
    try:
        bare = bare_epochs(cfg, images, labels, epochs)
        init_ray(num_cpus=threads)
        ref = put_dataset(data, splits)
        time.sleep(0 if args.smoke else 5)  # let the cluster settle before timing next to it
        bare_ray_up = bare_epochs(cfg, images, labels, epochs)
        ray1 = ray_epochs(cfg, ref, tmp, "one_worker")
        local = ray_epochs(cfg.replace(num_workers=0), ref, tmp, "local_mode")
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        emit("epoch", {"model": args.model, "images": len(images), "epochs": epochs, "bare_epoch_s": med(bare),
                       "bare_ray_up_epoch_s": med(bare_ray_up), "ray_1worker_epoch_s": med(ray1),
                       "ray_local_epoch_s": med(local), "ratio_bare_ray_up": med(bare_ray_up) / med(bare),
                       "ratio_1worker": med(ray1) / med(bare), "ratio_local": med(local) / med(bare),
                       "target": "<= 1.05x"}, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
