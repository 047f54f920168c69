"""``--time-limit`` (``fer_ray.budget``): durations, the planner's cuts and their order on a fixed calibration, the
one-line errors (a bad value; a limit too small for one epoch of the cheapest trial, before any trial), the
sweep's deadline on an injected clock (a trial stops at the epoch boundary whose next epoch would overrun, never
earlier, never mid-epoch), Tune's adapter, and one small sweep on the session Ray whose plan must cut something.
No verdict depends on this machine's speed: calibrations are given, clocks are injected, the sweep's work is fixed.
"""

import json

import pandas as pd
import pytest

from fer_ray import budget
from fer_ray.budget import Calibration, Rate, Sizes, SweepDeadline, plan
from fer_ray.config import ConfigError, SweepConfig
from fer_ray.durations import format_duration, parse_duration


@pytest.mark.parametrize("text, seconds", [("45m", 2700), ("90s", 90), ("1.5h", 5400), ("600", 600), (600, 600),
                                           (" 2m ", 120), ("1h30m", 5400), ("3m40s", 220), (12.5, 12.5)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5x", "m", "1m1m", "-3m", "0", -5, "1.5.2h", True, "1h 30", "nan"])
def test_parse_duration_refuses_with_one_line_naming_the_value(text):
    with pytest.raises(ValueError) as e:
        parse_duration(text)
    assert repr(text) in str(e.value) and "\n" not in str(e.value)


def test_format_duration():
    assert [format_duration(s) for s in (0, 41.4, 60, 432, 600, 3900)] == ["0s", "41s", "1m", "7m12s", "10m", "1h05m"]


@pytest.mark.parametrize("value, message", [("5x", "'5x' is not a duration"), (-3, "is not a positive duration"),
                                            ([1], "expected a string or a number or null")])
def test_a_bad_time_limit_in_the_sweep_file_is_one_line(value, message):
    with pytest.raises(ConfigError) as e:
        SweepConfig.from_dict({"time_limit": value})
    assert "time_limit" in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


# -- the planner -----------------------------------------------------------------------------------------------
SWEEP = {"name": "tl", "data": {"synthetic_n": 300},
         "train": {"model": "basic_cnn", "epochs": 8, "batch_size": 32, "num_workers": 0, "cpus_per_worker": 1.0},
         "search_space": {"img_size": {"choice": [32, 40, 48]}}, "num_samples": 12, "ensemble_top_k": 3,
         "asha": {"max_t": 8, "grace_period": 2, "reduction_factor": 2}}
SIZES = Sizes(train=1000, val=200, scored=600)


def _cal(slow: float = 1.0) -> Calibration:
    """A fixed calibration: training ips falls with the image area, inference is 5× training."""
    rates = [Rate("basic_cnn", z, z, 100 / slow * (32 / z) ** 2, 500 / slow * (32 / z) ** 2) for z in (32, 40, 48)]
    return Calibration(rates, seconds=2.0, cluster_cpus=2.0)


def _sweep(**changes) -> SweepConfig:
    return SweepConfig.from_dict(json.loads(json.dumps(SWEEP)) | changes)


def test_successive_halving_epochs():
    assert budget.rungs(2, 2, 8) == [2, 4, 8]
    assert budget.rungs(1, 3, 10) == [1, 3, 9, 10]
    assert budget.rungs(4, 2, 4) == [4]
    # 12 trials to 2, 6 of them on to 4, 3 on to 8: 24 + 12 + 12 epochs; 9 trials went on past a rung
    assert budget.scheduled_epochs(12, 2, 2, 8) == (48, 9)


def test_a_generous_limit_cuts_nothing_and_the_shares_add_up():
    cfg = _sweep()
    p = plan(cfg, _cal(), SIZES, limit_s=4 * 3600, elapsed_s=5.0)
    assert p.cuts == [] and (p.num_samples, p.max_t, p.img_sizes) == (12, 8, [32, 40, 48])
    assert sum(p.shares_s.values()) == pytest.approx(4 * 3600)
    assert p.shares_s["calibration"] == 5.0 and p.shares_s["sweep"] > p.estimate_s["sweep"]
    assert p.apply(cfg).to_dict() == cfg.to_dict()


def test_the_planner_cuts_trials_then_rungs_then_resolutions_in_that_order():
    """From a generous limit down: num_samples first (to the ensemble's top-k), then the last rungs (to the grace
    period), then the most expensive img_size, then trials to 1, then epochs to 1; each plan's estimate fits."""
    cfg, seen = _sweep(), []
    for limit in range(3600, 100, -60):
        p = plan(cfg, _cal(), SIZES, limit, elapsed_s=5.0)
        assert sum(p.estimate_s.values()) <= limit - 5.0 - budget.margin_s(limit) + 1e-6, (limit, p)
        stage = ("n" if p.num_samples < 12 else "") + ("t" if p.max_t < 8 else "") + (
            "z" if p.img_sizes != [32, 40, 48] else "") + ("1" if p.num_samples == 1 else "")
        if not seen or seen[-1][0] != stage:
            seen.append((stage, p.cuts))
        if p.num_samples > 3:  # the floor is not reached: nothing else is cut yet
            assert (p.max_t, p.img_sizes) == (8, [32, 40, 48])
        if p.max_t > 2:  # the rungs are not all cut: no resolution dropped yet
            assert p.img_sizes == [32, 40, 48] and p.num_samples >= 3
        if p.img_sizes != [32, 40, 48]:
            assert p.img_sizes[0] == 32 and 48 not in p.img_sizes  # the largest (most expensive) goes first
    stages = [s for s, _ in seen]
    assert stages[:4] == ["", "n", "nt", "ntz"], seen
    cuts = dict(seen)
    assert cuts["n"][0].startswith("num_samples 12 → ")
    assert "asha.max_t 8 → 4" in cuts["nt"][1] or "asha.max_t 8 → 2" in cuts["nt"][1]
    assert cuts["ntz"][-1] == "img_size 48 dropped"


def test_a_planned_config_is_a_valid_sweep_with_the_cuts_applied():
    cfg = _sweep()
    p = plan(cfg, _cal(), SIZES, 420, elapsed_s=5.0)
    planned = p.apply(cfg)
    assert planned.num_samples == p.num_samples < 12
    assert (planned.asha.max_t, planned.asha.grace_period) == (p.max_t, p.grace_period)
    assert planned.train.epochs == p.max_t  # max_t was train.epochs: the schedule ends where the trials do
    assert planned.search_space["img_size"]["choice"] == p.img_sizes
    assert p.cuts and all("→" in c or "dropped" in c for c in p.cuts)


def test_a_limit_too_small_for_one_epoch_of_the_cheapest_trial_is_one_line():
    cfg = _sweep()
    with pytest.raises(ConfigError) as e:
        plan(cfg, _cal(slow=8.0), SIZES, 60, elapsed_s=5.0, source="--time-limit")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--time-limit 1m: one epoch of the cheapest trial (basic_cnn@32) needs ~")
    assert "calibrated on cpu" in msg and "give at least" in msg
    at_least = parse_duration(msg.rsplit("give at least ", 1)[1])
    p = plan(cfg, _cal(slow=8.0), SIZES, at_least, elapsed_s=5.0)  # the suggestion is enough
    assert p.num_samples >= 1


def test_resume_plans_the_shares_and_cuts_nothing():
    cfg = _sweep()
    p = plan(cfg, _cal(), SIZES, 300, elapsed_s=5.0, resumed=True)
    assert p.resumed and (p.num_samples, p.max_t) == (12, 8)
    assert not [c for c in p.cuts if "→" in c or "dropped" in c]


def test_pbt_cuts_the_population_then_the_epochs():
    cfg = _sweep(scheduler="pbt", max_concurrent_trials=4, pbt={"perturbation_interval": 2,
                                                                "mutations": {"lr": {"loguniform": [1e-4, 1e-2]}}})
    p = plan(cfg, _cal(), SIZES, 600, elapsed_s=5.0)
    assert p.num_samples <= 12 and p.max_epochs == p.epochs >= 3  # an interval (2) below the epochs stays
    planned = p.apply(cfg)
    assert planned.train.epochs == p.epochs and planned.scheduler == "pbt"


# -- the deadline ----------------------------------------------------------------------------------------------
class FakeClock:
    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_trial_stops_at_the_boundary_whose_next_epoch_would_overrun():
    """A trial of 10-s epochs against a deadline at 100 s: it trains while an epoch (plus the report) still fits,
    and is stopped at the first boundary where it would not; every decision is taken at a reported epoch."""
    clock = FakeClock()
    d = SweepDeadline(end=100.0, new_trial_s=15.0, max_epochs=20, epoch_overhead_s=1.0, clock=clock)
    epochs = 0
    while True:
        clock.now += 10.0  # one epoch, then its result
        epochs += 1
        if d.stop_trial("t1", {"epoch": epochs, "epoch_time_s": 10.0}):
            break
    # After epoch 8 (80 s) the next epoch and its report end at 91 s: it runs. After epoch 9 (90 s) they would end
    # at 101 s: the trial stops there, with 9 completed epochs, the last one ended before the deadline.
    assert epochs == 9 and clock.now == 90.0 and d.cut["t1"]["epoch"] == 9


def test_the_deadline_rule_exactly():
    clock = FakeClock(88.0)
    d = SweepDeadline(end=100.0, new_trial_s=15.0, max_epochs=20, epoch_overhead_s=1.0, clock=clock)
    assert not d.stop_trial("a", {"epoch": 3, "epoch_time_s": 11.0})  # 12 s left: 11 + 1 fits
    clock.now = 88.5
    assert d.stop_trial("a", {"epoch": 4, "epoch_time_s": 9.0})  # its longest epoch (11 s) + 1 > 11.5 s left
    assert d.cut["a"]["epoch"] == 4 and d.cut["a"]["of"] == 20
    assert not d.stop_trial("b", {"epoch": 20, "epoch_time_s": 30.0})  # its last epoch: it ends anyway, no cut
    assert "b" not in d.cut


def test_no_stop_is_decided_before_it_is_needed():
    """Far from the deadline nothing stops, whatever the epochs cost so far."""
    clock = FakeClock(0.0)
    d = SweepDeadline(end=1000.0, new_trial_s=50.0, max_epochs=10, clock=clock)
    for epoch in range(1, 10):
        clock.now += 60.0
        assert not d.stop_trial("t", {"epoch": epoch, "epoch_time_s": 60.0})
        assert not d.stop_sweep()
    assert d.cut == {}


def test_the_sweep_ends_when_no_trial_could_finish_an_epoch_or_at_the_deadline():
    clock = FakeClock(0.0)
    d = SweepDeadline(end=100.0, new_trial_s=30.0, max_epochs=5, clock=clock)
    clock.now = 80.0
    assert not d.stop_sweep()  # not told yet which trials run: only the deadline itself ends it
    d.running = {"a"}
    assert not d.stop_sweep()  # a trial runs (an epoch that fitted when it started)
    d.running = set()
    assert d.stop_sweep() and "no trial could start" in d.stopped_sweep  # 20 s left < 30 s for the cheapest
    d2 = SweepDeadline(end=100.0, new_trial_s=30.0, max_epochs=5, clock=clock)
    d2.running, d2.last_epoch = {"a", "b"}, {"a": 2}
    clock.now = 100.0
    assert d2.stop_sweep() and set(d2.cut) == {"a", "b"} and d2.cut["a"]["epoch"] == 2
    assert "completed epochs are kept" in d2.cut["a"]["why"]


def test_the_record_counts_an_epoch_that_ended_at_the_deadline(tmp_path):
    """The backstop cuts a trial from the last result Tune reported; an epoch that reached the trial's history after
    that report is counted (measured: a 60-minute run recorded epoch 0 for a trial that kept one epoch)."""
    from fer_ray.experiment import Experiment

    exp = Experiment(str(tmp_path / "e"))
    exp.write_budget({"cut_trials": {"old": {"epoch": 3, "of": 5, "why": "earlier invocation"}}})
    exp.write_history("late", [{"epoch": 1}])
    clock = FakeClock(100.0)
    d = SweepDeadline(end=100.0, new_trial_s=30.0, max_epochs=5, clock=clock)
    d.running, d.last_epoch = {"late", "never"}, {}
    assert d.stop_sweep() and d.cut["late"]["epoch"] == 0
    budget.record_deadline(exp, d)
    cuts = exp.budget()["cut_trials"]
    assert {t: c["epoch"] for t, c in cuts.items()} == {"old": 3, "late": 1, "never": 0}


def test_tunes_adapter_enforces_the_armed_deadline_only():
    from fer_ray.sweep import BudgetGuard

    guard = BudgetGuard()
    result = {"epoch": 1, "epoch_time_s": 50.0}
    assert not guard("t", result) and not guard.stop_all()  # no time limit: inert
    clock = FakeClock(90.0)
    d = SweepDeadline(end=100.0, new_trial_s=30.0, max_epochs=5, clock=clock)
    with budget.arm(d):
        guard.setup()
        assert d.guarded
        assert guard("t", result) and "t" in d.cut

        class T:
            trial_id, status = "t", "RUNNING"

        guard.on_step_end(iteration=1, trials=[T()])
        assert d.running == {"t"} and not guard.stop_all()
        clock.now = 101.0
        assert guard.stop_all()
    assert budget.armed() is None and not guard.stop_all()


def test_summary_line():
    info = {"plan": {"limit_s": 600.0, "shares_s": {"sweep": 450.0, "tta": 41.0, "ensembles_report": 30.0},
                     "cuts": ["num_samples 16 → 6"]},
            "cut_trials": {"a": {"epoch": 3, "of": 6}, "b": {"epoch": 3, "of": 6}},
            "actual_s": {"sweep": 432.0, "tta": 41.0, "ensembles_report": 9.0, "total": 571.0}}
    assert budget.summary_line(info) == (
        "time limit 10m; sweep 7m12s (planned 7m30s); 2 trials stopped early by the budget at epoch 3 of 6; plan cut "
        "num_samples 16 → 6; TTA 41s (planned 41s); ensembles+report 9s (planned 30s); finished 9m31s")


# -- the command -----------------------------------------------------------------------------------------------
def _sweep_file(tmp_path, **changes):
    path = tmp_path / "tl.yaml"
    raw = json.loads(json.dumps(SWEEP)) | changes
    raw["data"] = {"synthetic_n": 300, "cache_dir": str(tmp_path / "cache")}
    path.write_text(json.dumps(raw))
    return path


def test_a_bad_time_limit_flag_is_one_line(tmp_path, capsys):
    from fer_ray.cli import main

    assert main(["sweep", str(_sweep_file(tmp_path)), "--time-limit", "5x", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--time-limit: '5x' is not a duration" in err
    assert not (tmp_path / "out").exists()


def test_a_limit_too_small_stops_the_command_with_one_line_before_any_trial(tmp_path, capsys, monkeypatch):
    from fer_ray.cli import main

    monkeypatch.setattr(budget, "calibrate", lambda *a, **k: _cal(slow=8.0))
    assert main(["sweep", str(_sweep_file(tmp_path)), "--time-limit", "20s", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fer-ray: error: --time-limit 20s: one epoch of the cheapest trial (basic_cnn@32) needs ~")
    exp = tmp_path / "out" / "tl"
    assert not (exp / "trials").exists() and not (exp / "tune").exists() and not (exp / "sweep.yaml").exists()


# -- one sweep -------------------------------------------------------------------------------------------------
E2E = {"name": "budgeted", "train": {"model": "basic_cnn", "epochs": 2, "batch_size": 32, "num_workers": 0,
                                     "cpus_per_worker": 1.0, "scheduler": "none"},
       "search_space": {"img_size": {"choice": [32, 48]}, "lr": {"loguniform": [3.0e-4, 3.0e-3]}}, "num_samples": 3,
       "ensemble_top_k": 2,
       "asha": {"max_t": 2, "grace_period": 2}, "tta_views": ["identity"], "time_limit": "220s"}


@pytest.mark.ray
def test_a_budgeted_sweep_applies_its_plan_and_says_what_it_cut(tmp_path, ray_session, monkeypatch):
    """A fake calibration (epochs of ~60 s at 32 px, ~150 s at 48 px) makes the 220-s plan cut a trial and the 48-px
    candidate; the real sweep is far faster than that, so the deadline cuts no trial. A ``--resume`` with a limit
    re-plans only the shares; a cut recorded in budget.json becomes the trial's budget_cut."""
    from fer_ray.experiment import Experiment
    from fer_ray.pipeline import run_all
    from fer_ray.sweep import collect_trials

    cal = Calibration([Rate("basic_cnn", 32, 32, 10.0, 100.0), Rate("basic_cnn", 48, 48, 4.0, 40.0)], 1.0, 2.0)
    monkeypatch.setattr(budget, "calibrate", lambda *a, **k: cal)
    cfg = SweepConfig.from_dict(E2E | {"data": {"synthetic_n": 400, "cache_dir": str(tmp_path / "cache")}})
    exp = tmp_path / "budgeted"
    board = run_all(cfg, exp)

    info = json.loads((exp / "budget.json").read_text())
    assert info["plan"]["cuts"] == ["num_samples 3 → 2", "img_size 48 dropped"], info["plan"]
    assert info["limit_s"] == 220 and info["calibration"]["rates"][0]["train_ips"] == 10.0
    assert set(info["actual_s"]) == {"calibration", "sweep", "tta", "ensembles_report", "total"}
    assert info["guarded"] is True and info["cut_trials"] == {}
    trials = pd.read_parquet(exp / "trials.parquet")
    assert len(trials) == 2 and set(trials.img_size) == {32} and not trials.budget_cut.any()
    assert (trials.epochs_run == 2).all()
    planned = SweepConfig.from_dict(__import__("yaml").safe_load((exp / "sweep.yaml").read_text()))
    assert planned.num_samples == 2 and planned.search_space["img_size"]["choice"] == [32]
    assert "budget_cut" in board.columns and not board.budget_cut.any()
    md = (exp / "report" / "leaderboard.md").read_text()
    assert "Time budget: time limit 3m40s" in md and "plan cut num_samples 3 → 2, img_size 48 dropped" in md
    assert "id='budget'" in (exp / "report" / "report.html").read_text()

    # --resume with a limit: Tune restores the trials (nothing cut again, nothing left to run), and the guard it
    # unpickles enforces this invocation's deadline.
    resumed = Experiment(exp).sweep().replace(time_limit="10m")
    run_all(resumed, exp, resume=True, limit_source="--time-limit")
    info2 = json.loads((exp / "budget.json").read_text())
    assert info2["plan"]["resumed"] and info2["plan"]["cuts"] == [] and info2["guarded"] is True
    assert info2["plan"]["source"] == "--time-limit" and info2["limit_s"] == 600
    assert len(pd.read_parquet(exp / "trials.parquet")) == 2

    cut = trials.trial_id[0]
    (exp / "budget.json").write_text(json.dumps(info | {"cut_trials": {cut: {"epoch": 1, "of": 2, "why": "test"}}}))
    again = collect_trials(exp).set_index("trial_id")
    assert again.budget_cut.to_dict() == {t: t == cut for t in trials.trial_id}
