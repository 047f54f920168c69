"""The end-to-end flow over one experiment: sweep → TTA logits → ensemble → leaderboard.

With a time limit (``fer_ray.budget``) the run is calibrated and planned first and each stage's time recorded.
Each stage reads what the previous one wrote into the experiment (``fer_ray.experiment``: a local folder or a bucket
URI), so any stage can be re-run alone from the CLI without re-running the ones before it.
"""

from __future__ import annotations

import time

import pandas as pd

from fer_ray import budget
from fer_ray.config import SweepConfig
from fer_ray.data import prepare_dataset
from fer_ray.data.dataset import fingerprint
from fer_ray.ensemble import EnsembleSpec, run_ensemble
from fer_ray.experiment import Experiment, as_experiment
from fer_ray.inference import fill_store
from fer_ray.report import format_table, leaderboard, write_report
from fer_ray.sweep import run_sweep
from fer_ray.tracking import log_summary


def tta_stage(exp: Experiment | str, views: list[str] | None = None, prepared: tuple | None = None) -> list[str]:
    """Fill the logit store for every trial's best checkpoint on every non-fit split.

    ``prepared``: the sweep's ``(data, splits)`` from ``prepare_dataset`` when the caller already holds them.
    """
    exp = as_experiment(exp)
    cfg = exp.sweep()
    data, splits = prepared or prepare_dataset(cfg.data)
    exp.check_data(fingerprint(data, splits), cfg.data.path or "the synthetic generator")
    members = exp.members()  # the trials and their checkpoint library (distilled students are scored by distill)
    rows = members[members.kind != "distill"].reset_index()
    return fill_store(exp, data, splits, views or list(cfg.tta_views), exp.roles(), trials=rows)


def ensemble_stage(exp: Experiment | str, top_k: int, combiner: str = "mean_logits") -> dict:
    """The default ensemble: the top-k trials by validation accuracy, TTA logits averaged."""
    spec = EnsembleSpec.from_dict({"name": f"top{top_k}_{combiner}", "members": {"top_k": top_k, "by": "best_val_acc"},
                                   "combiner": combiner})
    return run_ensemble(exp, spec)


def report_stage(exp: Experiment | str, out: str | None = None) -> pd.DataFrame:
    """Write the leaderboard and report (into ``out``, default ``<experiment>/report``); return the leaderboard."""
    board = leaderboard(exp)
    write_report(exp, out, board)
    return board


def run_all(cfg: SweepConfig, exp: Experiment | str, resume: bool = False, num_cpus: int | None = None,
            sweep_only: bool = False, verbose: bool = False, started: float | None = None,
            limit_source: str = "time_limit") -> pd.DataFrame | None:
    """Sweep, then TTA, ensemble and leaderboard; prints progress and the leaderboard (``verbose``: Ray's trial
    tables and worker logs too).

    With ``cfg.time_limit`` the whole run is held to it (``fer_ray.budget``): calibrated and planned before the
    sweep (``budget.json``), the sweep's deadline enforced at epoch boundaries, each stage's time recorded.
    ``started``: the command's start on ``time.monotonic`` (default: now), from which the limit counts;
    ``limit_source`` names the limit in messages (``--time-limit``). On ``--resume`` the limit is this
    invocation's: Tune restores the experiment's trials and epochs, and the new deadline holds them."""
    exp = as_experiment(exp)
    t0 = time.perf_counter()
    stages = budget.StageClock(time.monotonic() if started is None else started)
    prepared = prepare_dataset(cfg.data)  # loaded, deduplicated and split once for the sweep and the TTA stage
    limit, deadline = cfg.time_limit_s(), None
    if limit is not None:
        cfg, deadline = budget.start(cfg, exp, *prepared, limit, stages, limit_source, resumed=resume,
                                     num_cpus=num_cpus)
    trials = run_sweep(cfg, exp, resume=resume, num_cpus=num_cpus, prepared=prepared, verbose=verbose,
                       deadline=deadline)
    stages.mark("sweep")
    print(f"[sweep] {len(trials)} trials in {time.perf_counter() - t0:.0f}s → {exp.uri_of('trials.parquet')}",
          flush=True)
    if sweep_only or trials.empty:
        if limit is not None:
            print(f"[budget] {budget.finish(exp, stages, final=True)}", flush=True)
        return None
    tta_stage(exp, prepared=prepared)
    stages.mark("tta")
    ensemble_stage(exp, min(cfg.ensemble_top_k, len(trials)))
    # Caruana greedy selection over every trial and its checkpoint library, on validation NLL, with temperature
    # scaling (val only).
    run_ensemble(exp, EnsembleSpec(name="greedy_nll", members={"top_k": len(exp.members()), "pool": "library"},
                                   combiner="greedy",
                                   greedy_metric="nll", temperature=True))
    if limit is not None:  # the report's budget line: the stages so far
        budget.finish(exp, stages)
    board = report_stage(exp)
    print(format_table(board), flush=True)
    log_summary(cfg.wandb, cfg.wandb_project, exp, trials, board)
    if limit is not None:
        stages.mark("ensembles_report")
        print(f"[budget] {budget.finish(exp, stages, final=True)}", flush=True)
    print(f"[done] {time.perf_counter() - t0:.0f}s total; report: {exp.uri_of('report')}", flush=True)
    return board
