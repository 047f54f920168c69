"""Benchmark 4: ASHA vs running every trial to the full budget, on the same search space and seeds (16 trials,
embedded synthetic dataset, local-mode trials two at a time). Reported: total epochs trained by each, their
ratio, and the best validation accuracy each found. Target: ≤ 0.35× the epochs, best val acc within 0.5 pt. Two
schedulers, same trials: Ray Tune's asynchronous ASHA and fer_ray's synchronous successive halving
(``asha.synchronous``, ``fer_ray.schedulers.SuccessiveHalving``).

What bounds it is read off the full-budget run's own learning curves, in the same run: how well each epoch's
``val_score`` ranks the trials' final best accuracy (Spearman), and synchronous successive halving replayed on
those curves for every (grace, reduction factor) within the epoch budget: the best gap any such schedule gets."""

from __future__ import annotations

import itertools
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
from common import emit, parser

from fer_ray.cluster import init_ray
from fer_ray.config import SweepConfig
from fer_ray.sweep import run_sweep


def sweep(tmp: Path, name: str, trials: int, epochs: int, grace: int, rf: float, n: int, sync: bool = False) -> dict:
    cfg = SweepConfig.from_dict({
        "name": name, "data": {"synthetic_n": n, "val_fraction": 0.25, "cache_dir": str(tmp / "cache")},
        "train": {"model": "basic_cnn", "img_size": 32, "epochs": epochs, "batch_size": 32, "optimizer": "adamw",
                  "num_workers": 0, "cpus_per_worker": 0.9},
        "search_space": {"lr": {"loguniform": [1e-4, 3e-3]}, "drop_rate": {"uniform": [0.1, 0.6]},
                         "augment.strength": {"uniform": [0.0, 1.5]}},
        "num_samples": trials, "seed": 0, "max_concurrent_trials": 2,
        "asha": {"max_t": epochs, "grace_period": grace, "reduction_factor": rf, "synchronous": sync}})
    t0 = time.perf_counter()
    df = run_sweep(cfg, tmp / name, verbose=0)
    df = df.sort_values("trial_id")
    return {"epochs": int(df.epochs_run.sum()), "best_val_acc": float(df.best_val_acc.max()),
            "wall_s": time.perf_counter() - t0, "trials": len(df), "best_trial": df.trial_id[df.best_val_acc.idxmax()],
            "epochs_per_trial": df.epochs_run.tolist(), "best_val_acc_per_trial": df.best_val_acc.round(4).tolist()}


def curves(exp: Path) -> dict[str, pd.DataFrame]:
    return {p.parent.name: pd.DataFrame(json.loads(p.read_text())) for p in sorted(exp.glob("trials/*/history.json"))}


def replay_sh(runs: dict[str, pd.DataFrame], grace: int, rf: int, max_t: int) -> tuple[float, float]:
    """Synchronous successive halving replayed on full-budget curves: every live trial runs to the rung, the top
    ⌈n/rf⌉ by that epoch's ``val_score`` go on. Returns (epochs used / full budget, best val acc seen)."""
    alive, done, used, rung = list(runs), dict.fromkeys(runs, 0), 0, grace
    while True:
        stop = min(rung, max_t)
        used += sum(stop - done[t] for t in alive)
        done.update(dict.fromkeys(alive, stop))
        if stop >= max_t or len(alive) == 1:
            break
        alive = sorted(alive, key=lambda t: runs[t].val_score.iloc[stop - 1], reverse=True)[:math.ceil(len(alive) / rf)]
        rung *= rf
    best = max(runs[t].val_acc.iloc[:done[t]].max() for t in runs)
    return used / (len(runs) * max_t), float(best)


def bounds(runs: dict[str, pd.DataFrame], max_t: int, budget: float = 0.35) -> dict:
    final = pd.Series({t: c.val_acc.max() for t, c in runs.items()})
    rank = {int(e): round(float(pd.Series({t: c.val_score.iloc[e - 1] for t, c in runs.items()})
                                .corr(final, method="spearman")), 3) for e in range(1, max_t + 1)}
    full_best, schedules = float(final.max()), []
    for grace, rf in itertools.product(range(1, max_t), (2, 3, 4, 6, 8)):
        ratio, best = replay_sh(runs, grace, rf, max_t)
        if ratio <= budget:
            schedules.append({"grace": grace, "rf": rf, "epoch_ratio": round(ratio, 3),
                              "gap_pt": round(100 * (full_best - best), 2)})
    return {"spearman_epoch_vs_final": rank,
            "best_sync_sh_within_budget": min(schedules, key=lambda d: d["gap_pt"], default=None)}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--max-epochs", type=int, default=16, help="max_t: the full budget of every trial")
    p.add_argument("--grace", type=int, default=2, help="ASHA grace period (first rung), epochs")
    p.add_argument("--rf", type=float, default=4, help="ASHA reduction factor")
    p.add_argument("--sh-grace", type=int, default=2, help="synchronous successive halving: grace period")
    p.add_argument("--sh-rf", type=float, default=2, help="synchronous successive halving: reduction factor "
                   "(defaults 2, 2: of the schedules planned to fit 0.35x the epochs, the one that spends the most)")
    p.add_argument("--images", type=int, default=3000, help="synthetic dataset size (a quarter is validation)")
    args = p.parse_args()
    # Smoke: 2 trials x 2 epochs, the least where a rung at epoch 1 can stop one trial; 120 images (72 train).
    trials, epochs, n = (2, 2, 120) if args.smoke else (args.trials, args.max_epochs, args.images)
    tmp = Path(tempfile.mkdtemp(prefix="fer_bench_asha_"))
    try:
        init_ray(num_cpus=2)
        full = sweep(tmp, "full", trials, epochs, grace=epochs, rf=2, n=n)
        full_curves = curves(tmp / "full")
        grace = 1 if args.smoke else args.grace
        asha = sweep(tmp, "asha", trials, epochs, grace=grace, rf=args.rf, n=n)
        sh_grace, sh_rf = (1, 2) if args.smoke else (args.sh_grace, args.sh_rf)
        sh = sweep(tmp, "sh", trials, epochs, grace=sh_grace, rf=sh_rf, n=n, sync=True)
        emit("asha", {"trials": trials, "max_epochs": epochs, "grace": grace, "rf": args.rf, "images": n,
                      "sh_grace": sh_grace, "sh_rf": sh_rf, "full": full, "asha": asha, "sync_sh": sh,
                      "epoch_ratio": asha["epochs"] / full["epochs"],
                      "best_val_acc_gap_pt": 100 * (full["best_val_acc"] - asha["best_val_acc"]),
                      "sync_sh_epoch_ratio": sh["epochs"] / full["epochs"],
                      "sync_sh_gap_pt": 100 * (full["best_val_acc"] - sh["best_val_acc"]),
                      "bounds": bounds(full_curves, epochs),
                      "target": "epoch_ratio <= 0.35, gap <= 0.5 pt"}, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
