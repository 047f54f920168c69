"""Scoring a finished experiment on another dataset: a new report-only split, with no retraining and no refitting.

``evaluate_external`` owns this: it loads any dataset the loaders read (``fer_ray.data.ingest.load_dataset``,
including a flat ``<class>/`` folder layout such as CK+ or JAFFE, with a class map renaming or dropping folders);
every image, whatever its ``Usage``, becomes one new split ``NAME`` (default ``ext_<stem of the path>``) with role
``report`` in ``split_roles.json``, so nothing is ever selected or fitted on it (``check_role`` refuses). Every
stored member (sweep trials and distilled students) is scored from its verified checkpoint with the TTA views it
already has, into ``logits/<member>/<NAME>.parquet``; every ensemble in ``ensembles/*.json`` is rebuilt on the
split from its stored fitted numbers (``reproduce_ensemble``) into ``logits/ensemble:<name>/<NAME>.parquet``; the
report is rewritten, so the leaderboard gains ``acc_<NAME>``, ``macro_f1_<NAME>``, ... columns. The source of
each external split is recorded under ``external`` in ``data.json`` (``fer-ray distill`` re-reads it to score a
new student there too).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from fer_ray.config import ConfigError
from fer_ray.data import CLASSES, SPLITS, FERData
from fer_ray.ensemble import reproduce_ensemble
from fer_ray.experiment import Experiment, as_experiment
from fer_ray.inference import fill_store
from fer_ray.metrics import classification_metrics
from fer_ray.names import path_name_problem
from fer_ray.report import leaderboard, member_table, write_report
from fer_ray.store import read_logits, write_logits


def default_split_name(path: str | Path) -> str:
    """``ext_<stem>`` for a file, ``ext_<folder name>`` for a folder, with other characters replaced by ``_``."""
    p = Path(path)
    stem = p.stem if p.suffix and not p.is_dir() else p.name
    return "ext_" + (re.sub(r"[^A-Za-z0-9_.-]", "_", stem) or "data")


def _check_name(exp: Experiment, name: str, roles: dict[str, str], external: dict) -> None:
    if path_name_problem(name):
        raise ConfigError(f"--name: {path_name_problem(name)}")
    if name in SPLITS or (name in roles and name not in external):
        raise ConfigError(f"--name {name!r}: {exp.uri} already has a split of that name (role {roles.get(name)!r}); "
                          "choose another name")


def _views_of(exp: Experiment, member: str, roles: dict[str, str]) -> list[str]:
    """The TTA views ``member`` was stored with (read from any of its non-ensemble store files)."""
    for split in [s for s, r in roles.items() if r == "select"] + list(roles):
        if exp.has_logits(member, split):
            return list(read_logits(exp, member, split).views)
    raise ConfigError(f"{exp.uri}: member {member!r} has no stored logits (run `fer-ray tta` first)")


def _drop_stale(exp: Experiment, member: str, split: str, ids: np.ndarray) -> None:
    """Remove a stored file of this split whose image ids differ (same name reused for another dataset)."""
    rel = exp.logits_rel(member, split)
    if exp.is_file(rel):
        stored = exp.call(lambda: pq.read_table(exp.path(rel), columns=["image_id"], filesystem=exp.fs))
        stored = stored.column("image_id")
        stored = stored.to_numpy(zero_copy_only=False)
        n = len(ids)
        if len(stored) % max(n, 1) or not np.array_equal(stored[:n].astype(str), ids):
            exp.delete(rel)


def score_members(exp: Experiment, data: FERData, name: str, members: pd.DataFrame, progress: bool = True) -> list[str]:
    """TTA logits of each row of ``members`` (a ``member_table`` slice) on all of ``data`` as split ``name``.

    Members with nothing in the store yet (never TTA-scored) are skipped: the leaderboard lists stored ones only.
    """
    roles = exp.roles()
    ids = data.ids.astype(str)
    by_views: dict[tuple, list[str]] = {}
    for member in [m for m in members.index if exp.has_logits(m)]:
        _drop_stale(exp, member, name, ids)
        by_views.setdefault(tuple(_views_of(exp, member, roles)), []).append(member)
    written = []
    for views, group in by_views.items():
        rows = members.loc[group].reset_index()
        written += fill_store(exp, data, {name: np.arange(len(data))}, list(views), {name: "report"}, trials=rows,
                              progress=progress)
    return written


def rebuild_ensembles(exp: Experiment, name: str) -> dict[str, dict]:
    """Each ``ensembles/<e>.json`` applied to split ``name`` from its stored fitted numbers; returns metrics per e."""
    out = {}
    for ens in exp.ensemble_names():
        info = exp.ensemble(ens)
        logits = reproduce_ensemble(exp, info["name"], name)
        ref = read_logits(exp, info["members"][0], name)
        write_logits(exp, f"ensemble:{info['name']}", name, logits[None], ref.labels, ref.ids, ["combined"],
                     {"member": f"ensemble:{info['name']}", "kind": "ensemble", "members": info["members"],
                      "views": ["combined"], "member_views": info["views"], "split": name, "role": "report",
                      "combiner": info["combiner"], "selected_on": info.get("selected_on"),
                      "gmacs_per_view": info["total_gmacs"], "reproduced": True})
        metrics = {k: v for k, v in classification_metrics(logits, ref.labels).items() if k != "confusion"}
        info.setdefault("metrics", {})[name] = metrics
        exp.write_ensemble(info)
        out[info["name"]] = metrics
    return out


def register_split(exp: Experiment, name: str, data: FERData, source: str, fmt: str,
                   class_map: str | None = None) -> None:
    """Record ``name`` as a ``report`` split in ``split_roles.json`` and its source (with its class map, if any)
    under ``external`` in data.json."""
    exp.write_roles(exp.roles() | {name: "report"})
    info = exp.data_info()
    info.setdefault("external", {})[name] = {
        "source": source, "format": fmt, "n": len(data),
        "class_counts": np.bincount(data.labels, minlength=len(CLASSES)).tolist(),
        **({"class_map": class_map} if class_map else {})}
    exp.write_data_info(info)


def external_splits(exp: Experiment) -> dict[str, dict]:
    """The external splits recorded in ``data.json`` (name → source, format, n, class counts)."""
    return exp.data_info().get("external", {})


def load_external(exp: Experiment, source: str, fmt: str = "auto", class_map: str | None = None) -> FERData:
    """Every image of ``source`` (all usages), read through the experiment's data cache. ``class_map`` (image
    folders): default the one recorded in data.json for an external split read from ``source``."""
    from fer_ray.data.ingest import load_dataset

    if class_map is None:
        class_map = next((m.get("class_map") for m in external_splits(exp).values() if m.get("source") == source),
                         None)
    return load_dataset(source, fmt=fmt, cache_dir=exp.sweep().data.cache_dir, class_map=class_map)


def evaluate_external(exp: Experiment | str, data_path: str | Path, name: str | None = None, fmt: str = "auto",
                      progress: bool = True, class_map: str | None = None) -> pd.DataFrame:
    """Score every stored member and ensemble of an experiment on another dataset; rewrite the report.

    Args:
        exp: The experiment (``results/<name>``, or its URI).
        data_path: Any dataset ``load_dataset`` reads; all of its images form the new split.
        name: Split name (default ``default_split_name(data_path)``); must not clash with the run's own splits.
        fmt: ``auto``, ``csv``, ``folders`` (Kaggle or flat ``<class>/`` layout) or ``torchvision``.
        progress: Print one line per scored member.
        class_map: Image folders: ``anger=angry,sadness=sad,contempt=drop`` or a preset (``rafdb``); see
            ``fer_ray.data.ingest.parse_class_map``. Recorded in data.json.

    Returns:
        The rewritten leaderboard (``report/leaderboard.csv``).

    Raises:
        ConfigError: A clashing or unusable name, or members without stored logits.
        DataError: The dataset cannot be read.
    """
    exp = as_experiment(exp)
    name = name or default_split_name(data_path)
    _check_name(exp, name, exp.roles(), external_splits(exp))
    data = load_external(exp, str(data_path), fmt, class_map or "")
    register_split(exp, name, data, str(Path(data_path).absolute()), fmt, class_map)  # role first: never selectable
    score_members(exp, data, name, member_table(exp), progress=progress)
    rebuild_ensembles(exp, name)
    board = leaderboard(exp)
    write_report(exp, board=board)
    return board
