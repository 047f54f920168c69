"""Weights & Biases logging, off unless a sweep asks for it (``wandb: true`` or ``fer-ray sweep --wandb``).

Per-trial configs and per-epoch metrics go through Ray's ``WandbLoggerCallback``; the trial table (with
params and GMACs) and the final leaderboard are logged once at the end. Without ``WANDB_API_KEY`` (and no
login) W&B runs in offline mode under ``<experiment>/wandb`` (``./wandb`` when the experiment is in a bucket); the
key itself is never printed or written.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from fer_ray.experiment import Experiment


def _wandb_dir(exp: Experiment) -> str:
    return str(exp.local_dir) if exp.local_dir else str(Path("wandb").absolute())


def _ensure_mode(exp: Experiment) -> None:
    os.environ.setdefault("WANDB_DIR", _wandb_dir(exp))
    if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"


def tune_callbacks(enabled: bool, project: str, exp: Experiment) -> list:
    """Ray Tune callbacks that log every trial to W&B (empty when disabled)."""
    if not enabled:
        return []
    from ray.air.integrations.wandb import WandbLoggerCallback

    _ensure_mode(exp)
    return [WandbLoggerCallback(project=project, group=exp.name, log_config=True, upload_checkpoints=False)]


def log_summary(enabled: bool, project: str, exp: Experiment, trials: pd.DataFrame, board: pd.DataFrame | None) -> None:
    """Log the trial table (params, GMACs) and the leaderboard as W&B tables in one summary run."""
    if not enabled:
        return
    import wandb

    _ensure_mode(exp)
    run = wandb.init(project=project, group=exp.name, name=f"{exp.name}-summary", job_type="summary",
                     dir=_wandb_dir(exp), reinit="finish_previous")
    run.log({"trials": wandb.Table(dataframe=trials.drop(columns=["config"], errors="ignore"))})
    if board is not None:
        run.log({"leaderboard": wandb.Table(dataframe=board)})
    run.finish()
