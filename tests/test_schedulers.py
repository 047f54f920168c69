"""Sweep schedulers: ASHA ranks on ``val_score`` (ties on accuracy broken by loss); synchronous successive halving
(``asha.synchronous``): every trial reaches a rung before any goes on, the ones that go on are the best of all
trials at that rung (not of those seen so far, as with asynchronous ASHA), and a resumed bracket goes on; a
scheduler pickled by an experiment from before ``fer_ray.schedulers`` (as ``fer_ray.sweep.SuccessiveHalving``)
still loads."""

import json

import pandas as pd
import pytest

from fer_ray import engine
from fer_ray.config import SweepConfig
from fer_ray.sweep import run_sweep


@pytest.mark.ray
def test_every_rung_keeps_the_best_of_all_trials(tmp_path, ray_session):
    cfg = SweepConfig.from_dict({
        "name": "sh", "data": {"synthetic_n": 300, "cache_dir": str(tmp_path / "cache")},
        "train": {"model": "basic_cnn", "img_size": 32, "epochs": 4, "batch_size": 32, "num_workers": 0,
                  "cpus_per_worker": 0.9},
        "search_space": {"lr": {"loguniform": [1e-4, 3e-3]}, "drop_rate": {"uniform": [0.1, 0.6]}},
        "num_samples": 4, "max_concurrent_trials": 2,
        "asha": {"max_t": 4, "grace_period": 1, "reduction_factor": 2, "synchronous": True}})
    df = run_sweep(cfg, tmp_path / "sh", verbose=0)
    assert sorted(df.epochs_run) == [1, 1, 2, 4]  # 4 trials → top 2 at epoch 1 → top 1 at epoch 2 → 4
    curves = {t: pd.DataFrame(json.loads((tmp_path / "sh" / "trials" / t / "history.json").read_text()))
              for t in df.trial_id}
    ran = df.set_index("trial_id").epochs_run
    for rung, kept in ((1, 2), (2, 1)):
        at_rung = [t for t in curves if ran[t] >= rung]
        best = sorted(at_rung, key=lambda t: curves[t].val_score.iloc[rung - 1], reverse=True)[:kept]
        assert sorted(best) == sorted(t for t in at_rung if ran[t] > rung), f"rung {rung}"
    for rung in (1, 2):  # synchronous: no trial trained past a rung before every trial had reported it
        reported = max(c.finished_at.iloc[rung - 1] for t, c in curves.items() if ran[t] >= rung)
        assert all(c.finished_at.iloc[rung] > reported for t, c in curves.items() if ran[t] > rung), f"rung {rung}"
    for t, c in curves.items():  # paused and resumed trials continue their own epochs, none repeated or skipped
        assert c.epoch.tolist() == list(range(1, ran[t] + 1)), t


def test_asha_stops_trials_tied_on_accuracy_by_their_loss():
    """Eight trials all at the majority-class accuracy after epoch 1 (as on a real sweep's first rung): ranked on
    ``val_acc`` every one passes the rung; on the default ``val_score`` the higher-loss ones are stopped."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from fer_ray.config import SweepConfig
    from fer_ray.schedulers import make_scheduler

    def stopped(metric: str) -> list[int]:
        sched = make_scheduler(SweepConfig.from_dict({"metric": metric, "train": {"epochs": 8},
                                                      "asha": {"max_t": 8, "grace_period": 1,
                                                               "reduction_factor": 4}}))
        sched.set_search_properties(metric, "max")
        out = []
        for i, loss in enumerate([1.81, 1.83, 1.80, 1.82, 1.84, 1.79, 1.85, 1.86]):
            trial = SimpleNamespace(trial_id=f"t{i}", config={})
            sched.on_trial_add(None, trial)
            acc = 0.25
            result = {"epoch": 1, "val_acc": acc, "val_loss": loss, "val_score": acc - engine.SCORE_TIEBREAK * loss}
            if sched.on_trial_result(None, trial, result) == TrialScheduler.STOP:
                out.append(i)
        return out

    assert stopped("val_acc") == []
    assert stopped("val_score") == [1, 3, 4, 6, 7]  # each one's loss is above a quarter of those before it
    assert SweepConfig().metric == "val_score"


def test_successive_halving_resumed_with_trials_past_a_rung_goes_on():
    """A resumed synchronous sweep: two of four trials were cut at rung 1 (restored as finished), the other two
    are past it (epochs 3 and 2). The restarted bracket must carry them through rung 1 again and decide rung 2
    between them, not leave both paused with nothing left to run."""
    from types import SimpleNamespace

    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from fer_ray.schedulers import SuccessiveHalving

    class FakeTrial(SimpleNamespace):
        __hash__ = object.__hash__

    stopped = []
    controller = SimpleNamespace(stop_trial=stopped.append, get_trials=lambda: trials)
    sched = SuccessiveHalving(max_t=4, grace_period=1, reduction_factor=2, num_trials=4)
    sched.set_search_properties("val_score", "max")
    trials = [FakeTrial(trial_id=name, status=status, is_saving=False, config={})
              for name, status in [("a", Trial.TERMINATED), ("b", Trial.TERMINATED), ("c", Trial.PENDING),
                                   ("d", Trial.PENDING)]]
    for t in trials:
        sched.on_trial_add(controller, t)
    a, b, c, d = trials
    c.status = Trial.RUNNING
    assert sched.on_trial_result(controller, c, {"epoch": 3, "val_score": 0.30}) == TrialScheduler.PAUSE
    c.status, d.status = Trial.PAUSED, Trial.RUNNING
    assert sched.on_trial_result(controller, d, {"epoch": 2, "val_score": 0.40}) == TrialScheduler.CONTINUE
    assert stopped == [c]  # rung 2 decided between c and d: d (better) goes on to epoch 4


def test_a_scheduler_pickled_under_its_old_module_path_still_loads(monkeypatch):
    """Tune pickles the scheduler into the experiment's ``tuner.pkl`` (``ray.cloudpickle``: classes by module path);
    experiments started before ``fer_ray.schedulers`` existed name ``fer_ray.sweep.SuccessiveHalving``, and
    ``fer-ray sweep --resume`` must still load them (the alias in ``fer_ray.sweep``)."""
    import pickle

    from ray import cloudpickle

    import fer_ray.sweep
    from fer_ray import schedulers

    assert fer_ray.sweep.SuccessiveHalving is schedulers.SuccessiveHalving
    sched = schedulers.SuccessiveHalving(max_t=4, grace_period=1, reduction_factor=2, num_trials=4, max_running=2)
    with monkeypatch.context() as m:  # pickled as the sweep module defined it before the move
        m.setattr(schedulers.SuccessiveHalving, "__module__", "fer_ray.sweep")
        old = cloudpickle.dumps(sched)
    assert b"fer_ray.sweep" in old
    loaded = pickle.loads(old)
    assert type(loaded) is schedulers.SuccessiveHalving
    assert (loaded._get_n0(0), loaded._get_r0(0), loaded._max_running, loaded._halvings) == (4, 1, 2, 2)
    assert pickle.loads(b"cfer_ray.sweep\nSuccessiveHalving\n.") is schedulers.SuccessiveHalving  # by name alone


def test_trial_processes_are_reused_only_when_every_trial_trains_in_process():
    from fer_ray.sweep import reuses_actors

    base = {"train": {"model": "basic_cnn", "num_workers": 0}}
    assert reuses_actors(SweepConfig.from_dict(base, "sweep"))
    assert not reuses_actors(SweepConfig.from_dict(base | {"reuse_actors": False}, "sweep"))
    ddp = {"train": {"model": "basic_cnn", "num_workers": 2, "cpus_per_worker": 0.9}}
    assert not reuses_actors(SweepConfig.from_dict(ddp, "sweep"))
    mixed = base | {"search_space": {"num_workers": {"grid": [0, 2]}}}  # a DDP candidate: fresh drivers
    assert not reuses_actors(SweepConfig.from_dict(mixed, "sweep"))
