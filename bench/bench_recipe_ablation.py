"""Issue 24's ablation: the fast recipe (``--sweep``'s train config, default ``sweeps/fer2013_fast.yaml``) and the
recipe with one speed lever changed at a time (``ABLATIONS``). Every variant trains per seed through
``fer_ray.loop.TrainingRun`` (with the EMA hook when it has EMA) for a fixed wall budget, on the same split in the
same process; a row is the median over seeds of the best val accuracy among the epochs finished within the budget,
and of the training images per second. Validation only: no test split is read. One JSON line per row, then the
Markdown table docs/recipe.md takes."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from common import emit, parser

from fer_ray.config import TrainConfig, load_sweep, set_path
from fer_ray.data import prepare_dataset
from fer_ray.loop import EMA, Hook, TrainingRun

REPO = Path(__file__).resolve().parent.parent
REAL = REPO.parent / "shared" / "data" / "fer2013"

ABLATIONS: dict[str, dict] = {
    "recipe": {},
    "no whitening": {"whiten.enabled": False},
    "whitened, trainable": {"whiten.frozen": False},
    "AdamW 2e-3 instead of sgd_nesterov": {"optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.05,
                                           "bn_bias_lr_mult": 1.0},
    "BN-bias lr ×1": {"bn_bias_lr_mult": 1.0},
    "no label smoothing": {"label_smoothing": 0.0},
    "no EMA": {"ema.decay": 0.0},
    "Lookahead k=5": {"lookahead.k": 5},
    "random flips": {"augment.alternate_flip": False},
    "cosine per epoch": {"scheduler": "cosine", "warmup_fraction": 0.0, "warmup_epochs": 1},
    "one-cycle": {"scheduler": "onecycle"},
    "no progressive resizing": {"resize_stages": []},
    "deep_cnn_v1 (v2's net)": {"model": "deep_cnn_v1", "model_kwargs": {}, "whiten.enabled": False},
    "torch.compile": {"compile": True},
    "fp32 (no bf16)": {"amp": "off"},
}


def variant(base: TrainConfig, changes: dict) -> TrainConfig:
    raw = base.to_dict()
    for key, value in changes.items():
        raw = set_path(raw, key, value)
    return TrainConfig.from_dict(raw, "train")


class Budget(Hook):
    """Stops after the first epoch that ends past ``limit_s``. ``best`` is the best val acc among the epochs that
    ended within the budget (``within`` of them); ``curve`` holds every epoch trained, the last one possibly past it.
    ``clock``: injectable for tests."""

    def __init__(self, limit_s: float | None, clock=time.perf_counter):
        self.limit_s, self.clock = limit_s, clock
        self.t0, self.best, self.within, self.images, self.train_s, self.curve = clock(), 0.0, 0, 0, 0.0, []

    def after_epoch(self, run: TrainingRun, metrics: dict) -> None:
        elapsed = self.clock() - self.t0
        within = self.limit_s is None or elapsed <= self.limit_s
        self.curve.append({"epoch": run.epoch, "s": round(elapsed, 1), "val_acc": metrics["val_acc"],
                           "within": within})
        if within:
            self.best, self.within = max(self.best, metrics["val_acc"]), self.within + 1
            self.images, self.train_s = self.images + metrics["images"], self.train_s + metrics["train_time_s"]
        run.stop = not within


def measure(cfg: TrainConfig, arrays: dict, limit_s: float | None) -> dict:
    """One seed: best val within the budget, the epochs within it, the last epoch's val (``last_val_acc``, past the
    budget if the run was cut) and the epochs trained, img/s of the epochs within the budget, the whole curve."""
    budget = Budget(limit_s)
    run = TrainingRun(cfg, arrays, torch.device("cpu"))
    budget.t0 = budget.clock()
    run.fit(([EMA(cfg.ema.decay, cfg.ema.warmup)] if cfg.ema.decay else []) + [budget])
    return {"best_val_acc": budget.best, "epochs_within": budget.within, "last_val_acc": budget.curve[-1]["val_acc"],
            "epochs": run.epoch, "img_per_s": budget.images / max(budget.train_s, 1e-9), "curve": budget.curve}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--data", default=str(REAL), help="FER-2013 image folders (default: ../shared/data/fer2013)")
    p.add_argument("--sweep", default=str(REPO / "sweeps" / "fer2013_fast.yaml"))
    p.add_argument("--minutes", type=float, default=10.0, help="wall budget per variant and seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--only", nargs="+", choices=sorted(ABLATIONS), help="run only these rows")
    args = p.parse_args()
    torch.set_num_threads(2)
    sweep = load_sweep(args.sweep)
    base, limit = sweep.train, args.minutes * 60
    if args.smoke:  # synthetic faces, fixed work (2 epochs of a narrow net), no wall budget
        data_cfg = sweep.data.replace(path=None, synthetic_n=200, cache_dir="/tmp/fer_bench_cache")
        base, limit = base.replace(epochs=2, batch_size=32, model_kwargs={"width": 0.125}), None
    else:
        data_cfg = sweep.data.replace(path=args.data)
    data, splits = prepare_dataset(data_cfg)
    arrays = {"images": data.images, "labels": data.labels, "splits": splits}
    rows = []
    # Smoke: not the torch.compile row (inductor's first compile alone takes about a minute on 2 cores; the flag's
    # wiring and fallback are tests/test_fast_recipe.py's), unless asked for with --only.
    names = args.only or [n for n in ABLATIONS if not (args.smoke and ABLATIONS[n].get("compile"))]
    for name in names:
        cfg = variant(base, ABLATIONS[name])
        runs = [measure(cfg.replace(seed=s), arrays, limit) for s in args.seeds]
        row = {"lever": name, "val_acc": statistics.median(r["best_val_acc"] for r in runs),
               "last_val_acc": statistics.median(r["last_val_acc"] for r in runs),
               "img_per_s": statistics.median(r["img_per_s"] for r in runs), "runs": runs,
               "minutes": args.minutes, "seeds": args.seeds, "changes": ABLATIONS[name]}
        rows.append(emit("recipe_ablation", row, args))
    print(f"\n| lever | val acc at {args.minutes:g} min (median of {len(args.seeds)}) | the seeds (epochs within) "
          "| last epoch's val (epochs trained) | train img/s |\n|---|---|---|---|---|")
    for r in rows:
        seeds = ", ".join(f"{x['best_val_acc']:.4f} ({x['epochs_within']})" for x in r["runs"])
        last = ", ".join(f"{x['last_val_acc']:.4f} ({x['epochs']})" for x in r["runs"])
        print(f"| {r['lever']} | {r['val_acc']:.4f} | {seeds} | {last} | {r['img_per_s']:,.0f} |")


if __name__ == "__main__":
    main()
