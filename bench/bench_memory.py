"""Benchmark 9: memory of an 8-trial sweep vs one trial alone. The dataset (synthetic, 20,000 images ≈ 46 MB as
uint8) is put in Ray's object store once and every trial maps it zero-copy; each running trial then gathers its
train/val splits into its own arrays, which ``--images`` at two sizes shows (BENCHMARKS.md #9). Memory = summed
PSS (proportional set size, which splits shared object-store pages between the processes that map them) of every
Ray process and the driver, sampled every 0.25 s; reported as the peak, with the object store's own usage."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from common import emit, parser

from fer_ray.config import DataConfig, SweepConfig
from fer_ray.data import load_data
from fer_ray.sweep import run_sweep
from fer_ray.train import init_ray


class PeakPSS:
    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _total() -> int:
        """Summed PSS in bytes of this process and every process whose command line mentions ray (Linux /proc)."""
        total = 0
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes()
                if proc.name != str(os.getpid()) and b"ray" not in cmd:
                    continue
                for line in (proc / "smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
            except OSError:  # the process ended, or is not ours to read
                continue
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            time.sleep(0.25)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def sweep(tmp: Path, name: str, trials: int, n: int) -> dict:
    cfg = SweepConfig.from_dict({
        "name": name, "data": {"synthetic_n": n, "cache_dir": str(tmp / "cache")},
        "train": {"model": "basic_cnn", "img_size": 32, "epochs": 1, "batch_size": 64, "num_workers": 0,
                  "cpus_per_worker": 0.9},
        "search_space": {"lr": {"grid": [1e-3 * (i + 1) for i in range(trials)]}}, "num_samples": 1,
        "max_concurrent_trials": 2, "asha": {"max_t": 1, "grace_period": 1}})
    with PeakPSS() as mem:
        run_sweep(cfg, tmp / name, verbose=0)
    return {"trials": trials, "peak_pss_mb": mem.peak / 2**20}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--images", type=int, default=20000, help="synthetic dataset size (default 20000); run two sizes: "
                   "if the dataset is held once, the sweep's growth over one trial does not depend on it")
    args = p.parse_args()
    n = 500 if args.smoke else args.images
    tmp = Path(tempfile.mkdtemp(prefix="fer_bench_mem_"))
    try:
        # Draw and cache the dataset first, so neither measurement includes generating it (that peak, ~30 bytes
        # per pixel in float temporaries, would otherwise land on whichever sweep runs first).
        load_data(DataConfig(synthetic_n=n, cache_dir=str(tmp / "cache")))
        init_ray(num_cpus=2)
        one = sweep(tmp, "one", 1, n)
        many = sweep(tmp, "many", 2 if args.smoke else 8, n)
        emit("memory", {"images": n, "dataset_mb": n * 48 * 48 / 2**20, "one_trial": one, "sweep": many,
                        "growth_mb": many["peak_pss_mb"] - one["peak_pss_mb"],
                        "target": "growth well below (trials - concurrent) × dataset size"}, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
