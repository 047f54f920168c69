"""Ensembles over the logit store: choose members, fit combiners on the selection split only, search budgets.

An ``EnsembleSpec`` (``ensembles/*.yaml`` or the CLI) names members explicitly or as ``{top_k, by}`` over
``trials.parquet``, the TTA views to use, and a combiner. Each member's views are averaged in logit space,
then members are combined by a combiner of ``fer_ray.combiners`` (which owns their fitting and their math):
``mean_logits``, ``mean_probs``, ``nll_weights`` (simplex weights minimising NLL), ``greedy`` (Caruana et al. 2004
forward selection with replacement) or ``stacking`` (logistic regression on the members' probabilities, C chosen by
cross-validation); ``temperature: true`` adds temperature scaling per member and for the result. This module owns
choosing members, the fitting protocol (``fit_ensemble``: temperatures, the combiner's ``fit``, pruning) and the
ensemble files; ``apply_fitted`` runs ``fer_ray.combiners.apply_fitted`` on numpy stacks. Anything fitted or
selected uses the split whose role is ``select``; asking for a ``report`` split raises ``ProtocolError``.
``run_ensemble`` writes ``ensembles/<name>.json`` with every fitted number
(``reproduce_ensemble`` rebuilds the logits from it) and stores the combined logits as member
``ensemble:<name>`` for every split. ``budget_search`` grows candidate ensembles per TTA view subset, writes
``pareto.csv`` and builds the most accurate one under a GMACs budget. Cost = Σ member GMACs per view × views.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from fer_ray import combiners
from fer_ray.combiners import (  # noqa: F401 - the fitting procedures, importable from here as before
    REGISTRY,
    fit_bagged_greedy,
    fit_greedy,
    fit_nll_weights,
    fit_stacking,
    fit_temperature,
    get_combiner,
)
from fer_ray.config import ConfigError, _Config
from fer_ray.experiment import Experiment, as_experiment
from fer_ray.metrics import classification_metrics
from fer_ray.names import path_name_problem
from fer_ray.store import LogitSet, StoreError, load_store, write_logits

COMBINERS = tuple(REGISTRY)
"""The combiners registered in ``fer_ray.combiners`` when this module was imported (``EnsembleSpec`` checks the
live registry)."""
POOLS = {"trials": ("model",), "library": ("model", "snapshot", "ema")}
"""Which members (``Experiment.members`` kinds) a ``{top_k, pool}`` selection ranks."""
GREEDY_METRICS = ("accuracy", "nll")
PRUNE_WEIGHT = 1e-4
"""Members whose fitted weight is at most this are dropped from ``nll_weights``/``greedy`` ensembles."""
VIEW_SUBSETS = (("identity",), ("identity", "hflip"))
"""View subsets tried by ``budget_search`` (those the store has), besides all stored views."""


class ProtocolError(ValueError):
    """An attempt to fit or select on a split whose role is ``report``."""


@dataclass
class EnsembleSpec(_Config):
    """A named ensemble: members, TTA views, combiner, and the split it is selected on."""

    name: str = "ensemble"
    members: list | dict = field(default_factory=lambda: {"top_k": 3, "by": "best_val_acc"})
    """Member ids, or ``{top_k: K, by: <column>, pool: trials|library}`` (highest first): ``pool: trials`` (the
    default) ranks the sweep's trials (their best checkpoints), ``library`` also the checkpoint library (kept
    epochs ``<trial>@eNNN`` and EMA weights ``<trial>@eNNN-ema``: ``SweepConfig.keep_checkpoints``)."""
    views: list | None = None
    """TTA views to use (``None``: every stored view)."""
    combiner: str = "mean_logits"
    """A registered combiner (``fer_ray.combiners.REGISTRY``: ``COMBINERS``)."""
    select_split: str = "val"
    """The split every weight, temperature and C is fitted on; its role must be ``select``."""
    budget_gmacs: float | None = None
    """Keep the longest top-ranked prefix of members whose summed cost (GMACs × views) fits this budget."""
    temperature: bool = False
    """Fit one temperature per member and one for the combined logits (scalar T minimising NLL)."""
    greedy_metric: str = "accuracy"
    """``greedy``: the selection-split metric forward selection optimises, ``accuracy`` or ``nll``."""
    greedy_iters: int = 25
    """``greedy``: additions (with replacement) after the best single member; the best prefix is kept."""
    greedy_bags: int = 1
    """``greedy``: bagged selection (Caruana et al. 2006): run forward selection on this many random subsets of the
    members and average their selection weights (1 = plain greedy)."""
    greedy_bag_fraction: float = 0.5
    """``greedy`` with bags: the share of the members each bag may pick from."""
    oof_folds: int = 5
    """Folds of the out-of-fold estimate on the selection split (member selection and every fitted number redone on
    K-1 folds, scored on the held-out one); it ranks ensembles against single models. 0 skips it."""
    stacking_folds: int = 5
    """``stacking``: stratified cross-validation folds on the selection split used to choose C."""
    seed: int = 0
    """Seed of the stacking folds."""

    def __post_init__(self) -> None:
        if path_name_problem(self.name):
            raise ConfigError(f"name: {path_name_problem(self.name)}")
        if self.combiner not in REGISTRY:
            raise ConfigError(f"combiner: must be one of {tuple(REGISTRY)}, got {self.combiner!r}")
        if isinstance(self.members, dict) and set(self.members) - {"top_k", "by", "pool"}:
            raise ConfigError(f"members: unknown key {sorted(set(self.members) - {'top_k', 'by', 'pool'})[0]!r}")
        if isinstance(self.members, dict) and self.members.get("pool", "trials") not in POOLS:
            raise ConfigError(f"members.pool: must be one of {sorted(POOLS)}, got {self.members['pool']!r}")
        if self.greedy_metric not in GREEDY_METRICS:
            raise ConfigError(f"greedy_metric: must be one of {GREEDY_METRICS}, got {self.greedy_metric!r}")
        if self.greedy_iters < 0:
            raise ConfigError(f"greedy_iters: must be >= 0, got {self.greedy_iters}")
        if self.stacking_folds < 2:
            raise ConfigError(f"stacking_folds: must be >= 2, got {self.stacking_folds}")
        if self.greedy_bags < 1 or not 0 < self.greedy_bag_fraction <= 1:
            raise ConfigError(f"greedy_bags: must be >= 1 with greedy_bag_fraction in (0, 1], got {self.greedy_bags}"
                              f" and {self.greedy_bag_fraction}")
        if self.oof_folds == 1 or self.oof_folds < 0:
            raise ConfigError(f"oof_folds: must be 0 (off) or >= 2, got {self.oof_folds}")
        if self.budget_gmacs is not None and self.budget_gmacs <= 0:
            raise ConfigError(f"budget_gmacs: must be > 0, got {self.budget_gmacs}")
        if not isinstance(self.temperature, bool):
            raise ConfigError(f"temperature: must be true or false, got {self.temperature!r}")


def check_role(exp: Experiment, split: str) -> None:
    """Refuse to fit/select on a split whose role is not ``select``."""
    roles = as_experiment(exp).roles()
    if roles.get(split) != "select":
        raise ProtocolError(f"split {split!r} has role {roles.get(split)!r}; ensembles are fitted and selected only "
                            f"on the selection split ({', '.join(k for k, v in roles.items() if v == 'select')})")


def member_logits(ls: LogitSet, views: list[str] | None) -> np.ndarray:
    """``[N, C]``: the member's chosen TTA views averaged in logit space."""
    idx = [ls.views.index(v) for v in views] if views else list(range(len(ls.views)))
    return ls.logits[idx].mean(0)


def apply_fitted(stack: np.ndarray, fitted: dict) -> np.ndarray:
    """``[M, N, C]`` member logits (or ``[M, V, N, C]``) → ``[N, C]`` ensemble logits (float64), using only the
    numbers in ``fitted``: ``fer_ray.combiners.apply_fitted``, the chain the exported graph runs, on float64 tensors."""
    return combiners.apply_fitted(torch.from_numpy(np.asarray(stack, dtype=np.float64)), fitted).numpy()


def fit_ensemble(stack: np.ndarray, labels: np.ndarray, spec: EnsembleSpec) -> dict:
    """Fit ``spec``'s combiner (and temperatures) on selection-split member logits ``[M, N, C]``.

    Every number is a plain float, so the returned dict survives JSON and ``apply_fitted`` reproduces exactly.
    Members whose weight is ≤ ``PRUNE_WEIGHT`` are dropped (weights renormalised); ``kept`` lists the indices
    of the members that remain, in order.
    """
    m = len(stack)
    combiner = get_combiner(spec.combiner)
    fitted: dict = {"combiner": spec.combiner, "weights": [1.0 / m] * m, "member_temperatures": None,
                    "temperature": None}
    member = np.asarray(stack, dtype=np.float64)
    if spec.temperature:
        fitted["member_temperatures"] = [fit_temperature(s, labels) for s in member]
        member = member / np.asarray(fitted["member_temperatures"])[:, None, None]
    fitted |= combiner.fit(member, labels, spec)
    keep = [i for i, w in enumerate(fitted["weights"]) if w > PRUNE_WEIGHT or not combiner.weighted]
    if len(keep) < m:  # members that (almost) never count are dropped, so they cost nothing
        total = sum(fitted["weights"][i] for i in keep)
        fitted["weights"] = [fitted["weights"][i] / total for i in keep]
        if fitted["member_temperatures"]:
            fitted["member_temperatures"] = [fitted["member_temperatures"][i] for i in keep]
    fitted["kept"] = keep
    if spec.temperature:
        fitted["temperature"] = fit_temperature(apply_fitted(np.asarray(stack)[keep], fitted), labels)
    return fitted


def pool_of(spec: EnsembleSpec, table: pd.DataFrame, store: dict) -> pd.DataFrame:
    """The members a ``{top_k, by, pool}`` selection may take (rows of ``Experiment.members`` with stored logits)."""
    kinds = POOLS[spec.members.get("pool", "trials")] if isinstance(spec.members, dict) else POOLS["library"]
    return table[table.kind.isin(kinds) & table.index.isin(list(store))]


def _select_members(spec: EnsembleSpec, table: pd.DataFrame, store: dict) -> list[str]:
    if isinstance(spec.members, list):
        missing = [m for m in spec.members if m not in store]
        if missing:
            raise ConfigError(f"members: {missing[0]!r} has no stored logits (run `fer-ray tta` first)")
        return list(spec.members)
    by = spec.members.get("by", "best_val_acc")
    if by not in table.columns:
        raise ConfigError(f"members.by: {by!r} is not a trials.parquet column")
    ranked = pool_of(spec, table, store).sort_values(by, ascending=False, kind="stable")
    return ranked.index[: int(spec.members.get("top_k", 3))].tolist()


def _base_store(exp: Experiment) -> dict[str, dict[str, LogitSet]]:
    return {m: s for m, s in load_store(exp).items() if not m.startswith("ensemble:")}


def _choose(spec: EnsembleSpec, table: pd.DataFrame, store: dict, views: list[str],
            score: dict[str, float] | None = None) -> list[str]:
    """The members ``spec`` names: its list, or the top-k of its pool by ``by`` (by ``score`` instead when given and
    ``by`` is the selection-split accuracy, so an out-of-fold fit ranks on its own folds), cut to ``budget_gmacs``."""
    by_accuracy = isinstance(spec.members, dict) and spec.members.get("by", "best_val_acc") == "best_val_acc"
    if score is not None and by_accuracy:
        ranked = sorted(score, key=lambda m: -score[m])
        members = ranked[: int(spec.members.get("top_k", 3))]
    else:
        members = _select_members(spec, table, store)
    if spec.budget_gmacs is not None:
        kept, cost = [], 0.0
        for m in members:
            if cost + table.gmacs[m] * len(views) > spec.budget_gmacs:
                break  # a weaker member never replaces a stronger one that did not fit
            kept.append(m)
            cost += table.gmacs[m] * len(views)
        members = kept
    if not members:
        raise ConfigError(f"ensemble {spec.name!r}: no member fits (budget {spec.budget_gmacs} GMACs?)")
    lacking = [m for m in members if spec.select_split not in store[m]]
    if lacking:
        raise ConfigError(f"members: {lacking[0]!r} has no logits on the selection split {spec.select_split!r}")
    return members


def out_of_fold(spec: EnsembleSpec, table: pd.DataFrame, store: dict, views: list[str]) -> dict | None:
    """Out-of-fold estimate on the selection split: for each of ``oof_folds`` stratified folds, choose the members
    and fit every number on the other folds only, then score the held-out fold; ``None`` when off or too small."""
    sel = spec.select_split
    names = spec.members if isinstance(spec.members, list) else list(pool_of(spec, table, store).index)
    names = [m for m in names if sel in store[m] and all(v in store[m][sel].views for v in views)]
    if not spec.oof_folds or not names:
        return None
    labels = store[names[0]][sel].labels
    # StratifiedKFold needs some class with at least k images: a tiny selection split gets fewer folds, or none.
    k = int(min(spec.oof_folds, len(labels) // 2, np.bincount(labels).max(initial=0)))
    if k < 2:
        return None
    import warnings

    from sklearn.model_selection import StratifiedKFold

    logits = {m: member_logits(store[m][sel], views) for m in names}
    pred = np.zeros(next(iter(logits.values())).shape)
    with warnings.catch_warnings():  # a class rarer than k images (disgust) just lands in fewer folds
        warnings.filterwarnings("ignore", message="The least populated class")
        folds = list(StratifiedKFold(k, shuffle=True, random_state=spec.seed).split(pred, labels))
    for fit, held in folds:
        score = {m: float((x[fit].argmax(1) == labels[fit]).mean()) for m, x in logits.items()}
        members = _choose(spec, table, store, views, score)
        fitted = fit_ensemble(np.stack([logits[m][fit] for m in members]), labels[fit], spec)
        pred[held] = apply_fitted(np.stack([logits[members[i]][held] for i in fitted["kept"]]), fitted)
    m = classification_metrics(pred, labels)
    return {"accuracy": m["accuracy"], "nll": m["nll"], "folds": k}


def run_ensemble(exp: Experiment | str, spec: EnsembleSpec) -> dict:
    """Build ``spec`` from the store, write ``ensembles/<name>.json`` (with the out-of-fold estimate) and the
    ensemble's logits per split."""
    exp = as_experiment(exp)
    check_role(exp, spec.select_split)
    table = exp.members()
    store = _base_store(exp)
    candidates = _select_members(spec, table, store)
    views = spec.views or store[candidates[0]][spec.select_split].views
    members = _choose(spec, table, store, views)
    sel = [store[m][spec.select_split] for m in members]
    fitted = fit_ensemble(np.stack([member_logits(s, views) for s in sel]), sel[0].labels, spec)
    dropped = [m for i, m in enumerate(members) if i not in fitted["kept"]]
    if "greedy_picks" in fitted:
        fitted["greedy_picks"] = [members[i] for i in fitted["greedy_picks"]]
    if "greedy_bags" in fitted:
        fitted["greedy_bags"] = [[members[i] for i in bag] for bag in fitted["greedy_bags"]]
    members = [members[i] for i in fitted.pop("kept")]
    roles = exp.roles()
    total = float(sum(table.gmacs[m] for m in members) * len(views))
    metrics = {}
    for split in store[members[0]]:
        sets = [store[m][split] for m in members]
        logits = apply_fitted(np.stack([member_logits(s, views) for s in sets]), fitted)
        write_logits(exp, f"ensemble:{spec.name}", split, logits[None], sets[0].labels, sets[0].ids, ["combined"],
                     {"member": f"ensemble:{spec.name}", "kind": "ensemble", "members": members, "views": ["combined"],
                      "member_views": list(views), "split": split, "role": roles.get(split), "combiner": spec.combiner,
                      "selected_on": spec.select_split, "gmacs_per_view": total})
        metrics[split] = {k: v for k, v in classification_metrics(logits, sets[0].labels).items()
                          if k != "confusion"}
    out = {"name": spec.name, "spec": spec.to_dict(), "members": members, "views": list(views),
           "member_checkpoints": {m: store[m][spec.select_split].meta.get("checkpoint_sha256") for m in members},
           "weights": fitted["weights"], "combiner": spec.combiner, "fitted": fitted, "dropped": dropped,
           "selected_on": spec.select_split, "total_gmacs": total, "metrics": metrics,
           "oof": out_of_fold(spec, table, store, list(views))}
    exp.write_ensemble(out)
    return out


def stale_reason(info: dict, store: dict[str, dict[str, LogitSet]]) -> str | None:
    """Why an ensemble's stored fitted numbers no longer apply to the store (``None`` if they do): a member whose
    logits are gone, miss the ensemble's views, or were re-scored from another checkpoint."""
    for m in info["members"]:
        sets = store.get(m, {})
        if not sets:
            return f"member {m} has no stored logits"
        ls = next(iter(sets.values()))
        missing = [v for v in info["views"] if v not in ls.views]
        if missing:
            return f"member {m}'s stored logits lack its views {missing}"
        want = (info.get("member_checkpoints") or {}).get(m)
        if want and ls.meta.get("checkpoint_sha256") != want:
            return f"member {m} was re-scored from another checkpoint"
    return None


def reproduce_ensemble(exp: Experiment | str, name: str, split: str) -> np.ndarray:
    """``[N, C]`` logits of ensemble ``name`` on ``split``, rebuilt from ``ensembles/<name>.json`` (no refit);
    a stale ensemble (``stale_reason``) is refused with ``StoreError``."""
    exp = as_experiment(exp)
    info = exp.ensemble(name)
    store = load_store(exp, [split])
    reason = stale_reason(info, store)
    if reason:
        raise StoreError(f"ensemble {name!r} is stale ({reason}): rebuild it with `fer-ray ensemble`")
    return apply_fitted(np.stack([member_logits(store[m][split], info["views"]) for m in info["members"]]),
                        info["fitted"])


def pareto_front(points: np.ndarray) -> np.ndarray:
    """Indices of (cost, accuracy) points not dominated by a cheaper-or-equal, at-least-as-accurate point."""
    points = np.asarray(points, dtype=np.float64)
    order = np.lexsort((-points[:, 1], points[:, 0]))
    front, best = [], -np.inf
    for i in order:
        if points[i, 1] > best:
            front.append(i)
            best = points[i, 1]
    return np.array(front, dtype=int)


def _grow(stack: np.ndarray, labels: np.ndarray) -> list[tuple[list[int], float]]:
    """From each member, add the member that most raises accuracy of the logit mean; every prefix, with its acc."""
    out = []
    for start in range(len(stack)):
        chosen, total = [start], stack[start].astype(np.float64)
        out.append((list(chosen), float((total.argmax(1) == labels).mean())))
        while len(chosen) < len(stack):
            rest = [m for m in range(len(stack)) if m not in chosen]
            accs = [float(((total + stack[m]).argmax(1) == labels).mean()) for m in rest]
            m = rest[int(np.argmax(accs))]
            chosen.append(m)
            total = total + stack[m]
            out.append((list(chosen), max(accs)))
    return out


def budget_candidates(exp: Experiment | str, select_split: str = "val") -> pd.DataFrame:
    """Candidate ensembles (``mean_logits``) per TTA view subset, with cost and selection-split accuracy.

    Columns: ``views``, ``members`` (growth order), ``n_members``, ``gmacs`` (Σ member GMACs × views),
    ``select_acc``, ``on_front``. Duplicates (same views and member set) are dropped.
    """
    exp = as_experiment(exp)
    check_role(exp, select_split)
    trials = exp.trials().set_index("trial_id")
    store = _base_store(exp)
    members = [m for m in trials.index if m in store and select_split in store[m]]
    if not members:
        raise ConfigError(f"{exp}: no stored logits on {select_split!r} (run `fer-ray tta` first)")
    sets = [store[m][select_split] for m in members]
    stored = [v for v in sets[0].views if all(v in s.views for s in sets)]
    subsets = []
    for vs in [*map(list, VIEW_SUBSETS), stored]:
        if vs and all(v in stored for v in vs) and vs not in subsets:
            subsets.append(vs)
    rows, labels = [], sets[0].labels
    for views in subsets:
        stack = np.stack([member_logits(s, views) for s in sets])
        for idx, acc in _grow(stack, labels):
            names = [members[i] for i in idx]
            rows.append({"views": " ".join(views), "members": " ".join(names), "n_members": len(idx),
                         "gmacs": float(trials.loc[names, "gmacs"].sum()) * len(views), "select_acc": acc,
                         "_key": " ".join(views) + "|" + " ".join(sorted(names))})
    cand = pd.DataFrame(rows).drop_duplicates("_key").drop(columns="_key").reset_index(drop=True)
    cand["on_front"] = False
    cand.loc[pareto_front(cand[["gmacs", "select_acc"]].to_numpy()), "on_front"] = True
    return cand


def budget_search(exp: Experiment | str, budget_gmacs: float, select_split: str = "val",
                  name: str | None = None) -> dict:
    """Build the most accurate candidate (on the selection split) costing ≤ ``budget_gmacs``; write ``pareto.csv``.

    Selection uses only ``select_split``; report-split accuracy of the Pareto points and the chosen one is added
    to ``pareto.csv`` afterwards (``acc_<split>`` per report split) for the plot, never to choose.
    """
    exp = as_experiment(exp)
    cand = budget_candidates(exp, select_split)
    fits = cand[cand.gmacs <= budget_gmacs + 1e-12]
    if fits.empty:
        raise ConfigError(f"budget_gmacs: no candidate costs <= {budget_gmacs} GMACs "
                          f"(cheapest: {cand.gmacs.min():.4g})")
    best = fits.sort_values(["select_acc", "gmacs", "n_members"], ascending=[False, True, True]).index[0]
    cand["chosen"] = cand.index == best
    cand["budget_gmacs"] = float(budget_gmacs)
    roles = exp.roles()
    store = _base_store(exp)
    shown = cand.on_front | cand.chosen
    for split in [s for s, r in roles.items() if r == "report"]:
        col = f"acc_{split}"
        cand[col] = np.nan
        for i in cand.index[shown]:
            ms, views = cand.at[i, "members"].split(), cand.at[i, "views"].split()
            if all(split in store[m] for m in ms):
                total = sum(member_logits(store[m][split], views).astype(np.float64) for m in ms)
                cand.at[i, col] = float((total.argmax(1) == store[ms[0]][split].labels).mean())
    pareto_location = exp.write_pareto(cand)
    row = cand.loc[best]
    spec = EnsembleSpec(name=name or f"budget_{budget_gmacs:g}gmacs", members=row.members.split(),
                        views=row.views.split(), combiner="mean_logits", select_split=select_split)
    out = run_ensemble(exp, spec)
    out["budget_search"] = {"budget_gmacs": float(budget_gmacs), "candidates": len(cand),
                            "pareto_points": int(cand.on_front.sum()), "pareto_csv": pareto_location}
    exp.write_ensemble(out)
    return out
