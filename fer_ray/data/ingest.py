"""Dataset ingestion: every supported on-disk FER-2013 layout in, one validated ``FERData`` out.

This module owns format detection, the three readers, row/file validation, ``on_bad_row`` skipping, the
content-keyed parquet cache and ``require_splits``. Nothing else in the project reads raw dataset files.

Formats (``fmt``):

* ``csv``: Kaggle ``fer2013.csv``; header ``emotion,pixels,Usage`` (any column order, names matched
  case-insensitively after trimming spaces; ``Usage`` may be absent, then every row is ``Training``).
  ids are ``row:<line>``, the 1-based physical line number (the header is line 1).
* ``folders``: Kaggle image folders ``<root>/train/<class>/*``, ``<root>/test/<class>/*`` and optionally
  ``<root>/val/<class>/*``. Split and class folder names are matched case-insensitively; class names come
  from ``CLASSES``. Any image size or mode is converted to 48x48 ``L`` (``convert("L")`` then a bilinear
  resize). The official usage comes from the file-name prefix ``Training_``/``PublicTest_``/``PrivateTest_``
  when present (it wins over the folder); otherwise ``train/`` is Training, ``val/`` is PublicTest, and
  ``test/`` is PublicTest, or PrivateTest when a ``val/`` folder exists (train/val/test layouts put the final
  test last). Hidden files and files without an image suffix are ignored. ids are root-relative posix paths;
  rows are sorted by id.
* ``torchvision``: a directory holding torchvision's ``fer2013/`` files (or those files directly):
  ``icml_face_data.csv`` (``emotion, Usage, pixels``; preferred when present since it carries all three
  official splits), else ``train.csv`` (``emotion,pixels``: Training) and ``test.csv`` (``pixels[,emotion]``:
  PublicTest; skipped with a warning when it has no labels). ids are ``<file relative to root>:row:<line>``.
* ``auto``: a file is ``csv``; a directory with ``train/``/``test/`` sub-folders is ``folders``; one with
  ``train.csv``/``test.csv``/``icml_face_data.csv`` (directly or under ``fer2013/``) is ``torchvision``; a
  directory whose ``fer2013/`` holds ``train/``/``test/`` folders is ``folders`` rooted there.

Validation raises ``DataError`` with one line: the file, the 1-based line (or the image path), the problem and
the fix. CSV rows are validated vectorised (pyarrow reads the columns, numpy parses the pixel bytes); only the
first bad row is then described in Python. ``on_bad_row="skip"`` drops bad rows/images instead, logs a warning
``skipped K bad rows of FILE (first: ...)`` and reports the count in ``IngestReport.skipped``.

Cache: with ``cache_dir`` the result is stored as ``<cache_dir>/<fmt>-<key[:16]>.parquet`` (columns ``images``
fixed 2304-byte binary, ``label`` int8, ``usage`` int8, ``id`` string). The key is a sha256 over
``FORMAT_VERSION``, the format, ``on_bad_row`` and the source: for CSV files their bytes (read in 1 MiB
chunks); for image folders the sorted ``(relative path, size, mtime_ns)`` list, so touching or replacing a file
invalidates the cache but the images are not re-read to check. Files are written to a temp file in the same
directory and ``os.replace``d; a failed load leaves no cache or temp file behind.
"""

from __future__ import annotations

import codecs
import contextvars
import csv as pycsv
import hashlib
import io
import json
import logging
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from PIL import Image

from fer_ray.atomic import atomic_write_bytes
from fer_ray.data.dataset import CLASSES, IMG_SIZE, USAGES, DataError, FERData
from fer_ray.names import FORMATS, SPLIT_USAGE

log = logging.getLogger(__name__)

FORMAT_VERSION = "fer_ray.ingest/1"
BAD_ROW_MODES = ("error", "skip")
N_PIXELS = IMG_SIZE * IMG_SIZE
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm"})
HEADER = "emotion,pixels,Usage"
_CLASS_HINT = ", ".join(f"{i}={c}" for i, c in enumerate(CLASSES))
_SPLIT_DIRS = {"train": "train", "test": "test", "val": "val", "validation": "val"}
_TV_FILES = ("icml_face_data.csv", "train.csv", "test.csv")
_CHUNK_ROWS = 1024  # CSV rows parsed per numpy block (~8 MB of pixel text)
_HASH_CHUNK = 1 << 20
_READ_BLOCK = 1 << 22  # pyarrow CSV block size (~500 FER rows)
_SCAN_CHUNK = 1 << 24
_MAX_PROBLEMS = 5  # problems kept for the report / warning in skip mode
_SKIP_HINT = "or pass on_bad_row='skip'"

# Row problem codes; when a row has several problems the highest code is reported.
_OK = 0
_PIXEL_COUNT = 1
_PIXEL_RANGE = 2
_PIXEL_NOT_INT = 3
_USAGE_BAD = 4
_LABEL_BAD = 5
_DUP_HEADER = 6
_NON_UTF8 = 7


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
class _Part:
    """Rows read from one source file or folder tree."""

    images: np.ndarray
    labels: np.ndarray
    usage: np.ndarray
    ids: np.ndarray
    skipped: int = 0
    problems: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- public API


def load_dataset(path: str | Path, fmt: str = "auto", cache_dir: str | Path | None = None,
                 on_bad_row: str = "error") -> FERData:
    """Load FER-2013 from ``path`` into validated arrays.

    Args:
        path: A Kaggle ``fer2013.csv``, an image-folder root, or a torchvision ``FER2013`` root.
        fmt: ``"auto"``, ``"csv"``, ``"folders"`` or ``"torchvision"`` (see the module docstring).
        cache_dir: Directory for the parquet cache; ``None`` disables caching.
        on_bad_row: ``"error"`` raises on the first bad row/image; ``"skip"`` drops bad ones and logs a warning.

    Returns:
        The dataset; ``load_dataset_with_report`` also returns the skipped count and cache details.

    Raises:
        DataError: Missing or malformed input; the message names the file, line or image and the fix.
    """
    return load_dataset_with_report(path, fmt, cache_dir, on_bad_row)[0]


def load_dataset_with_report(path: str | Path, fmt: str = "auto", cache_dir: str | Path | None = None,
                             on_bad_row: str = "error") -> tuple[FERData, IngestReport]:
    """Like ``load_dataset`` but also returns an ``IngestReport`` (skipped rows, cache hit, timing).

    Args:
        path: A Kaggle ``fer2013.csv``, an image-folder root, or a torchvision ``FER2013`` root.
        fmt: ``"auto"``, ``"csv"``, ``"folders"`` or ``"torchvision"``.
        cache_dir: Directory for the parquet cache; ``None`` disables caching.
        on_bad_row: ``"error"`` or ``"skip"``.

    Returns:
        ``(data, report)``.

    Raises:
        DataError: Missing or malformed input.
        ValueError: Unknown ``fmt`` or ``on_bad_row``.
    """
    t0 = time.perf_counter()
    if on_bad_row not in BAD_ROW_MODES:
        raise ValueError(f"on_bad_row must be one of {BAD_ROW_MODES}, got {on_bad_row!r}")
    if fmt == "auto":
        fmt, root = detect_format(path)
    elif fmt in FORMATS:
        root = Path(path)
    else:
        raise ValueError(f"fmt must be 'auto' or one of {FORMATS}, got {fmt!r}")
    source = {"csv": _CsvSource, "folders": _FolderSource, "torchvision": _TorchvisionSource}[fmt](root)
    report = IngestReport(source=root, fmt=fmt)

    cache_file = None
    if cache_dir is not None:
        h = hashlib.sha256(f"{FORMAT_VERSION}\0{fmt}\0{on_bad_row}\0".encode())
        source.fingerprint(h)
        cache_file = Path(cache_dir) / f"{fmt}-{h.hexdigest()[:16]}.parquet"
        report.cache_path = cache_file
        cached = _cache_read(cache_file)
        if cached is not None:
            data, meta = cached
            report.cache_hit = True
            report.skipped = int(meta.get("skipped", 0))
            report.problems = list(meta.get("problems", []))
            return data, _finish(report, data, t0)

    part = source.load(on_bad_row)
    data = FERData(part.images, part.labels, part.usage, part.ids)
    report.skipped, report.problems = part.skipped, part.problems
    if cache_file is not None:
        _cache_write(cache_file, data, {"source": str(root), "fmt": fmt, "skipped": part.skipped,
                                        "problems": part.problems})
    return data, _finish(report, data, t0)


def detect_format(path: str | Path) -> tuple[str, Path]:
    """Resolve ``fmt="auto"`` for ``path``.

    Args:
        path: A file or directory.

    Returns:
        ``(fmt, root)``; ``root`` is ``path`` except for a directory whose ``fer2013/`` holds image folders.

    Raises:
        DataError: ``path`` does not exist or matches no layout.
    """
    p = Path(path)
    if p.is_file():
        return "csv", p
    if not p.exists():
        raise DataError(f"{p}: not found; pass a fer2013.csv file, an image-folder root or a torchvision root")
    if not p.is_dir():
        raise DataError(f"{p}: not a regular file or directory; pass a fer2013.csv file or a dataset directory")
    if _split_dirs(p):
        return "folders", p
    for base in (p, p / "fer2013"):
        if any((base / name).is_file() for name in _TV_FILES):
            return "torchvision", p
    if (p / "fer2013").is_dir() and _split_dirs(p / "fer2013"):
        return "folders", p / "fer2013"
    raise DataError(f"{p}: cannot detect the dataset format: no train/ or test/ image folders and no "
                    f"{', '.join(_TV_FILES)} (also looked in {p / 'fer2013'}); pass fmt= or a fer2013.csv path")


def require_splits(data: FERData, needed: Iterable[str], path: str | Path) -> None:
    """Fail early when a split a run needs has no rows.

    Args:
        data: The loaded dataset.
        needed: Usage names (``"Training"``, ``"PublicTest"``, ``"PrivateTest"``) or run split names
            (``"train"``/``"val"`` map to Training, ``"public_test"``, ``"private_test"``).
        path: The dataset path, for the message.

    Raises:
        DataError: ``zero rows for split X in PATH; ...``.
    """
    counts = np.bincount(np.asarray(data.usage, np.int64), minlength=len(USAGES))
    have = ", ".join(f"{u} {int(c)}" for u, c in zip(USAGES, counts))
    for name in needed:
        usage = name if name in USAGES else SPLIT_USAGE.get(name)
        if usage is None:
            raise DataError(f"unknown split {name!r} required for {path}; use one of "
                            f"{', '.join(USAGES + tuple(SPLIT_USAGE))}")
        if counts[USAGES.index(usage)] == 0:
            alias = f" (usage {usage})" if usage != name else ""
            raise DataError(f"zero rows for split {name}{alias} in {path}; the data has {have}; "
                            f"point at a dataset that contains {usage} rows or drop that split from the run")


def _finish(report: IngestReport, data: FERData, t0: float) -> IngestReport:
    report.n_rows = len(data)
    report.seconds = time.perf_counter() - t0
    if report.problems:
        log.warning("skipped %d bad rows of %s (first: %s)", report.skipped, report.source, report.problems[0])
    log.info("loaded %d rows from %s (%s%s) in %.2fs", report.n_rows, report.source, report.fmt,
             ", cache hit" if report.cache_hit else "", report.seconds)
    return report


# --------------------------------------------------------------------------------------------- sources


class _CsvSource:
    """A Kaggle ``fer2013.csv`` file."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            if path.is_dir():
                raise DataError(f"{path}: is a directory, not a CSV file; pass the fer2013.csv path or fmt='auto'")
            raise DataError(f"{path}: file not found; check the path to fer2013.csv")
        self.path = path

    def fingerprint(self, h: hashlib._Hash) -> None:
        _hash_file(h, self.path)

    def load(self, on_bad_row: str) -> _Part:
        return _parse_csv(self.path, on_bad_row=on_bad_row, default_usage=0, id_prefix="")


class _TorchvisionSource:
    """torchvision's ``FER2013`` root: ``fer2013/icml_face_data.csv`` or ``fer2013/{train,test}.csv``."""

    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise DataError(f"{root}: not a directory; fmt='torchvision' expects the folder holding fer2013/")
        base = root / "fer2013" if (root / "fer2013").is_dir() else root
        if (base / "icml_face_data.csv").is_file():
            self.files = [base / "icml_face_data.csv"]
        else:
            self.files = [base / n for n in ("train.csv", "test.csv") if (base / n).is_file()]
        if not self.files:
            raise DataError(f"{root}: no {', '.join(_TV_FILES)} in {base}; download torchvision's FER2013 files "
                            "there or pass fmt='csv'/'folders'")
        self.root = root

    def fingerprint(self, h: hashlib._Hash) -> None:
        for f in self.files:
            h.update(f"{f.relative_to(self.root).as_posix()}\0".encode())
            _hash_file(h, f)

    def load(self, on_bad_row: str) -> _Part:
        parts = []
        for f in self.files:
            default = 1 if f.name == "test.csv" else 0
            part = _parse_csv(f, on_bad_row=on_bad_row, default_usage=default,
                              id_prefix=f"{f.relative_to(self.root).as_posix()}:", allow_unlabeled=f.name == "test.csv")
            if part is None:
                log.warning("%s has no emotion column (unlabelled Kaggle test set); its rows were not loaded", f)
                continue
            parts.append(part)
        if not parts:
            raise DataError(f"{self.root}: no labelled rows in {', '.join(map(str, self.files))}; "
                            "add train.csv or icml_face_data.csv")
        return _Part(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]),
                     np.concatenate([p.usage for p in parts]), np.concatenate([p.ids for p in parts]),
                     sum(p.skipped for p in parts), [m for p in parts for m in p.problems][:_MAX_PROBLEMS])


class _FolderSource:
    """Kaggle image folders ``<root>/{train,test,val}/<class>/<image>``; the tree is listed once at init."""

    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            if root.exists():
                raise DataError(f"{root}: not a directory; fmt='folders' expects a folder holding train/ and test/")
            raise DataError(f"{root}: not found; pass the folder holding train/ and test/")
        splits = _split_dirs(root)
        if not splits:
            raise DataError(f"{root}: no train/, test/ or val/ folders; fmt='folders' expects "
                            "<root>/train/<class>/*.jpg (or pass fmt='csv'/'torchvision')")
        has_val = "val" in splits
        dir_usage = {"train": 0, "val": 1, "test": 2 if has_val else 1}
        self.root = root
        # (relative posix path, label, usage, size, mtime_ns) per image
        self.entries: list[tuple[str, int, int, int, int]] = []
        self.problems: list[tuple[str, str, int]] = []  # (path, problem, files dropped if skipped)
        for role, split_dir in sorted(splits.items()):
            for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
                if entry.name.startswith("."):
                    continue
                rel_dir = f"{split_dir.name}/{entry.name}"
                if not entry.is_dir():
                    if _is_image_name(entry.name):
                        self.problems.append((entry.path, f"image outside a class folder; move it into "
                                              f"{rel_dir.rsplit('/', 1)[0]}/<class>/ ({', '.join(CLASSES)})", 1))
                    continue
                files = [(f.name, f.stat()) for f in sorted(os.scandir(entry.path), key=lambda e: e.name)
                         if _is_image_name(f.name) and f.is_file()]
                label = CLASSES.index(entry.name.lower()) if entry.name.lower() in CLASSES else -1
                if label < 0:
                    self.problems.append((entry.path, f"unknown class folder {entry.name!r}; rename it to one of "
                                          f"{', '.join(CLASSES)} (case-insensitive) or remove it", len(files)))
                    continue
                if not files:
                    self.problems.append((entry.path, "empty class folder (no image files); add its images or "
                                          "remove the folder", 0))
                    continue
                for name, st in files:
                    usage = next((i for i, u in enumerate(USAGES) if name.startswith(f"{u}_")), dir_usage[role])
                    self.entries.append((f"{rel_dir}/{name}", label, usage, st.st_size, st.st_mtime_ns))
        self.entries.sort()  # rows are in relative-path order

    def fingerprint(self, h: hashlib._Hash) -> None:
        listing = sorted((rel, size, mtime) for rel, _, _, size, mtime in self.entries)
        h.update("".join(f"{rel}\0{size}\0{mtime}\n" for rel, size, mtime in listing).encode())
        # Structural problems change the result in skip mode; include them so fixing them invalidates the cache.
        h.update("".join(f"{p}\0{n}\n" for p, _, n in self.problems).encode())

    def load(self, on_bad_row: str) -> _Part:
        skip = on_bad_row == "skip"
        problems = [f"{p}: {msg}" for p, msg, _ in self.problems]
        if problems and not skip:
            raise DataError(f"{problems[0]}, {_SKIP_HINT}")
        skipped = sum(n for _, _, n in self.problems)
        n = len(self.entries)
        images = np.empty((n, IMG_SIZE, IMG_SIZE), np.uint8)
        ok = np.ones(n, bool)
        for i, (rel, _, _, _, _) in enumerate(self.entries):
            try:
                images[i] = _decode_image(os.path.join(self.root, rel))
            except DataError as e:
                if not skip:
                    raise DataError(f"{e}, {_SKIP_HINT}") from e.__cause__
                ok[i] = False
                skipped += 1
                problems.append(str(e))
        if not ok.any():
            raise DataError(f"{self.root}: no readable images (skipped {skipped} bad files; first: "
                            f"{problems[0] if problems else 'none'}); check the folder layout")
        labels = np.fromiter((e[1] for e in self.entries), np.int64, n)
        usage = np.fromiter((e[2] for e in self.entries), np.int8, n)
        ids = np.array([e[0] for e in self.entries], dtype=object)
        return _Part(images[ok], labels[ok], usage[ok], ids[ok], skipped, problems[:_MAX_PROBLEMS])


def _split_dirs(root: Path) -> dict[str, Path]:
    """Split role (``train``/``val``/``test``) -> folder, matching folder names case-insensitively."""
    out: dict[str, Path] = {}
    try:
        children = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return out
    for e in children:
        role = _SPLIT_DIRS.get(e.name.lower())
        if role and e.is_dir():
            if role in out:
                raise DataError(f"{e.path}: duplicate {role} folder (also {out[role]}); merge them into one")
            out[role] = Path(e.path)
    return out


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _decode_image(path: str) -> np.ndarray:
    """Read one image file as 48x48 uint8 grayscale; any mode/size is converted."""
    try:
        with open(path, "rb") as f:
            blob = f.read()
        with Image.open(io.BytesIO(blob)) as im:
            im.load()
            out = im if im.mode == "L" else im.convert("L")
            if out.size != (IMG_SIZE, IMG_SIZE):
                out = out.resize((IMG_SIZE, IMG_SIZE), Image.Resampling.BILINEAR)
            return np.asarray(out, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"{path}: cannot decode image ({reason}); replace or delete the file") from e


# --------------------------------------------------------------------------------------------- CSV parsing

_utf8_errors: contextvars.ContextVar[list[int]] = contextvars.ContextVar("_utf8_errors")


def _record_utf8_error(exc: UnicodeError) -> tuple[str, int]:
    _utf8_errors.get().append(exc.start)  # type: ignore[attr-defined]
    return "\ufffd", exc.end  # type: ignore[attr-defined]


codecs.register_error("fer_ray.ingest.record", _record_utf8_error)


def _utf8_repair(raw: bytes) -> tuple[bytes, list[int]]:
    """Byte offsets of invalid UTF-8 sequences, and ``raw`` with each replaced by U+FFFD (lines unchanged)."""
    if raw.isascii():
        return raw, []
    found: list[int] = []
    token = _utf8_errors.set(found)
    try:
        text = raw.decode("utf-8", errors="fer_ray.ingest.record")
    finally:
        _utf8_errors.reset(token)
    return (text.encode("utf-8") if found else raw), found


def _byte_positions(buf: np.ndarray, value: int) -> np.ndarray:
    parts = [np.flatnonzero(buf[i:i + _SCAN_CHUNK] == value) + i for i in range(0, len(buf), _SCAN_CHUNK)]
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def _line_spans(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Start/end byte offsets of each physical line's content (terminators ``\\n``, ``\\r\\n``, lone ``\\r``)."""
    buf = np.frombuffer(raw, np.uint8)
    lf = _byte_positions(buf, 10)
    term_start, term_end = lf, lf + 1
    if b"\r" in raw:
        cr = _byte_positions(buf, 13)
        follows = np.zeros(len(cr), bool)
        inside = cr + 1 < len(buf)
        follows[inside] = buf[cr[inside] + 1] == 10
        crlf = np.zeros(len(lf), bool)
        crlf[lf > 0] = buf[lf[lf > 0] - 1] == 13
        lone = cr[~follows]
        term_start = np.concatenate([lf - crlf, lone])
        term_end = np.concatenate([lf + 1, lone + 1])
        order = np.argsort(term_start, kind="stable")
        term_start, term_end = term_start[order], term_end[order]
    starts = np.concatenate([[0], term_end]).astype(np.int64)
    ends = np.concatenate([term_start, [len(buf)]]).astype(np.int64)
    if starts[-1] == len(buf):  # the file ends with a terminator: no line after it
        starts, ends = starts[:-1], ends[:-1]
    return starts, ends


def _string_buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Zero-copy (bytes, offsets) of a pyarrow string array; offsets are int64, rebased to start at 0."""
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = arr.cast(pa.string())
    _, offsets, data = arr.buffers()
    odt = np.dtype(np.int64 if pa.types.is_large_string(arr.type) else np.int32)
    offs = np.frombuffer(offsets, odt, count=len(arr) + 1, offset=arr.offset * odt.itemsize).astype(np.int64)
    if data is None or offs[-1] == offs[0]:
        return np.empty(0, np.uint8), offs - offs[0]
    return np.frombuffer(data, np.uint8)[offs[0]:offs[-1]], offs - offs[0]


def _parse_pixel_block(chars: np.ndarray, offs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised parse and validation of R concatenated pixel strings.

    Args:
        chars: uint8 bytes of the R strings back to back.
        offs: int64 ``[R+1]`` offsets of each string in ``chars`` (``offs[0] == 0``, ``offs[-1] == len(chars)``).

    Returns:
        ``(codes, images)``: int8 ``[R]`` problem codes (``_OK``, ``_PIXEL_COUNT``, ``_PIXEL_RANGE`` or
        ``_PIXEL_NOT_INT``) and uint8 ``[K, 48, 48]`` images of the K rows whose code is ``_OK``, in order.
    """
    n_rows, n = len(offs) - 1, len(chars)
    codes = np.zeros(n_rows, np.int8)
    isdig = (chars - np.uint8(48)) < 10
    if not (isdig | (chars == 32)).all():
        junk = ~(isdig | (chars == 32) | (chars == 9))
        if junk.any():
            codes[np.searchsorted(offs, np.flatnonzero(junk), side="right") - 1] = _PIXEL_NOT_INT
    # Token = maximal run of digits; a row boundary always ends one token and starts another.
    step = np.diff(isdig.view(np.int8))  # +1: a token starts at i+1, -1: a token ends at i
    begin = np.empty(n, bool)
    end = np.empty(n, bool)
    if n:
        begin[0], end[-1] = isdig[0], isdig[-1]
        np.equal(step, 1, out=begin[1:])
        np.equal(step, -1, out=end[:-1])
    inner = offs[1:-1]
    inner = inner[(inner > 0) & (inner < n)]
    begin[inner] = isdig[inner]
    end[inner - 1] = isdig[inner - 1]
    starts = np.flatnonzero(begin)
    lens = np.flatnonzero(end) + 1 - starts
    counts = np.diff(np.searchsorted(starts, offs))
    # Digit values, padded so that starts + 2 never runs off the end.
    digit = np.empty(n + 2, np.int16)
    np.subtract(chars, 48, out=digit[:n], dtype=np.int16)
    digit[n:] = 0
    vals = digit[starts]
    vals = np.where(lens > 1, vals * 10 + digit[starts + 1], vals)
    vals = np.where(lens > 2, vals * 10 + digit[starts + 2], vals)
    long = np.flatnonzero(lens > 3)
    if len(long):  # leading zeros ("0255") or out-of-range numbers: exact value via Python ints, rare
        vals[long] = [min(int(chars[s:s + k].tobytes()), 999) for s, k in zip(starts[long].tolist(),
                                                                               lens[long].tolist())]
    too_big = vals > 255
    if too_big.any():
        rows = np.searchsorted(offs, starts[too_big], side="right") - 1
        codes[rows] = np.maximum(codes[rows], _PIXEL_RANGE)
    codes = np.maximum(codes, np.where(counts != N_PIXELS, _PIXEL_COUNT, _OK).astype(np.int8))
    ok = codes == _OK
    if not ok.all():
        vals = vals[np.repeat(ok, counts)]
    return codes, vals.astype(np.uint8).reshape(-1, IMG_SIZE, IMG_SIZE)


def _describe(code: int, label: str, pixels: str, usage: str) -> str:
    """One-line problem + fix for a row flagged with ``code`` (only called for reported rows)."""
    if code == _NON_UTF8:
        return "non-UTF-8 bytes; re-save the file as UTF-8"
    if code == _DUP_HEADER:
        return "duplicate header line mid-file (files concatenated?); delete this line"
    if code == _LABEL_BAD:
        s = label.strip()
        if re.fullmatch(r"[+-]?[0-9]+", s):
            return f"emotion {s} outside 0-6; use a class index ({_CLASS_HINT})"
        return f"emotion {s[:20]!r} is not an integer; use a class index 0-6"
    if code == _USAGE_BAD:
        return f"unknown Usage {usage.strip()[:30]!r}; use {'/'.join(USAGES)}"
    tokens = [t for t in re.split(r"[ \t]+", pixels) if t]
    if code in (_PIXEL_NOT_INT, _PIXEL_RANGE):
        for k, tok in enumerate(tokens, 1):
            if re.fullmatch(r"[0-9]{1,9}", tok) and int(tok) <= 255:
                continue
            if re.fullmatch(r"[+-]?[0-9]+", tok):
                return f"pixel {k} is {tok[:20]}, outside 0-255; pixels must be integers 0-255"
            return f"pixel {k} is {tok[:20]!r}, not an integer; pixels must be space-separated integers 0-255"
    if not tokens:
        return "no pixels (truncated line?); complete or delete the line"
    return f"{len(tokens)} pixels, expected {N_PIXELS} (48x48); fix or delete the line"


def _csv_header(raw: bytes, starts: np.ndarray, ends: np.ndarray, record_lines: np.ndarray) -> list[str]:
    line = int(record_lines[0])
    text = raw[starts[line - 1]:ends[line - 1]].decode("utf-8", errors="replace")
    return next(pycsv.reader([text]))


def _parse_csv(path: Path, *, on_bad_row: str, default_usage: int, id_prefix: str,
               allow_unlabeled: bool = False) -> _Part | None:
    """Read and validate one FER CSV file.

    Args:
        path: The CSV file.
        on_bad_row: ``"error"`` or ``"skip"``.
        default_usage: Usage code for every row when the file has no ``Usage`` column.
        id_prefix: Prepended to ``row:<line>`` ids.
        allow_unlabeled: Return ``None`` (instead of raising) when there is no ``emotion`` column.

    Returns:
        The rows, or ``None`` for an allowed unlabelled file.
    """
    skip = on_bad_row == "skip"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; check the path") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a CSV file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}); check permissions") from None
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    if not raw or raw.isspace():
        raise DataError(f"{path}: line 1: empty file; expected a header '{HEADER}' and one row per image")

    starts, ends = _line_spans(raw)
    fixed, bad_utf8 = _utf8_repair(raw)
    bad_utf8_lines = np.searchsorted(starts, np.asarray(bad_utf8, np.int64), side="right")
    if len(bad_utf8_lines) and not skip:
        pos, line = bad_utf8[0], int(bad_utf8_lines[0])
        raise DataError(f"{path}: line {line}: non-UTF-8 byte 0x{raw[pos]:02x} at column "
                        f"{pos - int(starts[line - 1]) + 1}; re-save the file as UTF-8, {_SKIP_HINT}")
    if len(bad_utf8):
        raw = fixed
        starts, ends = _line_spans(raw)
    record_lines = np.flatnonzero(ends > starts) + 1  # physical line numbers of non-empty lines

    names = _csv_header(raw, starts, ends, record_lines)
    norm = [n.strip().lower() for n in names]
    header_line = int(record_lines[0])
    shown = ",".join(names)[:60]
    if len(set(norm)) != len(norm):
        raise DataError(f"{path}: line {header_line}: duplicate column names in header {shown!r}; "
                        f"expected '{HEADER}'")
    if "pixels" not in norm or ("emotion" not in norm and not allow_unlabeled):
        if norm and re.fullmatch(r"[0-9]+", norm[0]):
            raise DataError(f"{path}: line {header_line}: missing header, the first line is data ({shown!r}...); "
                            f"add the header line '{HEADER}'")
        missing = [c for c in ("emotion", "pixels") if c not in norm]
        raise DataError(f"{path}: line {header_line}: header {shown!r} lacks column(s) {', '.join(missing)}; "
                        f"expected '{HEADER}'")
    if "emotion" not in norm:
        return None

    invalid: list[tuple[int | None, int, int]] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        invalid.append((row.number, row.expected_columns, row.actual_columns))
        return "skip"

    def read(threads: bool) -> pa.Table:
        invalid.clear()
        return pacsv.read_csv(
            pa.BufferReader(raw),
            read_options=pacsv.ReadOptions(use_threads=threads, block_size=_READ_BLOCK),
            parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid, newlines_in_values=False),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, check_utf8=False,
                                                 strings_can_be_null=False, quoted_strings_can_be_null=False))

    try:
        table = read(True)
        if invalid:  # row numbers are only reported by the single-threaded reader
            table = read(False)
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: unreadable CSV ({' '.join(str(e).split())[:160]}); "
                        f"expected '{HEADER}' rows") from None
    bad_numbers = np.array([r[0] for r in invalid], np.int64)
    bad_field_lines = record_lines[bad_numbers - 1] if len(bad_numbers) else np.empty(0, np.int64)
    row_lines = np.delete(record_lines[1:], bad_numbers - 2) if len(bad_numbers) else record_lines[1:]
    if len(row_lines) != table.num_rows:  # defensive: unusual line endings; fall back to record order
        log.warning("%s: could not map rows to line numbers; ids use record numbers", path)
        row_lines = np.arange(2, table.num_rows + 2)
    if table.num_rows == 0 and not invalid:
        raise DataError(f"{path}: line {header_line}: header only, no data rows; the file is empty or truncated")

    def column(name: str) -> pa.ChunkedArray:
        return table.column(norm.index(name))

    n = table.num_rows
    codes = np.zeros(n, np.int8)
    images = np.empty((n, IMG_SIZE, IMG_SIZE), np.uint8)
    pixels = column("pixels")
    for a in range(0, n, _CHUNK_ROWS):
        sub = pixels.slice(a, _CHUNK_ROWS)
        c, imgs = _parse_pixel_block(*_string_buffers(sub.chunk(0) if sub.num_chunks == 1 else sub.combine_chunks()))
        block = slice(a, a + len(sub))
        codes[block] = c
        if len(imgs) == len(sub):
            images[block] = imgs
        else:
            images[block][c == _OK] = imgs

    lab = pc.utf8_trim_whitespace(column("emotion").combine_chunks())
    is_int = pc.match_substring_regex(lab, r"^[0-9]{1,6}$")
    labels = pc.cast(pc.if_else(is_int, lab, pa.scalar("-1")), pa.int64()).to_numpy(zero_copy_only=False)
    codes = np.maximum(codes, np.where((labels < 0) | (labels >= len(CLASSES)), _LABEL_BAD, _OK).astype(np.int8))
    dup = pc.equal(pc.utf8_lower(lab), "emotion").to_numpy(zero_copy_only=False)
    codes[dup] = _DUP_HEADER
    if "usage" in norm:
        us = pc.utf8_lower(pc.utf8_trim_whitespace(column("usage").combine_chunks()))
        idx = pc.index_in(us, value_set=pa.array([u.lower() for u in USAGES]))
        usage = pc.fill_null(idx, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        codes = np.maximum(codes, np.where(usage < 0, _USAGE_BAD, _OK).astype(np.int8))
    else:
        usage = np.full(n, default_usage, np.int64)
    if len(bad_utf8_lines):
        codes[np.isin(row_lines, bad_utf8_lines)] = _NON_UTF8

    def row_problem(i: int) -> str:
        def field_of(name: str) -> str:
            return column(name)[i].as_py() if name in norm else ""
        return (f"{path}: line {int(row_lines[i])}: "
                f"{_describe(int(codes[i]), field_of('emotion'), field_of('pixels'), field_of('usage'))}")

    def field_problem(j: int) -> str:
        number, expected, actual = invalid[j]
        line = int(bad_field_lines[j])
        if line in set(bad_utf8_lines.tolist()):
            return f"{path}: line {line}: {_describe(_NON_UTF8, '', '', '')}"
        return (f"{path}: line {line}: expected {expected} comma-separated fields ({','.join(names)}), got "
                f"{actual}; the line is truncated or malformed, complete or delete it")

    bad_rows = np.flatnonzero(codes != _OK)
    # Problems in line order: (line, describer).
    ordered = sorted([(int(row_lines[i]), row_problem, int(i)) for i in bad_rows[:_MAX_PROBLEMS]]
                     + [(int(bad_field_lines[j]), field_problem, j) for j in range(min(len(invalid), _MAX_PROBLEMS))],
                     key=lambda t: t[0])
    if ordered and not skip:
        _, describe, i = ordered[0]
        raise DataError(f"{describe(i)}, {_SKIP_HINT}")
    skipped = len(bad_rows) + len(invalid)
    problems = [describe(i) for _, describe, i in ordered[:_MAX_PROBLEMS]]
    keep = codes == _OK
    if not keep.any():
        raise DataError(f"{path}: no valid rows (all {skipped} rows are bad; first: {problems[0]})")
    ids = np.array([f"{id_prefix}row:{line}" for line in row_lines[keep].tolist()], dtype=object)
    return _Part(images[keep], labels[keep], usage[keep].astype(np.int8), ids, skipped, problems)


# --------------------------------------------------------------------------------------------- cache


def _hash_file(h: hashlib._Hash, path: Path) -> None:
    """Feed ``path``'s bytes to ``h`` in 1 MiB chunks."""
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; check the path") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}); check permissions") from None


def _cache_write(path: Path, data: FERData, meta: dict) -> None:
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


def _cache_read(path: Path) -> tuple[FERData, dict] | None:
    """Load a cache file written by ``_cache_write``; ``None`` when absent, stale or unreadable."""
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
