"""The Parquet cache of loaded datasets, keyed by a content hash of the source.

This module owns the cache key (sha256 over ``FORMAT_VERSION``, the format, ``on_bad_row`` and the source's
``fingerprint``), the file layout (``<cache_dir>/<fmt>-<key[:16]>.parquet``: ``images`` fixed 2304-byte binary,
``label`` int8, ``usage`` int8, ``id`` string, and the load's metadata as JSON) and reading and writing it: a
write goes to a temp file beside the target and is renamed over it (``fer_ray.atomic``); a stale, corrupt or
unreadable file is ignored and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fer_ray.atomic import atomic_write_bytes
from fer_ray.data.dataset import CLASSES, IMG_SIZE, USAGES, FERData
from fer_ray.data.ingest.common import N_PIXELS, Source

log = logging.getLogger(__name__)

FORMAT_VERSION = "fer_ray.ingest/1"


def cache_path(cache_dir: str | Path, fmt: str, on_bad_row: str, source: Source) -> Path:
    """The cache file for loading ``source`` as ``fmt`` with ``on_bad_row`` (hashes the source's content)."""
    h = hashlib.sha256(f"{FORMAT_VERSION}\0{fmt}\0{on_bad_row}\0".encode())
    source.fingerprint(h)
    return Path(cache_dir) / f"{fmt}-{h.hexdigest()[:16]}.parquet"


def write_cache(path: Path, data: FERData, meta: dict) -> None:
    """Atomically write ``data`` to ``path``; a failure (read-only folder, full disk) only logs a warning."""
    n = len(data)
    images = pa.FixedSizeBinaryArray.from_buffers(pa.binary(N_PIXELS), n,
                                                  [None, pa.py_buffer(np.ascontiguousarray(data.images))])
    table = pa.table({"images": images, "label": pa.array(data.labels.astype(np.int8)),
                      "usage": pa.array(data.usage.astype(np.int8)), "id": pa.array(data.ids.tolist(), pa.string())})
    table = table.replace_schema_metadata({"fer_ray.version": FORMAT_VERSION, "fer_ray.meta": json.dumps(meta)})
    try:
        atomic_write_bytes(path, lambda f: pq.write_table(table, f, compression="none"))
    except OSError as e:
        log.warning("could not write cache %s (%s); continuing without it", path, e)


def read_cache(path: Path) -> tuple[FERData, dict] | None:
    """Load a cache file written by ``write_cache``; ``None`` when absent, stale or unreadable."""
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
        md = table.schema.metadata or {}
        if md.get(b"fer_ray.version") != FORMAT_VERSION.encode():
            return None
        meta = json.loads(md[b"fer_ray.meta"])
        n = table.num_rows
        col = table.column("images").combine_chunks()
        if col.type != pa.binary(N_PIXELS):
            raise ValueError(f"images column has type {col.type}")
        buf = np.frombuffer(col.buffers()[1], np.uint8, count=n * N_PIXELS, offset=col.offset * N_PIXELS)
        images = buf.reshape(n, IMG_SIZE, IMG_SIZE).copy()
        labels = table.column("label").to_numpy().astype(np.int64)
        usage = table.column("usage").to_numpy().astype(np.int8)
        ids = table.column("id").to_numpy().astype(object)
        if n and (labels.min() < 0 or labels.max() >= len(CLASSES) or usage.min() < 0 or usage.max() >= len(USAGES)):
            raise ValueError("labels or usage out of range")
        return FERData(images, labels, usage, ids), meta
    except (OSError, ValueError, KeyError, pa.ArrowException) as e:
        log.warning("ignoring unreadable cache %s (%s); rebuilding it", path, e)
        return None
