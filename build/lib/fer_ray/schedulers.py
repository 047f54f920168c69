"""The sweep's trial schedulers: Ray Tune's (asynchronous) ASHA, ``SuccessiveHalving`` (synchronous successive
halving as one bracket of Tune's HyperBand) or Ray Tune's population-based training (``pbt_scheduler``, mutations
kept inside their bounds); ``make_scheduler`` picks one from a ``SweepConfig`` (``scheduler``, ``asha``, ``pbt``).

Tune pickles the scheduler into the experiment's ``tuner.pkl`` by module path: experiments started before this
module existed name ``fer_ray.sweep.SuccessiveHalving``, which ``fer_ray.sweep`` keeps as an alias so that they
still ``--resume`` (tests/test_schedulers.py).
"""

from __future__ import annotations

import math

from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, HyperBandScheduler, PopulationBasedTraining, TrialScheduler

# Private: Tune has no public synchronous successive halving; one HyperBand bracket is one (tests/test_ray_internals.py
# fails if an upgrade moves what SuccessiveHalving overrides).
from ray.tune.schedulers.hyperband import _Bracket

from fer_ray.config import SweepConfig, _get_path, set_path


class SuccessiveHalving(HyperBandScheduler):
    """Synchronous successive halving: Ray Tune's HyperBand with exactly one bracket holding every trial.

    All ``num_trials`` trials run ``grace_period`` epochs; a trial that gets there first is paused (Tune stops
    its process; it resumes from its epoch checkpoint). When all have reported, the best ⌈n / reduction_factor⌉
    go on to ``grace_period × reduction_factor`` epochs, and so on up to ``max_t``. Trials start only while
    fewer than ``max_running`` run: Tune's searcher-side limit counts paused trials as live and would deadlock.
    On ``--resume`` the bracket restarts: finished trials are left out (they cannot report again) and the live
    ones, already past the rungs they had cleared, are halved through those rungs again (keeping all of them, as
    they are the ones the interrupted run kept) until the interrupted rung's decision is due.
    """

    def __init__(self, *, max_t: int, grace_period: int, reduction_factor: float, num_trials: int,
                 max_running: int | None = None, time_attr: str = "epoch"):
        super().__init__(time_attr=time_attr, max_t=max_t, reduction_factor=reduction_factor)
        self._s_max_1 = 1  # one bracket per band: the band is full once it holds the bracket
        self._get_n0 = lambda s: num_trials
        self._get_r0 = lambda s: grace_period
        self._halvings = max(0, math.ceil(math.log(max_t / grace_period, reduction_factor) - 1e-9))
        self._max_running = max_running

    def _create_bracket(self, s: int) -> _Bracket:
        return _Bracket(time_attr=self._time_attr, max_trials=self._get_n0(s), init_t_attr=self._get_r0(s),
                        max_t_attr=self._max_t_attr, eta=self._eta, s=self._halvings,
                        stop_last_trials=self._stop_last_trials)

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        if trial.status in (Trial.TERMINATED, Trial.ERROR):  # restored from a resumed sweep: done already
            return
        super().on_trial_add(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        if trial in self._trial_info:
            super().on_trial_remove(tune_controller, trial)

    def _process_bracket(self, tune_controller, bracket: _Bracket) -> str:
        action = super()._process_bracket(tune_controller, bracket)
        # Trials restored by ``--resume`` may already be past several rungs (the bracket restarts at the first):
        # halve again while everyone is past the current rung, so that one of them goes on instead of all waiting.
        while (action == TrialScheduler.PAUSE and not bracket.trials_to_unpause and bracket.cur_iter_done()
               and not bracket.finished()):
            action = super()._process_bracket(tune_controller, bracket)
        return action

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        running = sum(t.status == Trial.RUNNING for t in tune_controller.get_trials())
        if self._max_running and running >= self._max_running:
            return None
        return super().choose_trial_to_run(tune_controller)


def make_scheduler(cfg: SweepConfig, max_running: int | None = None) -> TrialScheduler:
    """The sweep's scheduler on the trials' ``epoch``; Tune hands it ``cfg.metric``/``cfg.mode`` (default
    ``val_score``). ``scheduler: pbt`` selects population-based training; else ``asha.synchronous`` selects
    ``SuccessiveHalving`` (running at most ``max_running`` trials, default ``cfg.max_concurrent_trials``), else Ray
    Tune's (asynchronous) ASHA."""
    if cfg.scheduler == "pbt":
        return pbt_scheduler(cfg)
    a = cfg.asha
    if a.synchronous:
        return SuccessiveHalving(max_t=a.max_t, grace_period=a.grace_period, reduction_factor=a.reduction_factor,
                                 num_trials=cfg.num_trials(), max_running=max_running or cfg.max_concurrent_trials)
    return ASHAScheduler(time_attr="epoch", max_t=a.max_t, grace_period=a.grace_period,
                         reduction_factor=a.reduction_factor)


_PBT_DOMAINS = {"uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
                "choice": list}


class ClipToBounds:
    """PBT's explore step multiplies a continuous value by 0.8 or 1.2, which can leave its range (and make an
    invalid train config): put each mutated ``uniform``/``loguniform`` field back inside its ``[lo, hi]``. A plain
    class, so Tune can pickle the scheduler into the experiment for ``--resume``."""

    def __init__(self, mutations: dict):
        self.bounds = {k: v[next(iter(v))] for k, v in mutations.items() if next(iter(v)) != "choice"}

    def __call__(self, config: dict) -> dict:
        train = config["train"]
        for key, (lo, hi) in self.bounds.items():
            train = set_path(train, key, min(max(_get_path(train, key), lo), hi))
        return {**config, "train": train}


def pbt_scheduler(cfg: SweepConfig) -> PopulationBasedTraining:
    """Ray Tune's PBT on the trials' ``epoch``: ``cfg.pbt``'s mutations as Tune domains under ``train``."""
    mutations: dict = {}
    for key, spec in cfg.pbt.mutations.items():
        sampler, values = next(iter(spec.items()))
        *parents, leaf = key.split(".")
        node = mutations
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _PBT_DOMAINS[sampler](values)
    p = cfg.pbt
    return PopulationBasedTraining(time_attr="epoch", perturbation_interval=p.perturbation_interval,
                                   hyperparam_mutations={"train": mutations}, quantile_fraction=p.quantile_fraction,
                                   resample_probability=p.resample_probability, synch=p.synch,
                                   custom_explore_fn=ClipToBounds(p.mutations))
