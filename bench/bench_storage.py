"""Benchmark 10: what checkpointing through Ray's storage to a bucket costs per epoch — the same Ray Train run (one
DDP worker, so Ray Train persists every epoch's checkpoint) with the experiment in a local folder and in an
S3-compatible server on loopback (moto), in the same process, same model, data and seeds.

Per-epoch wall = the time between consecutive epochs' ends (``finished_at``): training, validation and the
previous epoch's checkpoint (``torch.save``, sha256, upload by Ray Train, report). The local folder runs twice,
before and after the bucket run, so the spread of identical runs is in the same record."""

from __future__ import annotations

import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np
from common import emit, parser

from fer_ray.cluster import init_ray, put_dataset
from fer_ray.config import TrainConfig
from fer_ray.data import split_indices
from fer_ray.data.synthetic import generate
from fer_ray.experiment import Experiment
from fer_ray.storage import Storage, parent_and_name
from fer_ray.testing import s3_server
from fer_ray.train import make_trainer


def epoch_walls(cfg: TrainConfig, ref, root: str, name: str) -> tuple[list[float], int]:
    """Per-epoch walls of one run into the experiment at ``root``, and its checkpoint size in bytes."""
    make_trainer(cfg, ref, root, name).fit()
    exp = Experiment(root)
    ends = [h["finished_at"] for h in exp.history(name)]
    folder, file = parent_and_name(exp.checkpoints(name)[cfg.epochs])
    storage = Storage(folder)
    return list(np.diff(ends)), storage.fs.get_file_info(storage.path(file)).size


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", default=None, help="default deep_cnn_v1 (smoke: basic_cnn, the cheapest)")
    p.add_argument("--images", type=int, default=6000)
    p.add_argument("--epochs", type=int, default=5)
    args = p.parse_args()
    args.model = args.model or ("basic_cnn" if args.smoke else "deep_cnn_v1")
    # Smoke: 2 epochs, the fewest that give one per-epoch wall (the gap between two epochs' ends).
    n, epochs = (150, 2) if args.smoke else (args.images, args.epochs)
    data = generate(n, seed=0)
    splits = split_indices(data, 0.1, 0)
    cfg = TrainConfig(model=args.model, img_size=48, epochs=epochs, batch_size=64, num_workers=1, cpus_per_worker=2,
                      optimizer="adamw", eval_batch_size=256)
    tmp = Path(tempfile.mkdtemp(prefix="fer_bench_"))
    try:
        with s3_server() as bucket:  # credentials in the environment before Ray starts: its workers get them
            init_ray(num_cpus=2)
            ref = put_dataset(data, splits)
            local_a, size = epoch_walls(cfg, ref, str(tmp / "a"), "local_a")
            s3, _ = epoch_walls(cfg, ref, bucket, "s3")
            # Smoke: the second local run is the first's code again, so it is not run twice.
            local_b = local_a if args.smoke else epoch_walls(cfg, ref, str(tmp / "b"), "local_b")[0]
        med = statistics.median
        local = med(local_a + local_b)
        emit("storage", {"model": args.model, "images": n, "epochs": epochs, "checkpoint_mb": size / 2**20,
                         "local_epoch_s": local, "local_a_epoch_s": med(local_a), "local_b_epoch_s": med(local_b),
                         "s3_epoch_s": med(s3), "ratio_s3": med(s3) / local,
                         "spread_local": abs(med(local_a) - med(local_b)) / local, "target": "<= 1.05x"}, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
