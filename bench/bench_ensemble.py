"""Benchmark 7: ensemble search over 20 stored members — load the logit store, fit greedy (Caruana) and
NLL-weight ensembles on val, and run the budget search with its Pareto front — on a generated experiment
(20 members × 4 TTA views × val 2,871 / public_test 3,589 images, FER-2013-sized). Target: < 2 s in all."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from common import emit, parser

from fer_ray.ensemble import EnsembleSpec, budget_search, run_ensemble
from fer_ray.store import load_store, write_logits

ROLES = {"train": "fit", "val": "select", "public_test": "report"}
VIEWS = ["identity", "hflip", "shift2,0", "shift-2,0"]


def make_experiment(root: Path, members: int, sizes: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    (root / "split_roles.json").write_text(json.dumps(ROLES))
    labels = {split: rng.integers(0, 7, n) for split, n in sizes.items()}
    rows = []
    for i in range(members):
        tid, strength = f"t{i:02d}", rng.uniform(0.5, 3.0)
        for split, y in labels.items():
            x = rng.normal(0, 1, (len(VIEWS), len(y), 7)).astype(np.float32)
            x[:, np.arange(len(y)), y] += strength
            ids = np.array([f"{split}{j}" for j in range(len(y))])
            meta = {"member": tid, "split": split, "role": ROLES[split], "views": VIEWS}
            write_logits(root, tid, split, x, y, ids, VIEWS, meta)
        rows.append({"trial_id": tid, "arch": "basic_cnn", "img_size": 48, "in_chans": 1, "params": 1000,
                     "gmacs": float(rng.uniform(0.02, 0.5)), "best_val_acc": strength / 3, "best_epoch": 1,
                     "epochs_run": 1, "stopped_early": False, "checkpoint": "x", "config": "{}"})
    pd.DataFrame(rows).to_parquet(root / "trials.parquet")


def main() -> None:
    p = parser(__doc__)
    args = p.parse_args()
    members = 4 if args.smoke else 20
    sizes = {"val": 300, "public_test": 300} if args.smoke else {"val": 2871, "public_test": 3589}
    with tempfile.TemporaryDirectory() as tmp:
        exp = Path(tmp)
        make_experiment(exp, members, sizes)
        times = {}
        t0 = time.perf_counter()
        load_store(exp)
        times["load_store_s"] = time.perf_counter() - t0
        t = time.perf_counter()
        run_ensemble(exp, EnsembleSpec(name="greedy", members={"top_k": members}, combiner="greedy"))
        times["greedy_s"] = time.perf_counter() - t
        t = time.perf_counter()
        run_ensemble(exp, EnsembleSpec(name="w", members={"top_k": members}, combiner="nll_weights"))
        times["nll_weights_s"] = time.perf_counter() - t
        t = time.perf_counter()
        out = budget_search(exp, budget_gmacs=1.0)
        times["budget_search_pareto_s"] = time.perf_counter() - t
        times["total_s"] = time.perf_counter() - t0
    emit("ensemble", {"members": members, "views": len(VIEWS), **sizes, **times,
                      "chosen_members": len(out.get("members", [])), "target": "total < 2 s"}, args)


if __name__ == "__main__":
    main()
