"""Ensembles over the logit store: choose members and fit combiners on the selection split only.

An ``EnsembleSpec`` (``ensembles/*.yaml`` or the CLI) names members explicitly or as ``{top_k, by}`` over
``trials.parquet``, the TTA views to use, and a combiner. Each member's views are averaged in logit space,
then members are combined: ``mean_logits`` or ``mean_probs``. Anything fitted or selected uses the split
whose role is ``select``; asking for a ``report`` split raises ``ProtocolError``. ``run_ensemble`` writes
``ensembles/<name>.json`` and stores the combined logits as member ``ensemble:<name>`` for every split, so
leaderboard numbers are recomputed from stored logits. Cost = Σ member GMACs per view × views used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fer_ray.checkpoint import atomic_write_text
from fer_ray.config import ConfigError, _Config
from fer_ray.metrics import classification_metrics, softmax
from fer_ray.store import LogitSet, load_store, write_logits

COMBINERS = ("mean_logits", "mean_probs")


class ProtocolError(ValueError):
    """An attempt to fit or select on a split whose role is ``report``."""


@dataclass
class EnsembleSpec(_Config):
    """A named ensemble: members, TTA views, combiner, and the split it is selected on."""

    name: str = "ensemble"
    members: list | dict = field(default_factory=lambda: {"top_k": 3, "by": "best_val_acc"})
    """Trial ids, or ``{top_k: K, by: <trials.parquet column>}`` (highest first)."""
    views: list | None = None
    """TTA views to use (``None``: every stored view)."""
    combiner: str = "mean_logits"
    select_split: str = "val"
    budget_gmacs: float | None = None
    """Keep the top-ranked members whose summed cost fits this budget."""

    def __post_init__(self) -> None:
        if self.combiner not in COMBINERS:
            raise ConfigError(f"combiner: must be one of {COMBINERS}, got {self.combiner!r}")
        if isinstance(self.members, dict) and set(self.members) - {"top_k", "by"}:
            raise ConfigError(f"members: unknown key {sorted(set(self.members) - {'top_k', 'by'})[0]!r}")


def check_role(results_dir: Path, split: str) -> None:
    """Refuse to fit/select on a split whose role is not ``select``."""
    roles = json.loads((Path(results_dir) / "split_roles.json").read_text())
    if roles.get(split) != "select":
        raise ProtocolError(f"split {split!r} has role {roles.get(split)!r}; ensembles are fitted and selected only "
                            f"on the selection split ({', '.join(k for k, v in roles.items() if v == 'select')})")


def member_logits(ls: LogitSet, views: list[str] | None) -> np.ndarray:
    """``[N, C]``: the member's chosen TTA views averaged in logit space."""
    idx = [ls.views.index(v) for v in views] if views else list(range(len(ls.views)))
    return ls.logits[idx].mean(0)


def combine(stack: np.ndarray, combiner: str) -> np.ndarray:
    """``[M, N, C]`` member logits → ``[N, C]`` ensemble logits (log-probabilities for ``mean_probs``)."""
    if combiner == "mean_probs":
        return np.log(softmax(stack).mean(0) + 1e-12)
    return stack.mean(0)


def _select_members(spec: EnsembleSpec, trials: pd.DataFrame, store: dict) -> list[str]:
    if isinstance(spec.members, list):
        missing = [m for m in spec.members if m not in store]
        if missing:
            raise ConfigError(f"members: {missing[0]!r} has no stored logits (run `fer-ray tta` first)")
        return list(spec.members)
    by = spec.members.get("by", "best_val_acc")
    if by not in trials.columns:
        raise ConfigError(f"members.by: {by!r} is not a trials.parquet column")
    ranked = trials[trials.trial_id.isin(store)].sort_values(by, ascending=False)
    return ranked.trial_id.head(int(spec.members.get("top_k", 3))).tolist()


def run_ensemble(results_dir: str | Path, spec: EnsembleSpec) -> dict:
    """Build ``spec`` from the store, write ``ensembles/<name>.json`` and the ensemble's logits per split."""
    exp = Path(results_dir)
    check_role(exp, spec.select_split)
    trials = pd.read_parquet(exp / "trials.parquet")
    store = {m: s for m, s in load_store(exp).items() if not m.startswith("ensemble:")}
    members = _select_members(spec, trials, store)
    gmacs = trials.set_index("trial_id").gmacs
    views = spec.views or store[members[0]][spec.select_split].views
    if spec.budget_gmacs is not None:
        kept, cost = [], 0.0
        for m in members:
            if cost + gmacs[m] * len(views) <= spec.budget_gmacs:
                kept.append(m)
                cost += gmacs[m] * len(views)
        members = kept
    if not members:
        raise ConfigError(f"ensemble {spec.name!r}: no member fits (budget {spec.budget_gmacs} GMACs?)")
    roles = json.loads((exp / "split_roles.json").read_text())
    metrics = {}
    for split in store[members[0]]:
        sets = [store[m][split] for m in members]
        logits = combine(np.stack([member_logits(s, views) for s in sets]), spec.combiner)
        write_logits(exp / "logits" / f"ensemble:{spec.name}" / f"{split}.parquet", logits[None], sets[0].labels,
                     sets[0].ids, ["combined"],
                     {"member": f"ensemble:{spec.name}", "kind": "ensemble", "members": members, "views": ["combined"],
                      "member_views": list(views), "split": split, "role": roles.get(split), "combiner": spec.combiner,
                      "gmacs_per_view": float(sum(gmacs[m] for m in members) * len(views))})
        metrics[split] = {k: v for k, v in classification_metrics(logits, sets[0].labels).items()
                          if k != "confusion"}
    out = {"name": spec.name, "spec": spec.to_dict(), "members": members, "views": list(views),
           "weights": [1.0 / len(members)] * len(members), "combiner": spec.combiner,
           "selected_on": spec.select_split, "total_gmacs": float(sum(gmacs[m] for m in members) * len(views)),
           "metrics": metrics}
    atomic_write_text(exp / "ensembles" / f"{spec.name}.json", json.dumps(out, indent=1))
    return out
