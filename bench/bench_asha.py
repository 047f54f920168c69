"""Benchmark 4: ASHA vs running every trial to the full budget, on the same search space and seeds (16 trials,
embedded synthetic dataset, local-mode trials two at a time). Reported: total epochs trained by each, their
ratio, and the best validation accuracy each found. Target: ASHA ≤ 0.35× the epochs, best val acc within 0.5 pt."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from common import emit, parser

from fer_ray.config import SweepConfig
from fer_ray.sweep import run_sweep
from fer_ray.train import init_ray


def sweep(tmp: Path, name: str, trials: int, epochs: int, grace: int, rf: int, n: int) -> dict:
    cfg = SweepConfig.from_dict({
        "name": name, "data": {"synthetic_n": n, "cache_dir": str(tmp / "cache")},
        "train": {"model": "basic_cnn", "img_size": 32, "epochs": epochs, "batch_size": 32, "optimizer": "adamw",
                  "num_workers": 0, "cpus_per_worker": 0.9},
        "search_space": {"lr": {"loguniform": [1e-4, 3e-3]}, "drop_rate": {"uniform": [0.1, 0.6]},
                         "augment.strength": {"uniform": [0.0, 1.5]}},
        "num_samples": trials, "seed": 0, "max_concurrent_trials": 2,
        "asha": {"max_t": epochs, "grace_period": grace, "reduction_factor": rf}})
    t0 = time.perf_counter()
    df = run_sweep(cfg, tmp / name, verbose=0)
    return {"epochs": int(df.epochs_run.sum()), "best_val_acc": float(df.best_val_acc.max()),
            "wall_s": time.perf_counter() - t0, "trials": len(df)}


def main() -> None:
    args = parser(__doc__).parse_args()
    trials, epochs, n = (2, 2, 300) if args.smoke else (16, 8, 3000)
    tmp = Path(tempfile.mkdtemp(prefix="fer_bench_asha_"))
    try:
        init_ray(num_cpus=2)
        full = sweep(tmp, "full", trials, epochs, grace=epochs, rf=2, n=n)
        asha = sweep(tmp, "asha", trials, epochs, grace=1, rf=4, n=n)
        emit("asha", {"trials": trials, "max_epochs": epochs, "full": full, "asha": asha,
                      "epoch_ratio": asha["epochs"] / full["epochs"],
                      "best_val_acc_gap_pt": 100 * (full["best_val_acc"] - asha["best_val_acc"]),
                      "target": "epoch_ratio <= 0.35, gap <= 0.5 pt"}, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
