"""The end-to-end flow over one experiment folder: sweep → TTA logits → ensemble → leaderboard.

Each stage reads what the previous one wrote under ``results/<experiment>/`` (layout in ``fer_ray.sweep``),
so any stage can be re-run alone from the CLI without re-running the ones before it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from fer_ray.config import SweepConfig, load_sweep
from fer_ray.ensemble import EnsembleSpec, run_ensemble
from fer_ray.report import format_table, write_report
from fer_ray.sweep import run_sweep
from fer_ray.tracking import log_summary
from fer_ray.train import prepare_dataset
from fer_ray.tta import fill_store


def tta_stage(exp_dir: Path, views: list[str] | None = None, prepared: tuple | None = None) -> list[Path]:
    """Fill the logit store for every trial's best checkpoint on every non-fit split.

    ``prepared``: the sweep's ``(data, splits)`` from ``prepare_dataset`` when the caller already holds them.
    """
    cfg = load_sweep(exp_dir / "sweep.yaml")
    data, splits = prepared or prepare_dataset(cfg.data)
    roles = json.loads((exp_dir / "split_roles.json").read_text())
    return fill_store(exp_dir, data, splits, views or list(cfg.tta_views), roles)


def ensemble_stage(exp_dir: Path, top_k: int, combiner: str = "mean_logits") -> dict:
    """The default ensemble: the top-k trials by validation accuracy, TTA logits averaged."""
    spec = EnsembleSpec.from_dict({"name": f"top{top_k}_{combiner}", "members": {"top_k": top_k, "by": "best_val_acc"},
                                   "combiner": combiner})
    return run_ensemble(exp_dir, spec)


def report_stage(exp_dir: Path, out_dir: Path | None = None) -> pd.DataFrame:
    paths = write_report(exp_dir, out_dir or exp_dir / "report")
    return pd.read_csv(paths["csv"])


def run_all(cfg: SweepConfig, exp_dir: str | Path, resume: bool = False, num_cpus: int | None = None,
            sweep_only: bool = False) -> pd.DataFrame | None:
    """Sweep, then TTA, ensemble and leaderboard; prints progress and the leaderboard."""
    exp_dir = Path(exp_dir).absolute()
    t0 = time.perf_counter()
    prepared = prepare_dataset(cfg.data)  # loaded, deduplicated and split once for the sweep and the TTA stage
    trials = run_sweep(cfg, exp_dir, resume=resume, num_cpus=num_cpus, prepared=prepared)
    print(f"[sweep] {len(trials)} trials in {time.perf_counter() - t0:.0f}s → {exp_dir / 'trials.parquet'}", flush=True)
    if sweep_only or trials.empty:
        return None
    tta_stage(exp_dir, prepared=prepared)
    ensemble_stage(exp_dir, min(cfg.ensemble_top_k, len(trials)))
    # Caruana greedy selection over every trial, on validation NLL, with temperature scaling (val only).
    run_ensemble(exp_dir, EnsembleSpec(name="greedy_nll", members={"top_k": len(trials)}, combiner="greedy",
                                       greedy_metric="nll", temperature=True))
    board = report_stage(exp_dir)
    print(format_table(board), flush=True)
    log_summary(cfg.wandb, cfg.wandb_project, exp_dir, trials, board)
    print(f"[done] {time.perf_counter() - t0:.0f}s total; report: {exp_dir / 'report'}", flush=True)
    return board
