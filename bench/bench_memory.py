"""Benchmark 9: memory of an 8-trial sweep vs one trial alone, at several dataset sizes.

The dataset (synthetic; 20,000 images ≈ 44 MB as uint8) is put in Ray's object store once and every trial maps it
zero-copy. Memory = summed PSS (proportional set size, which splits shared object-store pages between the processes
that map them) of every Ray process and the driver, sampled every 0.25 s; reported as the peak. The 8-trial sweep
runs ``--concurrent`` trials at a time (default 4, 0.5 CPU each), so a private copy of the data per running trial
would cost (concurrent − 1) extra copies over the single trial. Per-process overhead (torch, Ray) does not depend on
the dataset, so the figures that answer "held once?" are slopes between two sizes, per extra MB of dataset: the
sweep's growth over one trial (≈ 0 if held once, ≈ concurrent − 1 with a copy per running trial), and the largest
anonymous (private, not object-store) memory of any one Ray worker process (≈ 0 if held once, ≈ 1 with a copy).
Last, one Ray task maps the largest dataset and measures the private memory its splits cost, gathered into arrays
of their own (the baseline, in the same run) and as fer_ray's views."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import ray
from common import emit, parser

from fer_ray.cluster import init_ray, put_dataset
from fer_ray.config import DataConfig, SweepConfig
from fer_ray.data import load_data, prepare_dataset
from fer_ray.sweep import run_sweep


class PeakPSS:
    """Peak summed PSS of the driver and every Ray process, and the peak anonymous (private heap) memory of any
    single Ray worker process: a trial holding its own copy of the data shows it there."""

    def __init__(self):
        self.peak, self.worker_anon, self._stop = 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _sample() -> tuple[int, int]:
        """(summed PSS of this process and every process whose command line mentions ray, largest Anonymous of
        one Ray worker process ``ray::...``), in bytes, from Linux /proc."""
        total, anon = 0, 0
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes()
                if proc.name != str(os.getpid()) and b"ray" not in cmd:
                    continue
                fields = dict(line.split(":", 1) for line in (proc / "smaps_rollup").read_text().splitlines()[1:])
                total += int(fields["Pss"].split()[0]) * 1024
                if cmd.startswith(b"ray::"):
                    anon = max(anon, int(fields["Anonymous"].split()[0]) * 1024)
            except (OSError, KeyError, ValueError):  # the process ended, or is not ours to read
                continue
        return total, anon

    def _run(self):
        while not self._stop.is_set():
            total, anon = self._sample()
            self.peak, self.worker_anon = max(self.peak, total), max(self.worker_anon, anon)
            time.sleep(0.25)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _anon_mb() -> float:
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@ray.remote(num_cpus=0.5)
def split_cost(holder: list, gather: bool) -> float:
    """MB of private memory one trial process adds to hold its train and val splits of the shared dataset:
    ``gather`` = index them into arrays of their own (a notebook's ``images[train_idx]``; fer_ray before
    2026-11-26), else fer_ray's views (``fer_ray.loop.split_tensors``)."""
    import torch

    from fer_ray.loop import split_tensors

    arrays = ray.get(holder[0])  # the object store's pages, mapped read-only
    before = _anon_mb()
    if gather:
        held = [torch.from_numpy(np.ascontiguousarray(arrays["images"][arrays["splits"][s]])) for s in ("train", "val")]
    else:
        held = split_tensors(arrays, torch.device("cpu"))
    after = _anon_mb()
    del held
    return after - before


def sweep(tmp: Path, name: str, trials: int, n: int, concurrent: int) -> dict:
    cfg = SweepConfig.from_dict({
        "name": name, "data": {"synthetic_n": n, "cache_dir": str(tmp / "cache")},
        "train": {"model": "basic_cnn", "img_size": 32, "epochs": 1, "batch_size": 64, "num_workers": 0,
                  "cpus_per_worker": 2 / concurrent - 0.05},
        "search_space": {"lr": {"grid": [1e-3 * (i + 1) for i in range(trials)]}}, "num_samples": 1,
        "max_concurrent_trials": concurrent, "asha": {"max_t": 1, "grace_period": 1}})
    with PeakPSS() as mem:
        run_sweep(cfg, tmp / f"{name}_{n}", verbose=0)
    return {"trials": trials, "concurrent": min(trials, concurrent), "peak_pss_mb": mem.peak / 2**20,
            "worker_anon_mb": mem.worker_anon / 2**20}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--images", type=int, nargs="+", default=[20000, 80000],
                   help="synthetic dataset sizes (default 20000 80000); two or more give the slope")
    p.add_argument("--concurrent", type=int, default=4, help="trials running at once in the 8-trial sweep")
    args = p.parse_args()
    sizes = [150] if args.smoke else args.images  # smoke: one size (each size is two sweeps); no slope
    tmp = Path(tempfile.mkdtemp(prefix="fer_bench_mem_"))
    try:
        init_ray(num_cpus=2)
        rows = []
        for n in sizes:
            # Draw and cache the dataset first, so no measurement includes generating it (that peak, ~30 bytes
            # per pixel in float temporaries, would otherwise land on whichever sweep runs first).
            load_data(DataConfig(synthetic_n=n, cache_dir=str(tmp / "cache")))
            one = sweep(tmp, "one", 1, n, args.concurrent)
            many = sweep(tmp, "many", 2 if args.smoke else 8, n, args.concurrent)
            rows.append({"images": n, "dataset_mb": n * 48 * 48 / 2**20, "one_trial_mb": one["peak_pss_mb"],
                         "sweep_mb": many["peak_pss_mb"], "concurrent": many["concurrent"],
                         "growth_mb": many["peak_pss_mb"] - one["peak_pss_mb"],
                         "worker_anon_mb": max(one["worker_anon_mb"], many["worker_anon_mb"])})
            print(rows[-1], flush=True)
        # The same question asked of one trial process directly, baseline in the same run: the largest dataset.
        holder = [put_dataset(*prepare_dataset(DataConfig(synthetic_n=sizes[-1], cache_dir=str(tmp / "cache"))))]
        per_trial = {"gathered_splits_mb": ray.get(split_cost.remote(holder, True)),
                     "fer_ray_views_mb": ray.get(split_cost.remote(holder, False))}
        print(per_trial, flush=True)
        slope = None
        if len(rows) > 1:
            a, b = rows[0], rows[-1]
            per_mb = b["dataset_mb"] - a["dataset_mb"]
            slope = {"sweep_growth": (b["growth_mb"] - a["growth_mb"]) / per_mb,
                     "worker_anon": (b["worker_anon_mb"] - a["worker_anon_mb"]) / per_mb}
        emit("memory", {"sizes": rows, "per_dataset_mb": slope, "one_trial_process": per_trial,
                        "target": f"fer_ray_views_mb ≈ 0 and per_dataset_mb ≈ 0 (held once); a copy per running "
                                  f"trial would give worker_anon ≈ 1, sweep_growth ≈ {args.concurrent - 1}"}, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
