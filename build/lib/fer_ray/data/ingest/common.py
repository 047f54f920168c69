"""What every reader of the ingest package shares.

This module owns the result types (``IngestReport``, the per-source ``Part``), the limits and codes every reader
uses (``BAD_ROW_MODES``, ``N_PIXELS``, the row problem codes), the one-line messages (``describe_row``, the
OS-error wording of ``reading``, ``SKIP_HINT``), the source-file hashing behind the cache key
(``hash_file``) and the check that a run's splits have rows (``require_splits``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from fer_ray.data.dataset import CLASSES, IMG_SIZE, USAGES, DataError, FERData
from fer_ray.names import SPLIT_ROLES, SPLIT_USAGE

BAD_ROW_MODES = ("error", "skip")
N_PIXELS = IMG_SIZE * IMG_SIZE
MAX_PROBLEMS = 5  # problems kept for the report / warning in skip mode
SKIP_HINT = "or pass on_bad_row='skip'"
RUN_SPLITS = tuple(s for s, role in SPLIT_ROLES.items() if role != "report")
"""The run splits no run can do without (``train`` and ``val``: the ``fit`` and ``select`` roles)."""
_HASH_CHUNK = 1 << 20
_CLASS_HINT = ", ".join(f"{i}={c}" for i, c in enumerate(CLASSES))

# Row problem codes; when a row has several problems the highest code is reported.
OK = 0
PIXEL_COUNT = 1
PIXEL_RANGE = 2
PIXEL_NOT_INT = 3
USAGE_BAD = 4
LABEL_BAD = 5
DUP_HEADER = 6
NON_UTF8 = 7


@dataclass
class IngestReport:
    """What a load did.

    Attributes:
        source: The path that was loaded (after ``auto`` resolution).
        fmt: The resolved format.
        n_rows: Rows (images) in the returned data.
        skipped: Bad rows/images dropped under ``on_bad_row="skip"`` (0 in ``"error"`` mode).
        problems: One-line descriptions of the first few skipped rows/images.
        cache_path: The cache file used or written, if ``cache_dir`` was given.
        cache_hit: Whether the data came from the cache.
        seconds: Wall time of the load.
    """

    source: Path
    fmt: str
    n_rows: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)
    cache_path: Path | None = None
    cache_hit: bool = False
    seconds: float = 0.0


@dataclass
class Part:
    """Rows read from one source file or folder tree."""

    images: np.ndarray
    labels: np.ndarray
    usage: np.ndarray
    ids: np.ndarray
    skipped: int = 0
    problems: list[str] = field(default_factory=list)


def concat_parts(parts: list[Part]) -> Part:
    """One ``Part`` holding ``parts``' rows in order, their skipped counts summed and the first problems kept."""
    return Part(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]),
                np.concatenate([p.usage for p in parts]), np.concatenate([p.ids for p in parts]),
                sum(p.skipped for p in parts), [m for p in parts for m in p.problems][:MAX_PROBLEMS])


class Source(Protocol):
    """One on-disk layout rooted at a path: built by ``SourceClass(root)``, which raises ``DataError`` when the
    root does not hold that layout."""

    def fingerprint(self, h: hashlib._Hash) -> None:
        """Feed everything the loaded rows depend on to ``h`` (the cache key)."""

    def load(self, on_bad_row: str) -> Part:
        """Read and validate the rows; ``on_bad_row`` is ``"error"`` or ``"skip"``."""


@contextmanager
def reading(path: Path, is_dir: str | None = None) -> Iterator[None]:
    """Turn an ``OSError`` raised while reading ``path`` into a one-line ``DataError``.

    Args:
        path: The file being read, for the message.
        is_dir: Problem and fix reported when ``path`` is a directory; ``None``: the generic "cannot read".
    """
    try:
        yield
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; check the path") from None
    except IsADirectoryError as e:
        raise DataError(f"{path}: {is_dir}" if is_dir else f"{path}: cannot read ({e.strerror}); check permissions"
                        ) from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}); check permissions") from None


def hash_file(h: hashlib._Hash, path: Path) -> None:
    """Feed ``path``'s bytes to ``h`` in 1 MiB chunks."""
    with reading(path), open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)


def describe_row(code: int, label: str, pixels: str, usage: str) -> str:
    """One-line problem + fix for a row flagged with ``code`` (only called for reported rows)."""
    if code == NON_UTF8:
        return "non-UTF-8 bytes; re-save the file as UTF-8"
    if code == DUP_HEADER:
        return "duplicate header line mid-file (files concatenated?); delete this line"
    if code == LABEL_BAD:
        s = label.strip()
        if re.fullmatch(r"[+-]?[0-9]+", s):
            return f"emotion {s} outside 0-6; use a class index ({_CLASS_HINT})"
        return f"emotion {s[:20]!r} is not an integer; use a class index 0-6"
    if code == USAGE_BAD:
        return f"unknown Usage {usage.strip()[:30]!r}; use {'/'.join(USAGES)}"
    tokens = [t for t in re.split(r"[ \t]+", pixels) if t]
    if code in (PIXEL_NOT_INT, PIXEL_RANGE):
        for k, tok in enumerate(tokens, 1):
            if re.fullmatch(r"[0-9]{1,9}", tok) and int(tok) <= 255:
                continue
            if re.fullmatch(r"[+-]?[0-9]+", tok):
                return f"pixel {k} is {tok[:20]}, outside 0-255; pixels must be integers 0-255"
            return f"pixel {k} is {tok[:20]!r}, not an integer; pixels must be space-separated integers 0-255"
    if not tokens:
        return "no pixels (truncated line?); complete or delete the line"
    return f"{len(tokens)} pixels, expected {N_PIXELS} (48x48); fix or delete the line"


def require_splits(data: FERData, needed: Iterable[str] = RUN_SPLITS, path: str | Path | None = None) -> None:
    """Fail early, with one line, when a split a run needs has no rows.

    Checks the usage each split is drawn from (``val`` is carved out of Training), so call it on the loaded data
    (after FER+ relabelling and dedup, which drop rows) before ``split_indices``.

    Args:
        data: The loaded dataset.
        needed: Usage names (``"Training"``, ``"PublicTest"``, ``"PrivateTest"``) or run split names
            (``"train"``/``"val"`` map to Training, ``"public_test"``, ``"private_test"``); the default,
            ``RUN_SPLITS``, is ``train`` and ``val``, which every run fits and selects on.
        path: The dataset path, for the message (``None``: the message names no path).

    Raises:
        DataError: ``zero rows for split X in PATH; ...``.
    """
    where, what_for = ("", "") if path is None else (f" in {path}", f" for {path}")
    counts = np.bincount(np.asarray(data.usage, np.int64), minlength=len(USAGES))
    have = ", ".join(f"{u} {int(c)}" for u, c in zip(USAGES, counts))
    for name in needed:
        usage = name if name in USAGES else SPLIT_USAGE.get(name)
        if usage is None:
            raise DataError(f"unknown split {name!r} required{what_for}; use one of "
                            f"{', '.join(USAGES + tuple(SPLIT_USAGE))}")
        if counts[USAGES.index(usage)] == 0:
            alias = f" (usage {usage})" if usage != name else ""
            raise DataError(f"zero rows for split {name}{alias}{where}; the data has {have}; "
                            f"point at a dataset that contains {usage} rows or drop that split from the run")
