"""Benchmark 17: search at an equal budget (issue 25): random search + successive halving (the baseline and the
default), Optuna TPE + successive halving, and population-based training, 3 seeds each, on one fixed task. Reported
per arm: the best validation accuracy each seed's sweep found, their mean, standard deviation and min-max (the
spread), the trial-epochs each used and wall seconds; then each arm's gap to random search in points, beside the
spread.

The task: the embedded synthetic dataset (fixed generator and split seeds; by default 2,000 images, 1,200 train / 400
val / 400 test, the test split unused), basic_cnn at 32 px, batch 16, AdamW with a cosine schedule to the trials'
last epoch, local-mode trials (``num_workers: 0``) two at a time, the same search space in every arm: ``lr``
(loguniform), ``weight_decay`` (loguniform) and ``augment.strength`` (uniform), the three fields PBT can mutate in a
running trial (dropout would need another model). The figure is the validation accuracy of the best model each sweep
hands over (``trials.parquet`` ``best_val_acc``, the sweeps' selection metric: each trial's best epoch under
successive halving, its final epoch under PBT); no test split is scored. PBT's best validation accuracy at any epoch
of any trial is recorded beside it (``best_val_acc_any_epoch``).

The scheduler: both successive-halving arms use Ray Tune's asynchronous ASHA (``asha.synchronous: false``), with
the same ``num_samples``, grace period, reduction factor and ``max_t``. Not the synchronous halving bench 4
prefers: under it every trial of the bracket is proposed before any result exists, so TPE's proposals would all be
its random start-up draws (docs/sweeps.md). Two trials run at once in both (``max_concurrent_trials`` for random,
``search.max_concurrent`` for TPE), so TPE proposes each trial from the results of all but the one running beside
it; random search gets the same scheduler and concurrency, so the two differ only in how configs are proposed.

The budget is trial-epochs (every epoch a trial trains; the fair unit on a shared machine, where wall seconds vary
with load): the successive-halving arms run first, on all seeds, and their measured epochs are averaged; PBT then
gets trials as long as theirs can be (``train.epochs`` = ``max_t``) and a population of round(that mean / max_t),
at least 2, so its population × epochs is as close to the successive-halving arms' mean as whole trials allow. PBT
is synchronous (``pbt.synch``: every trial reaches each interval before the bottom quantile copies the top one, so
every trial trains each of its epochs once and population × epochs is exactly what it trains; asynchronous PBT with
2 of the population running at a time would let the first trials finish before the last start, and those would copy
finished trials), mutating the same three fields over the search space's ranges. Its price is wall time: every trial
pauses at every interval and resumes from its checkpoint in a new process. Both budgets are reported, and the wall
seconds.

A seed is the sweep's ``seed`` (random draws, TPE's sampler, PBT's starting population: the same draws as the first
trials of random search with that seed), the trials' training ``seed``, and Python's ``random`` in this driver (where
Tune's PBT draws its perturbations); the data stays fixed."""

from __future__ import annotations

import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import emit, parser

from fer_ray.cluster import init_ray
from fer_ray.config import SweepConfig
from fer_ray.sweep import run_sweep

LR, WD, STRENGTH = {"loguniform": [1e-4, 3e-3]}, {"loguniform": [1e-5, 1e-1]}, {"uniform": [0.0, 1.5]}


def base(tmp: Path, name: str, seed: int, n: int, epochs: int, batch: int) -> dict:
    return {"name": name, "data": {"synthetic_n": n, "val_fraction": 0.25, "cache_dir": str(tmp / "cache")},
            "train": {"model": "basic_cnn", "img_size": 32, "epochs": epochs, "batch_size": batch, "optimizer": "adamw",
                      "num_workers": 0, "cpus_per_worker": 0.9, "seed": seed},
            "search_space": {"lr": LR, "weight_decay": WD, "augment.strength": STRENGTH}, "seed": seed}


def run(tmp: Path, d: dict) -> dict:
    random.seed(d["seed"])
    t0 = time.perf_counter()
    df = run_sweep(SweepConfig.from_dict(d), tmp / d["name"], verbose=0)
    wall = time.perf_counter() - t0
    best = df.loc[df.best_val_acc.idxmax()]
    tc = json.loads(best.config)
    out = {"best_val_acc": float(best.best_val_acc), "epochs": int(df.epochs_run.sum()), "wall_s": round(wall, 1),
           "trials": len(df), "epochs_per_trial": df.sort_values("trial_id").epochs_run.tolist(),
           "best_config": {"lr": float(f"{tc['lr']:.3g}"), "weight_decay": float(f"{tc['weight_decay']:.3g}"),
                           "augment.strength": round(tc["augment"]["strength"], 3)},
           # PBT: the exploit steps of the best trial's lineage (epoch, donor, changed fields); [] otherwise
           "best_mutations": json.loads(best.get("mutations", "[]") or "[]")}
    histories = [json.loads(p.read_text()) for p in sorted((tmp / d["name"]).glob("trials/*/history.json"))]
    out["best_val_acc_any_epoch"] = max(h["val_acc"] for hist in histories for h in hist)
    splits = json.loads((tmp / d["name"] / "data.json").read_text())["splits"]
    out["split_sizes"] = {k: v["n"] for k, v in splits.items()}
    shutil.rmtree(tmp / d["name"], ignore_errors=True)  # checkpoints: keep the temp folder small
    return out


def sh_arm(tmp: Path, algorithm: str, seed: int, trials: int, max_t: int, grace: int, rf: float, n: int,
           batch: int, startup: int) -> dict:
    d = base(tmp, f"{algorithm}_s{seed}", seed, n, max_t, batch) | {
        "num_samples": trials, "asha": {"max_t": max_t, "grace_period": grace, "reduction_factor": rf,
                                        "synchronous": False}}
    if algorithm == "optuna":
        d["search"] = {"algorithm": "optuna", "n_startup_trials": startup, "max_concurrent": 2}
    else:
        d["max_concurrent_trials"] = 2
    return run(tmp, d)


def pbt_arm(tmp: Path, seed: int, population: int, epochs: int, interval: int, n: int, batch: int,
            synch: bool = True) -> dict:
    d = base(tmp, f"pbt_s{seed}", seed, n, epochs, batch) | {
        "num_samples": population, "max_concurrent_trials": 2, "scheduler": "pbt", "asha": {"max_t": epochs},
        "pbt": {"perturbation_interval": interval, "quantile_fraction": 0.25, "resample_probability": 0.25,
                "synch": synch, "mutations": {"lr": LR, "weight_decay": WD, "augment.strength": STRENGTH}}}
    return run(tmp, d)


def summary(runs: list[dict]) -> dict:
    best = [r["best_val_acc"] for r in runs]
    return {"best_val_acc_per_seed": [round(b, 4) for b in best], "mean": round(statistics.fmean(best), 4),
            "std": round(statistics.stdev(best), 4) if len(best) > 1 else 0.0,
            "min": round(min(best), 4), "max": round(max(best), 4),
            "epochs_per_seed": [r["epochs"] for r in runs],
            "epochs_mean": round(statistics.fmean(r["epochs"] for r in runs), 1),
            "wall_s_per_seed": [r["wall_s"] for r in runs], "wall_s": round(sum(r["wall_s"] for r in runs), 1)}


def versus(arm: dict, baseline: dict) -> dict:
    """The arm's gap to the baseline's mean, in points, beside the larger of the two seed spreads; ``beyond_spread``
    only when the ranges over seeds do not overlap."""
    return {"gap_pt": round(100 * (arm["mean"] - baseline["mean"]), 2),
            "spread_pt": round(100 * max(arm["std"], baseline["std"]), 2),
            "beyond_spread": arm["min"] > baseline["max"] or arm["max"] < baseline["min"]}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--trials", type=int, default=10, help="num_samples of the successive-halving arms")
    p.add_argument("--max-epochs", type=int, default=8, help="max_t, and every PBT trial's epochs")
    p.add_argument("--grace", type=int, default=2, help="ASHA grace period (first rung), epochs")
    p.add_argument("--rf", type=float, default=2, help="ASHA reduction factor")
    p.add_argument("--startup", type=int, default=4, help="TPE's seeded random trials before it models results")
    p.add_argument("--interval", type=int, default=2, help="PBT perturbation interval, epochs")
    p.add_argument("--images", type=int, default=2000, help="synthetic dataset size (train/val/test 60/20/20)")
    p.add_argument("--batch", type=int, default=16, help="batch size (16: 75 steps an epoch on 1,200 training "
                   "images; at 32 the trials barely leave the majority class within 8 epochs)")
    args = p.parse_args()
    # Smoke: one seed, 2 trials x 2 epochs per arm (a rung at epoch 1; a PBT decision at epoch 1), 120 images. Its
    # PBT is asynchronous: both trials run at once, and synchronous PBT would pause and restart both (+14 s here).
    if args.smoke:
        seeds, trials, max_t, grace, startup, interval, n = [0], 2, 2, 1, 1, 1, 120
    else:
        seeds, trials, max_t, grace, startup, interval, n = (args.seeds, args.trials, args.max_epochs, args.grace,
                                                             args.startup, args.interval, args.images)
    tmp = Path(tempfile.mkdtemp(prefix="fer_bench_search_"))
    try:
        init_ray(num_cpus=2)
        sh: dict[str, list[dict]] = {"random": [], "optuna": []}
        for seed in seeds:  # the two arms alternate, so a slower spell of the machine falls on both
            for algorithm in sh:
                sh[algorithm].append(sh_arm(tmp, algorithm, seed, trials, max_t, grace, args.rf, n, args.batch,
                                               startup))
        budget = statistics.fmean(r["epochs"] for runs in sh.values() for r in runs)
        population = max(2, round(budget / max_t))
        pbt = [pbt_arm(tmp, seed, population, max_t, interval, n, args.batch, synch=not args.smoke) for seed in seeds]
        arms = {"random_sh": summary(sh["random"]), "tpe_sh": summary(sh["optuna"]), "pbt": summary(pbt)}
        arms["pbt"]["best_val_acc_any_epoch_per_seed"] = [round(r["best_val_acc_any_epoch"], 4) for r in pbt]
        emit("search", {"seeds": seeds, "images": n, "split_sizes": pbt[0]["split_sizes"], "batch": args.batch,
                        "trials": trials,
                        "max_epochs": max_t, "grace": grace, "rf": args.rf, "tpe_startup": startup,
                        "pbt_population": population, "pbt_epochs": max_t, "pbt_interval": interval,
                        "sh_epochs_mean": round(budget, 1), "pbt_epochs_total": population * max_t,
                        **arms, "tpe_vs_random": versus(arms["tpe_sh"], arms["random_sh"]),
                        "pbt_vs_random": versus(arms["pbt"], arms["random_sh"]),
                        "runs": {"random_sh": sh["random"], "tpe_sh": sh["optuna"], "pbt": pbt},
                        "target": "report the spread (val accuracy, equal trial-epochs)"}, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
