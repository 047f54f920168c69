"""The logit store: one Parquet file per (member, split) holding TTA logits, labels, image ids and metadata.

Files live in the experiment at ``logits/<member>/<split>.parquet`` (``Experiment.logits_rel``), long format (one
row per view × image) with columns ``view`` (dictionary), ``image_id``, ``label``, ``logit_0..logit_{C-1}``
(float32). The producer's metadata (arch, input size, GMACs per view, checkpoint sha256, split, split role, views,
config) is JSON under the schema metadata key ``fer_ray``. Reading rebuilds ``[V, N, C]`` arrays without per-row Python.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fer_ray.experiment import Experiment, as_experiment
from fer_ray.storage import Storage, parent_and_name

META_KEY = b"fer_ray"


class StoreError(ValueError):
    """Logit files that disagree (ids, labels) or are malformed."""


@dataclass
class LogitSet:
    """TTA logits of one member on one split: ``logits [V, N, C]`` float32 aligned with ``labels``/``ids``."""

    logits: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    views: list[str]
    meta: dict = field(default_factory=dict)


def logit_table(logits: np.ndarray, labels: np.ndarray, ids: np.ndarray, views: list[str], meta: dict,
                where: str = "") -> pa.Table:
    """The store's table for ``logits [V, N, C]`` (one row per view × image) with ``meta`` in its schema."""
    logits = np.asarray(logits, dtype=np.float32)
    v, n, c = logits.shape
    if len(views) != v or len(labels) != n or len(ids) != n:
        raise StoreError(f"{where}: shapes disagree: logits {logits.shape}, {len(views)} views, {len(labels)} labels")
    cols = {
        "view": pa.DictionaryArray.from_arrays(pa.array(np.repeat(np.arange(v, dtype=np.int32), n)),
                                               pa.array(list(views))),
        "image_id": pa.array(np.tile(np.asarray(ids, dtype=str), v)),
        "label": pa.array(np.tile(np.asarray(labels, dtype=np.int16), v)),
    }
    flat = logits.reshape(v * n, c)
    for k in range(c):
        cols[f"logit_{k}"] = pa.array(flat[:, k])
    return pa.table(cols).replace_schema_metadata({META_KEY: json.dumps(meta, default=str).encode()})


def write_logits(exp: Experiment | str, member: str, split: str, logits: np.ndarray, labels: np.ndarray,
                 ids: np.ndarray, views: list[str], meta: dict) -> str:
    """Write one member × split into the experiment's store (atomically); ``logits`` is ``[V, N, C]``."""
    exp = as_experiment(exp)
    rel = exp.logits_rel(member, split)
    table = logit_table(logits, labels, ids, views, meta, rel)
    return exp.write_with(rel, lambda f: pq.write_table(table, f))


def read_meta(exp: Experiment | str, member: str, split: str) -> dict:
    """The producer's metadata of one stored file, without reading its rows (``{}`` if it has none)."""
    exp = as_experiment(exp)
    schema = exp.call(lambda: pq.read_schema(exp.path(exp.logits_rel(member, split)), filesystem=exp.fs))
    return json.loads((schema.metadata or {}).get(META_KEY, b"{}"))


def read_logits(exp: Experiment | str, member: str, split: str) -> LogitSet:
    """Read one stored member × split back into ``[V, N, C]`` arrays."""
    exp = as_experiment(exp)
    rel = exp.logits_rel(member, split)
    if not exp.is_file(rel):
        raise StoreError(f"{exp.uri_of(rel)}: no stored logits (run `fer-ray tta` first)")
    return _read(exp.call(lambda: pq.read_table(exp.path(rel), filesystem=exp.fs)))


def read_logit_file(location: str | Path) -> LogitSet:
    """Read a logit file written with ``logit_table`` anywhere (a path or URI), e.g. a student's teacher logits."""
    folder, name = parent_and_name(str(location))
    storage = Storage(folder)
    return _read(storage.call(lambda: pq.read_table(storage.path(name), filesystem=storage.fs)))


def _read(table: pa.Table) -> LogitSet:
    meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    views = meta.get("views") or table.column("view").chunk(0).dictionary.to_pylist()
    v = len(views)
    n = table.num_rows // max(v, 1)
    c = sum(1 for name in table.column_names if name.startswith("logit_"))
    logits = np.stack([table.column(f"logit_{k}").to_numpy() for k in range(c)], axis=1).reshape(v, n, c)
    return LogitSet(logits.astype(np.float32, copy=False), table.column("label").to_numpy()[:n].astype(np.int64),
                    table.column("image_id").to_numpy(zero_copy_only=False)[:n], list(views), meta)


def load_store(exp: Experiment | str, splits: list[str] | None = None) -> dict[str, dict[str, LogitSet]]:
    """All stored members → split → ``LogitSet``; checks that members of one split agree on ids and labels."""
    exp = as_experiment(exp)
    out: dict[str, dict[str, LogitSet]] = {}
    for member, split in exp.store_entries(splits):
        out.setdefault(member, {})[split] = read_logits(exp, member, split)
    # The reference per split is the (ids, labels) pair most members share, so the odd one out is named.
    for split in {sp for per_split in out.values() for sp in per_split}:
        keyed = {m: (tuple(map(str, ps[split].ids)), ps[split].labels.tobytes())
                 for m, ps in out.items() if split in ps}
        values = list(keyed.values())
        common = max(values, key=values.count)
        for member, key in keyed.items():
            if key != common:
                raise StoreError(f"{exp.logits_rel(member, split)}: image ids or labels differ from other members")
    return out
