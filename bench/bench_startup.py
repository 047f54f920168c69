"""Benchmark 3: per-trial start-up overhead. Each variant runs a 3-trial sweep of 1 tiny epoch per trial in
the same Ray instance: a plain Tune function trainable (baseline: reports once), fer_ray trials with Ray Train
local mode (0 workers), 1 worker and 2 DDP workers. Reported: sweep wall time per trial, and fer_ray's own
``startup_s`` (trial driver start → first training batch, measured inside the worker) with its phases in rank 0's
process (``fer_ray.train.StartupProfile``: spawn, import, Ray Train set-up, the loop's own set-up); medians."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from common import emit, parser
from ray import tune

from fer_ray.cluster import init_ray
from fer_ray.config import SweepConfig
from fer_ray.sweep import run_sweep


def baseline(trials: int, storage: Path) -> float:
    def trainable(config):
        tune.report({"val_acc": config["x"]})

    t0 = time.perf_counter()
    tune.Tuner(tune.with_resources(trainable, {"CPU": 1}), param_space={"x": tune.grid_search(list(range(trials)))},
               tune_config=tune.TuneConfig(max_concurrent_trials=1),
               run_config=tune.RunConfig(storage_path=str(storage), name="baseline", verbose=0)).fit()
    return (time.perf_counter() - t0) / trials


PHASES = ("startup_s", "startup_spawn_s", "startup_import_s", "startup_setup_s", "startup_loop_s")


def fer_ray_trials(workers: int, trials: int, tmp: Path) -> tuple[float, dict[str, float]]:
    cfg = SweepConfig.from_dict({
        "name": f"w{workers}", "data": {"synthetic_n": 300, "cache_dir": str(tmp / "cache")},
        "train": {"model": "basic_cnn", "img_size": 32, "epochs": 1, "batch_size": 32, "num_workers": workers,
                  "cpus_per_worker": 0.9 if workers > 1 else 1.0},
        "search_space": {"lr": {"grid": [1e-3 * (i + 1) for i in range(trials)]}}, "num_samples": 1,
        "asha": {"max_t": 1, "grace_period": 1}})
    exp = tmp / f"w{workers}"
    t0 = time.perf_counter()
    run_sweep(cfg, exp, verbose=0)
    per_trial = (time.perf_counter() - t0) / trials
    firsts = [json.loads(p.read_text())[0] for p in exp.glob("trials/*/history.json")]
    return per_trial, {k: float(np.median([h[k] for h in firsts])) for k in PHASES}


def main() -> None:
    args = parser(__doc__).parse_args()
    trials = 1 if args.smoke else 3
    tmp = Path(tempfile.mkdtemp(prefix="fer_bench_"))
    try:
        init_ray(num_cpus=2)
        result = {"trials": trials, "baseline_trial_s": baseline(trials, tmp)}
        for workers in ((0,) if args.smoke else (0, 1, 2)):
            per_trial, phases = fer_ray_trials(workers, trials, tmp)
            result[f"w{workers}_trial_s"] = per_trial
            result[f"w{workers}_startup_s"] = phases.pop("startup_s")
            result[f"w{workers}_phases_s"] = {k[len("startup_"):-2]: v for k, v in phases.items()}
        result["target"] = "1-worker <= 3 s; 2-worker <= 8 s (startup_s)"
        emit("startup", result, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
