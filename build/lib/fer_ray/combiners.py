"""Ensemble combiners: a registry of the ways member logits become an ensemble's logits, and the one torch function
that applies fitted numbers.

This module owns the combiner math. A combiner is one ``Combiner`` subclass registered by name
(``@register_combiner("mean_logits")``): ``fit`` (numpy/scipy, on the selection split's member logits after any
member temperatures) returns the numbers it adds to an ensemble's ``fitted`` dict (plain floats and lists: the
``ensembles/<name>.json`` format), ``tensors`` reads them back as arrays and ``apply`` is its torch math on
temperature-scaled member logits ``[M, N, C]``. ``apply_fitted`` runs the whole chain on a tensor: each member's
views averaged in logit space (``[M, V, N, C]``, or a per-member list), member temperatures, the combiner, the final
temperature. ``fer_ray.ensemble.apply_fitted`` calls it on numpy stacks (in float64) for the logit store and
``FittedCombiner``, the module inside the exported graph (``fer_ray.export``), calls the same chain on its buffers,
so scoring and export cannot drift apart. Temperature scaling's fit (``fit_temperature``) and the combiners' fitting
procedures (NLL simplex weights, Caruana greedy selection, stacking) live here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
from scipy.optimize import minimize, minimize_scalar
from scipy.special import log_softmax
from torch import nn

from fer_ray.config import ConfigError
from fer_ray.metrics import softmax

REGISTRY: dict[str, type[Combiner]] = {}
"""Combiner name → class, in registration order (``register_combiner``)."""


def register_combiner(name: str):
    """Class decorator: register a ``Combiner`` subclass under ``name`` (an ``EnsembleSpec.combiner`` value)."""
    def add(cls: type[Combiner]) -> type[Combiner]:
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise ValueError(f"combiner {name!r} is already registered ({REGISTRY[name].__name__})")
        cls.name = name
        REGISTRY[name] = cls
        return cls
    return add


def get_combiner(name: str) -> Combiner:
    """The registered combiner ``name``; an unknown name raises ``ConfigError`` listing the known ones."""
    if name not in REGISTRY:
        raise ConfigError(f"combiner: must be one of {tuple(REGISTRY)}, got {name!r}")
    return REGISTRY[name]()


class Combiner:
    """One way of combining members. Subclasses set ``apply`` and, where they fit anything, ``fit`` (and
    ``tensors`` when their numbers are not per-member ``weights``)."""

    name: ClassVar[str] = ""
    weighted: ClassVar[bool] = True
    """Has one weight per member: members whose fitted weight is negligible are dropped (``fer_ray.ensemble``)."""

    def fit(self, logits: np.ndarray, labels: np.ndarray, spec) -> dict:
        """Fitted numbers for ``fitted`` from member logits ``[M, N, C]`` (float64, member temperatures applied)
        and labels ``[N]``; ``spec`` is the ``EnsembleSpec``. Default: nothing (the uniform weights stay)."""
        return {}

    def tensors(self, fitted: dict, m: int) -> dict[str, np.ndarray]:
        """The numbers ``apply`` reads, as arrays, from a ``fitted`` dict of ``m`` members."""
        weights = fitted.get("weights") or [1.0 / m] * m
        return {"weights": np.asarray(weights, dtype=np.float64)}

    def apply(self, z: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[M, N, C]`` temperature-scaled member logits → ``[N, C]`` combined logits, using only ``t``."""
        raise NotImplementedError


def _weighted_probs(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``log(Σ_m w_m softmax(z_m))``: the probability-averaging combiners' output."""
    return torch.log((weights.view(-1, 1, 1) * torch.softmax(z, -1)).sum(0) + 1e-12)


@register_combiner("mean_logits")
class MeanLogits(Combiner):
    """The (weighted) mean of the member logits."""

    def apply(self, z: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return (t["weights"].view(-1, 1, 1) * z).sum(0)


@register_combiner("mean_probs")
class MeanProbs(Combiner):
    """The log of the (weighted) mean of the member probabilities."""

    def apply(self, z: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return _weighted_probs(z, t["weights"])


@register_combiner("nll_weights")
class NLLWeights(MeanProbs):
    """Probability averaging with simplex weights minimising the selection split's NLL."""

    def fit(self, logits: np.ndarray, labels: np.ndarray, spec) -> dict:
        return {"weights": [float(w) for w in fit_nll_weights(softmax(logits), labels)]}


@register_combiner("greedy")
class Greedy(MeanProbs):
    """Probability averaging with Caruana forward-selection counts as weights (bagged with ``greedy_bags`` > 1)."""

    def fit(self, logits: np.ndarray, labels: np.ndarray, spec) -> dict:
        probs = softmax(logits)
        if spec.greedy_bags > 1:
            weights, bags = fit_bagged_greedy(probs, labels, spec)
            return {"weights": [float(w) for w in weights], "greedy_bags": bags}
        weights, picks = fit_greedy(probs, labels, spec.greedy_metric, spec.greedy_iters)
        return {"weights": [float(w) for w in weights], "greedy_picks": picks}


@register_combiner("stacking")
class Stacking(Combiner):
    """Multinomial logistic regression on the concatenated member probabilities (``fitted["stacking"]``)."""

    weighted = False

    def fit(self, logits: np.ndarray, labels: np.ndarray, spec) -> dict:
        return {"stacking": fit_stacking(softmax(logits), labels, spec.stacking_folds, spec.seed)}

    def tensors(self, fitted: dict, m: int) -> dict[str, np.ndarray]:
        st = fitted["stacking"]
        return {"coef": np.asarray(st["coef"], dtype=np.float64).T, "intercept": np.asarray(st["intercept"],
                                                                                          dtype=np.float64)}

    def apply(self, z: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.matmul(stack_features(torch.softmax(z, -1)), t["coef"]) + t["intercept"]


def stack_features(probs: torch.Tensor) -> torch.Tensor:
    """``[M, N, C]`` member probabilities → ``[N, M·C]`` stacking features (member-major): what ``fit_stacking``
    fits on and ``Stacking.apply`` applies to."""
    return probs.permute(1, 0, 2).flatten(1)


# -- applying fitted numbers: the one chain the logit store and the exported graph share -------------------------
def stack_members(logits: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """``[M, N, C]`` member logits from ``[M, N, C]``, ``[M, V, N, C]`` (views averaged in logit space) or a list
    of per-member ``[N, C]`` / ``[V, N, C]`` tensors."""
    if not isinstance(logits, torch.Tensor):
        return torch.stack([x.mean(0) if x.dim() == 3 else x for x in logits])
    return logits.mean(1) if logits.dim() == 4 else logits


def fitted_arrays(fitted: dict, m: int) -> dict[str, np.ndarray]:
    """Every number the chain reads from a ``fitted`` dict of ``m`` members (member temperatures, final temperature,
    the combiner's ``tensors``); absent temperatures are 1 (an exact no-op)."""
    temps = fitted.get("member_temperatures") or [1.0] * m
    return {"member_t": np.asarray(temps, dtype=np.float64),
            "temperature": np.asarray(float(fitted.get("temperature") or 1.0)),
            **get_combiner(fitted["combiner"]).tensors(fitted, m)}


def combine(logits: torch.Tensor | Sequence[torch.Tensor], name: str, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """Member logits (any ``stack_members`` form) → ``[N, C]`` ensemble logits: member temperatures, combiner
    ``name``'s ``apply``, final temperature, reading the numbers from ``t`` (``fitted_arrays`` as tensors)."""
    z = stack_members(logits) / t["member_t"].view(-1, 1, 1)
    return get_combiner(name).apply(z, t) / t["temperature"]


def apply_fitted(logits: torch.Tensor | Sequence[torch.Tensor], fitted: dict) -> torch.Tensor:
    """``combine`` with the numbers of ``fitted``, in the logits' dtype and device."""
    z = stack_members(logits)
    t = {k: torch.as_tensor(v, dtype=z.dtype, device=z.device) for k, v in fitted_arrays(fitted, len(z)).items()}
    return combine(z, fitted["combiner"], t)


class FittedCombiner(nn.Module):
    """``combine`` as a module: the fitted numbers of ``m`` members as (float32) buffers; ``[M, V, B, C]`` (or any
    ``stack_members`` form) in, ``[B, C]`` ensemble logits out. What the exported graph ends with."""

    def __init__(self, fitted: dict, m: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.combiner = fitted["combiner"]
        arrays = fitted_arrays(fitted, m)
        self.keys = list(arrays)
        for k, v in arrays.items():
            self.register_buffer(k, torch.as_tensor(np.ascontiguousarray(v), dtype=dtype))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return combine(logits, self.combiner, {k: getattr(self, k) for k in self.keys})


# -- fitting -----------------------------------------------------------------------------------------------------
def _nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Scalar T > 0 minimising the NLL of ``softmax(logits / T)`` (searched over log T in [-4, 4])."""
    z = np.asarray(logits, dtype=np.float64)
    rows = np.arange(len(labels))

    def loss(log_t: float) -> float:
        return float(-log_softmax(z / np.exp(log_t), axis=1)[rows, labels].mean())

    res = minimize_scalar(loss, bounds=(-4.0, 4.0), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(res.x))


def fit_nll_weights(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Simplex weights ``w = softmax(z)`` minimising the NLL of ``Σ w_m p_m`` (``probs`` is ``[M, N, C]``)."""
    p = probs[:, np.arange(len(labels)), labels].T  # [N, M]: each member's probability of the true class

    def loss(z: np.ndarray) -> tuple[float, np.ndarray]:
        w = softmax(z)
        q = p @ w + 1e-12
        g = -(p / q[:, None]).mean(0)
        return float(-np.log(q).mean()), w * (g - w @ g)

    res = minimize(loss, np.zeros(p.shape[1]), jac=True, method="L-BFGS-B")
    return softmax(res.x)


def fit_greedy(probs: np.ndarray, labels: np.ndarray, metric: str, iters: int) -> tuple[np.ndarray, list[int]]:
    """Caruana forward selection with replacement from the best single member; weights of the best prefix.

    Returns ``(weights, picks)``: selection counts / total, and the order members were picked in.
    """
    def score(p: np.ndarray) -> float:
        return float((p.argmax(1) == labels).mean()) if metric == "accuracy" else -_nll(p, labels)

    singles = [score(p) for p in probs]
    picks = [int(np.argmax(singles))]
    total, best, best_len = probs[picks[0]].copy(), singles[picks[0]], 1
    for _ in range(iters):
        cand = [score((total + p) / (len(picks) + 1)) for p in probs]
        m = int(np.argmax(cand))
        picks.append(m)
        total += probs[m]
        if cand[m] > best + 1e-12:
            best, best_len = cand[m], len(picks)
    counts = np.bincount(picks[:best_len], minlength=len(probs)).astype(np.float64)
    return counts / counts.sum(), picks[:best_len]


def fit_bagged_greedy(probs: np.ndarray, labels: np.ndarray, spec) -> tuple[np.ndarray, list]:
    """Caruana et al. (2006) bagged selection: forward selection on ``greedy_bags`` random member subsets
    (``greedy_bag_fraction`` of them, seeded), selection weights averaged; returns (weights, picks per bag)."""
    rng = np.random.default_rng(spec.seed)
    m = len(probs)
    size = max(1, round(spec.greedy_bag_fraction * m))
    total, bags = np.zeros(m), []
    for _ in range(spec.greedy_bags):
        subset = np.sort(rng.choice(m, size=size, replace=False))
        w, picks = fit_greedy(probs[subset], labels, spec.greedy_metric, spec.greedy_iters)
        total[subset] += w
        bags.append([int(subset[i]) for i in picks])
    return total / total.sum(), bags


def fit_stacking(probs: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> dict:
    """Multinomial logistic regression on concatenated member probabilities; C by stratified CV (NLL)."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    c = probs.shape[2]
    present = np.bincount(labels, minlength=c)
    k = int(min(folds, present[present > 0].min()))
    if k < 2 or (present > 0).sum() < 2:
        raise ConfigError("stacking: the selection split needs >= 2 classes with >= 2 images each")
    model = LogisticRegressionCV(Cs=np.logspace(-3, 3, 13), l1_ratios=(0.0,), scoring="neg_log_loss",
                                 cv=StratifiedKFold(k, shuffle=True, random_state=seed), max_iter=2000,
                                 use_legacy_attributes=False)
    model.fit(stack_features(torch.from_numpy(probs)).numpy(), labels)
    coef, intercept = model.coef_, model.intercept_
    if len(model.classes_) == 2:  # binary: one row; softmax([-a/2, a/2]) == sigmoid(a)
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    full_coef = np.zeros((c, coef.shape[1]))
    full_int = np.full(c, -30.0)  # a class absent from the selection split is never predicted
    full_coef[model.classes_], full_int[model.classes_] = coef, intercept
    return {"coef": full_coef.tolist(), "intercept": full_int.tolist(), "C": float(np.ravel(model.C_)[0]),
            "folds": k}
