"""Search algorithms (``fer_ray.search``, ``search:`` in a sweep file): the ``SearchConfig`` fields and their one-line
errors, conditional search-space fields (``when: {model: [...]}``), the Optuna define-by-run space, and one Tune run
showing TPE proposing configs, the seed making them repeatable and ``Tuner.restore`` restoring the searcher."""

import os
import signal

import pytest

from fer_ray.config import ConfigError, SearchConfig, SweepConfig, parse_sweep

SPACE = {"model": {"choice": ["basic_cnn", "deep_cnn_v2"]}, "lr": {"loguniform": [1.0e-4, 1.0e-2]},
         "drop_rate": {"uniform": [0.1, 0.6], "when": {"model": ["basic_cnn"]}},
         "model_kwargs.spatial_drop": {"uniform": [0.0, 0.3], "when": {"model": ["deep_cnn_v2"]}}}


def sweep(**over) -> SweepConfig:
    raw = {"train": {"model": "basic_cnn", "epochs": 2}, "asha": {"max_t": 2, "grace_period": 1},
           "search_space": SPACE, "search": {"algorithm": "optuna"}} | over
    return SweepConfig.from_dict(raw, "sweep")


def test_search_defaults_to_random_and_parses_optuna():
    assert SweepConfig().search == SearchConfig(algorithm="random")
    cfg = parse_sweep("train: {epochs: 2}\nasha: {max_t: 2}\nsearch: {algorithm: optuna, max_concurrent: 2, "
                      "n_startup_trials: 3, multivariate: true}", "s.yaml")
    assert cfg.search == SearchConfig(algorithm="optuna", max_concurrent=2, n_startup_trials=3, multivariate=True)
    assert cfg.to_dict()["search"]["algorithm"] == "optuna"  # written to sweep.yaml, read back by --resume


@pytest.mark.parametrize("text, msg", [
    ("search: {algorithm: bohb}", r"s\.yaml: sweep\.search\.algorithm: must be one of random, optuna, got 'bohb'"),
    ("search: {algorithm: optuna, sampler: tpe}", r"s\.yaml: sweep\.search: unknown key 'sampler'"),
    ("search: {max_concurrent: 2}", r"search\.max_concurrent: is an option of algorithm optuna"),
    ("search: {algorithm: optuna, max_concurrent: 0}", r"search\.max_concurrent: must be >= 1"),
    ("search: {algorithm: optuna}\nsearch_space: {lr: {grid: [1.0e-3, 2.0e-3]}}",
     r"s\.yaml: sweep\.search_space\.lr: grid is not supported with search\.algorithm optuna"),
    ("search: {algorithm: optuna}\nmax_concurrent_trials: 2",
     r"max_concurrent_trials: with search\.algorithm optuna set search\.max_concurrent instead"),
    ("search_space: {model: {choice: [basic_cnn, deep_cnn_v1]}, drop_rate: {uniform: [0.1, 0.5], "
     "when: {model: [resnet_fer]}}}",
     r"s\.yaml: sweep\.search_space\.drop_rate\.when\.model: 'resnet_fer' is not a model of this sweep \(its "
     r"models: basic_cnn, deep_cnn_v1\)"),
    ("search_space: {model_kwargs.spatial_drop: {uniform: [0.0, 0.3], when: {model: [deep_cnn_v2]}}}",
     r"search_space\.model_kwargs\.spatial_drop\.when\.model: 'deep_cnn_v2' is not a model of this sweep \(its "
     r"models: basic_cnn\)"),
    ("search_space: {model_kwargs.spatial.drop: {uniform: [0.0, 0.3]}}",
     r"search_space\.model_kwargs\.spatial\.drop: is not a train config field"),
    ("search_space: {drop_rate: {uniform: [0.1, 0.5], when: {arch: [basic_cnn]}}}",
     r"search_space\.drop_rate\.when: must be \{model: \[names\]\}"),
    ("search_space: {model: {choice: [basic_cnn], when: {model: [basic_cnn]}}}",
     r"search_space\.model\.when: the model field itself cannot be conditional"),
    ("search_space: {lr: {uniform: [0.1, 0.5], choice: [0.1]}}", r"search_space\.lr: must be one mapping"),
])
def test_bad_search_input_is_one_line(text, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        parse_sweep("train: {model: basic_cnn, epochs: 2}\nasha: {max_t: 2}\n" + text, "s.yaml")
    assert "\n" not in str(e.value)


def test_random_search_keeps_the_train_value_where_a_conditional_field_does_not_apply():
    cfg = sweep(search={})
    drawn = {"model": "deep_cnn_v2", "lr": 3e-3, "drop_rate": 0.4, "epochs": 2, "model_kwargs": {"spatial_drop": 0.2}}
    assert cfg.conditioned(drawn)["drop_rate"] is None  # train's value: the model's own default
    assert cfg.conditioned(drawn)["model_kwargs"] == {"spatial_drop": 0.2}
    basic = cfg.conditioned(drawn | {"model": "basic_cnn"})
    assert basic["drop_rate"] == 0.4 and basic["model_kwargs"] == {}  # basic_cnn has no spatial_drop keyword


def test_define_by_run_space_suggests_a_conditional_field_only_for_its_models():
    """``TrialSpace`` on real Optuna trials (no Ray): the model first, ``drop_rate`` only for basic_cnn, names
    that Tune unflattens into the trial's train config, and the right distributions."""
    import optuna

    from fer_ray.search import TrialSpace

    space = TrialSpace(sweep(search_space={"augment": {"choice": [{}, {"strength": 0.5}]}, **SPACE}))
    assert [e[0] for e in space.entries] == ["model", "augment", "lr", "drop_rate", "model_kwargs.spatial_drop"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    seen = set()
    for _ in range(12):
        trial = study.ask()
        constants = space(trial)
        model = trial.params["train/model"]
        seen.add(model)
        assert ("train/drop_rate" in trial.params) == (model == "basic_cnn")
        assert ("train/model_kwargs/spatial_drop" in trial.params) == (model == "deep_cnn_v2")
        assert constants == {"train/augment": [{}, {"strength": 0.5}][trial.params["train/augment"]]}
        dist = trial.distributions
        assert dist["train/lr"] == optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
        study.tell(trial, 0.0)
    assert seen == {"basic_cnn", "deep_cnn_v2"}


def test_trials_that_fit_count_the_clusters_cpus_and_gpus():
    from fer_ray.config import TrainConfig
    from fer_ray.placement import trials_that_fit

    ddp = TrainConfig(num_workers=2, cpus_per_worker=0.9)  # 0.1 + 1.8 CPUs
    local = TrainConfig(num_workers=0, cpus_per_worker=0.9)
    assert trials_that_fit([local], {"CPU": 2.0}) == 2
    assert trials_that_fit([local, ddp], {"CPU": 2.0}) == 1  # the largest request decides
    assert trials_that_fit([ddp], {"CPU": 1.0}) == 1  # never 0
    gpu = TrainConfig(num_workers=0, cpus_per_worker=1, use_gpu=True, gpu_fraction=0.25)
    assert trials_that_fit([gpu], {"CPU": 16.0, "GPU": 1.0}) == 4


def test_tpe_proposals_are_seeded_and_resume_restores_the_searcher(tmp_path, ray_session):
    """One Tune run of a plain function trainable through fer_ray's searcher (Optuna TPE in a ConcurrencyLimiter)
    and scheduler (ASHA): one seeded random start-up trial, then TPE. The same seed proposes the same configs;
    an experiment interrupted (SIGINT, as Ctrl-C) as its second trial starts and restored with ``Tuner.restore``
    proposes what the uninterrupted run proposed, and its saved study holds every trial: the searcher's state
    came back (a fresh searcher would propose the first configs again)."""
    import glob

    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from fer_ray.schedulers import make_scheduler
    from fer_ray.search import TrialSpace, make_searcher, param_space

    cfg = sweep(num_samples=3, search={"algorithm": "optuna", "max_concurrent": 1, "n_startup_trials": 1})
    interrupt = "FER_RAY_TEST_INTERRUPT_AT"

    def objective(config):
        t = config["train"]
        for epoch in (1, 2):
            tune.report({"epoch": epoch, "val_score": epoch * (1 - abs(t["lr"] - 3e-3) * 100 - (t["drop_rate"] or 0))})

    class Interrupt(tune.Callback):  # pickled with the run; acts only while the variable is set
        def on_trial_start(self, iteration, trials, trial, **info):
            at = os.environ.get(interrupt)
            if at and len(trials) >= int(at):
                os.kill(os.getpid(), signal.SIGINT)

    trainable = tune.with_resources(objective, {"CPU": 0.5})

    def tuner(name: str) -> tune.Tuner:
        return tune.Tuner(trainable, param_space=param_space(cfg),
                          tune_config=tune.TuneConfig(metric=cfg.metric, mode=cfg.mode, num_samples=cfg.num_samples,
                                                      scheduler=make_scheduler(cfg),
                                                      search_alg=make_searcher(cfg, cfg.search.max_concurrent)),
                          run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), verbose=0,
                                                    callbacks=[Interrupt()]))

    def study(name: str) -> optuna.Study:  # the newest session's searcher state, as Tune picks it: by name
        searcher = OptunaSearch()
        searcher.restore(max(glob.glob(str(tmp_path / name / "searcher-state-*.pkl"))))
        return searcher._ot_study

    def proposals(name: str) -> list[dict]:
        return [t.params for t in sorted(study(name).trials, key=lambda t: t.number)]

    whole = tuner("whole").fit()
    assert len(whole) == 3 and not whole.errors
    uninterrupted = proposals("whole")
    assert len(uninterrupted) == 3
    assert all(("train/drop_rate" in p) == (p["train/model"] == "basic_cnn") for p in uninterrupted)
    for r in whole:  # a trial of the other model kept the train value
        assert r.config["train"]["model"] == "basic_cnn" or r.config["train"]["drop_rate"] is None
    configs = sorted((r.config["train"]["model"], r.config["train"]["lr"]) for r in whole)
    assert configs == sorted((p["train/model"], p["train/lr"]) for p in uninterrupted)  # Tune ran what TPE proposed
    start = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=cfg.seed), direction="maximize")
    randoms = []
    for _ in range(3):
        trial = start.ask()
        TrialSpace(cfg)(trial)
        randoms.append(trial.params)
    assert randoms[:1] == uninterrupted[:1]  # TPE's seeded start-up draw...
    assert all(r != u for r, u in zip(randoms[1:], uninterrupted[1:]))  # ...then its own, not the random sampler's

    os.environ[interrupt] = "2"
    try:
        tuner("resumed").fit()
    finally:
        os.environ.pop(interrupt)
    before = proposals("resumed")
    assert 1 <= len(before) < 3 and before == uninterrupted[:len(before)]  # the seed repeats the proposals
    assert tune.Tuner.can_restore(str(tmp_path / "resumed"))
    resumed = tune.Tuner.restore(str(tmp_path / "resumed"), trainable=trainable, resume_errored=True).fit()
    assert not resumed.errors and len(resumed) == 3
    after = study("resumed")
    assert [t.params for t in sorted(after.trials, key=lambda t: t.number)] == uninterrupted
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in after.trials)
