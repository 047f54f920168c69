"""The sweep's search algorithm: how trial configs are proposed (``SweepConfig.search``).

``random`` (the default) is Ray Tune's ``BasicVariantGenerator`` over ``param_space``: the base train config with
each ``search_space`` path replaced by a Tune domain, ``grid`` entries crossed with the random draws.
``optuna`` is Ray Tune's ``OptunaSearch`` with a seeded ``optuna.samplers.TPESampler``, in a ``ConcurrencyLimiter``:
its space is ``TrialSpace``, a define-by-run function that suggests the model first and then only the fields that
apply to it (``when: {model: [...]}``), so TPE never models a field for a trial that does not use it. Either one runs
under the sweep's scheduler (``fer_ray.schedulers``); Tune saves the searcher's state (Optuna's study and sampler)
beside its experiment state, and ``Tuner.restore`` (``--resume``) loads it back.
"""

from __future__ import annotations

from ray import tune
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchAlgorithm, Searcher

from fer_ray.config import SweepConfig, condition_of, sampler_of, set_path

_TUNE_DOMAINS = {
    "choice": tune.choice,
    "grid": tune.grid_search,
    "uniform": lambda v: tune.uniform(*v),
    "loguniform": lambda v: tune.loguniform(*v),
    "randint": lambda v: tune.randint(v[0], v[1] + 1),
}
_PRIMITIVE = (str, int, float, bool, type(None))


def param_space(cfg: SweepConfig) -> dict:
    """Tune's param_space. Random search: the base train config with each search-space path replaced by a Tune
    domain. Optuna: the base train config alone (``TrialSpace`` suggests the searched fields)."""
    train = cfg.train.to_dict()
    if cfg.search.algorithm == "optuna" and cfg.search_space:
        return {"train": train}
    for key, spec in cfg.search_space.items():
        sampler, values = sampler_of(spec)
        train = set_path(train, key, _TUNE_DOMAINS[sampler](values))
    return {"train": train}


def param_name(key: str) -> str:
    """The Optuna parameter of a search-space path: ``augment.strength`` → ``train/augment/strength`` (Tune
    unflattens ``/`` into the trial's nested config)."""
    return "train/" + key.replace(".", "/")


class TrialSpace:
    """A sweep's search space as an Optuna define-by-run function (``OptunaSearch(space=TrialSpace(cfg))``).

    ``model`` is suggested first (or is the ``train`` value when not searched); a conditional entry is suggested only
    when the trial's model is one of its ``when`` models, and unconditional ones always. ``choice`` over values
    Optuna cannot store (lists, mappings) suggests an index and returns the value. A plain class, so Tune's
    searcher checkpoint (``pickle``) can save it.
    """

    def __init__(self, cfg: SweepConfig):
        self.base_model = cfg.train.model
        entries = [(key, *sampler_of(spec), condition_of(spec)) for key, spec in cfg.search_space.items()]
        # the model first, then the other unconditional fields, then the conditional ones: each in the file's order
        self.entries = sorted(entries, key=lambda e: (e[0] != "model", e[3] is not None))

    def __call__(self, trial) -> dict:
        """Suggest the trial's fields on ``trial`` (an ``optuna.Trial``); returns the values Optuna does not hold."""
        model, constants = self.base_model, {}
        for key, sampler, values, models in self.entries:
            if models is not None and model not in models:
                continue
            name = param_name(key)
            if sampler == "choice" and all(isinstance(v, _PRIMITIVE) for v in values):
                value = trial.suggest_categorical(name, values)
            elif sampler == "choice":
                value = constants[name] = values[trial.suggest_categorical(name, list(range(len(values))))]
            elif sampler == "randint":
                value = trial.suggest_int(name, int(values[0]), int(values[1]))
            elif sampler in ("uniform", "loguniform"):
                value = trial.suggest_float(name, float(values[0]), float(values[1]), log=sampler == "loguniform")
            else:  # SweepConfig rejects grid with optuna before any trial starts
                raise ValueError(f"search_space.{key}: {sampler} is not supported with search.algorithm optuna")
            if key == "model":
                model = value
        return constants


def make_searcher(cfg: SweepConfig, max_concurrent: int | None) -> SearchAlgorithm | Searcher:
    """The sweep's search algorithm: ``BasicVariantGenerator`` (random, ``max_concurrent`` ``None``: no limit) or
    ``OptunaSearch`` with a TPE sampler seeded by ``cfg.seed``, proposing at most ``max_concurrent`` live trials.
    Nothing to search (a one-off run: ``fer-ray train``, a distillation student): the variant generator."""
    if cfg.search.algorithm == "random" or not cfg.search_space:
        return BasicVariantGenerator(random_state=cfg.seed, max_concurrent=max_concurrent or 0)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per trial: EpochLines prints those
    s = cfg.search
    sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=s.n_startup_trials,
                                         multivariate=s.multivariate, group=s.multivariate)
    searcher = OptunaSearch(TrialSpace(cfg), metric=cfg.metric, mode=cfg.mode, sampler=sampler)
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent or cfg.num_trials())
