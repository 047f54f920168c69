"""The logit store: one Parquet file per (member, split) holding TTA logits, labels, image ids and metadata.

Layout: ``<experiment>/logits/<member>/<split>.parquet``, long format (one row per view × image) with
columns ``view`` (dictionary), ``image_id``, ``label``, ``logit_0..logit_{C-1}`` (float32). The producer's
metadata (arch, input size, GMACs per view, checkpoint sha256, split, split role, views, config) is JSON under
the schema metadata key ``fer_ray``. Reading rebuilds ``[V, N, C]`` arrays without per-row Python.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fer_ray.checkpoint import atomic_write_bytes

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


def write_logits(path: str | Path, logits: np.ndarray, labels: np.ndarray, ids: np.ndarray, views: list[str],
                 meta: dict) -> Path:
    """Write one member × split to ``path`` atomically; ``logits`` is ``[V, N, C]``."""
    logits = np.asarray(logits, dtype=np.float32)
    v, n, c = logits.shape
    if len(views) != v or len(labels) != n or len(ids) != n:
        raise StoreError(f"{path}: shapes disagree: logits {logits.shape}, {len(views)} views, {len(labels)} labels")
    cols = {
        "view": pa.DictionaryArray.from_arrays(pa.array(np.repeat(np.arange(v, dtype=np.int32), n)),
                                               pa.array(list(views))),
        "image_id": pa.array(np.tile(np.asarray(ids, dtype=str), v)),
        "label": pa.array(np.tile(np.asarray(labels, dtype=np.int16), v)),
    }
    flat = logits.reshape(v * n, c)
    for k in range(c):
        cols[f"logit_{k}"] = pa.array(flat[:, k])
    table = pa.table(cols).replace_schema_metadata({META_KEY: json.dumps(meta, default=str).encode()})
    path = Path(path)
    atomic_write_bytes(path, lambda f: pq.write_table(table, f))
    return path


def read_logits(path: str | Path) -> LogitSet:
    """Read one store file back into ``[V, N, C]`` arrays."""
    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    views = meta.get("views") or table.column("view").chunk(0).dictionary.to_pylist()
    v = len(views)
    n = table.num_rows // max(v, 1)
    c = sum(1 for name in table.column_names if name.startswith("logit_"))
    logits = np.stack([table.column(f"logit_{k}").to_numpy() for k in range(c)], axis=1).reshape(v, n, c)
    return LogitSet(logits.astype(np.float32, copy=False), table.column("label").to_numpy()[:n].astype(np.int64),
                    table.column("image_id").to_numpy(zero_copy_only=False)[:n], list(views), meta)


def load_store(results_dir: str | Path, splits: list[str] | None = None) -> dict[str, dict[str, LogitSet]]:
    """All stored members → split → ``LogitSet``; checks that members of one split agree on ids and labels."""
    out: dict[str, dict[str, LogitSet]] = {}
    for path in sorted(Path(results_dir, "logits").glob("*/*.parquet")):
        if splits is None or path.stem in splits:
            out.setdefault(path.parent.name, {})[path.stem] = read_logits(path)
    # The reference per split is the (ids, labels) pair most members share, so the odd one out is named.
    for split in {sp for per_split in out.values() for sp in per_split}:
        keyed = {m: (tuple(map(str, ps[split].ids)), ps[split].labels.tobytes())
                 for m, ps in out.items() if split in ps}
        values = list(keyed.values())
        common = max(values, key=values.count)
        for member, key in keyed.items():
            if key != common:
                raise StoreError(f"logits/{member}/{split}.parquet: image ids or labels differ from other members")
    return out
