"""Dataset ingestion: every supported on-disk FER-2013 layout in, one validated ``FERData`` out.

This package owns format detection, the three readers, row/file validation, ``on_bad_row`` skipping, the
content-keyed parquet cache and ``require_splits``. Nothing else in the project reads raw dataset files. This
module holds the public API; the work is split by job:

* ``common``: result types, problem codes and one-line messages, source hashing, ``require_splits``.
* ``csv``: the Kaggle CSV reader (pyarrow CSV + vectorised pixel parser), also used for torchvision's files.
* ``folders``: image-folder layouts. ``torchvision``: torchvision's ``fer2013/`` files. ``cache``: the cache.

Formats (``fmt``):

* ``csv``: Kaggle ``fer2013.csv``; header ``emotion,pixels,Usage`` (any column order, names matched
  case-insensitively after trimming spaces; ``Usage`` may be absent, then every row is ``Training``).
  ids are ``row:<line>``, the 1-based physical line number (the header is line 1).
* ``folders``: Kaggle image folders ``<root>/train/<class>/*``, ``<root>/test/<class>/*`` and optionally
  ``<root>/val/<class>/*``, or a flat ``<root>/<class>/*`` layout (CK+, JAFFE, RAF-DB, a user's photos: every
  image ``PublicTest`` unless its name has a usage prefix). Split and class folder names are matched
  case-insensitively; class names come from ``CLASSES``, or from ``class_map`` (``anger=angry,sadness=sad,
  contempt=drop``; presets ``rafdb`` for RAF-DB's numbered ``1..7`` folders and ``fer`` for ``0..6``), which may
  also drop folders. Any image size or mode is converted to 48x48 ``L`` (``convert("L")`` then a bilinear
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
  directory whose ``fer2013/`` holds ``train/``/``test/`` folders is ``folders`` rooted there; else a directory
  whose sub-folders hold images is the flat ``folders`` layout.

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

import logging
import time
from pathlib import Path

from fer_ray.data.dataset import DataError, FERData
from fer_ray.data.ingest.cache import FORMAT_VERSION, cache_path, read_cache, write_cache
from fer_ray.data.ingest.common import BAD_ROW_MODES, N_PIXELS, RUN_SPLITS, IngestReport, Source, require_splits
from fer_ray.data.ingest.csv import HEADER, CsvSource
from fer_ray.data.ingest.folders import CLASS_MAP_PRESETS, IMAGE_SUFFIXES, FolderSource, flat_class_dirs, split_dirs
from fer_ray.data.ingest.folders import parse_class_map as parse_class_map
from fer_ray.data.ingest.torchvision import TV_FILES, TorchvisionSource
from fer_ray.names import FORMATS

__all__ = ["BAD_ROW_MODES", "CLASS_MAP_PRESETS", "FORMAT_VERSION", "HEADER", "IMAGE_SUFFIXES", "N_PIXELS",
           "RUN_SPLITS", "DataError", "IngestReport", "detect_format", "labelled_files", "load_dataset",
           "load_dataset_with_report", "parse_class_map", "require_splits"]

log = logging.getLogger(__name__)

_SOURCES: dict[str, type[Source]] = {"csv": CsvSource, "folders": FolderSource, "torchvision": TorchvisionSource}
"""The reader of each format in ``fer_ray.names.FORMATS``."""


def load_dataset(path: str | Path, fmt: str = "auto", cache_dir: str | Path | None = None,
                 on_bad_row: str = "error", class_map: str | dict | None = None) -> FERData:
    """Load FER-2013 from ``path`` into validated arrays.

    Args:
        path: A Kaggle ``fer2013.csv``, an image-folder root, or a torchvision ``FER2013`` root.
        fmt: ``"auto"``, ``"csv"``, ``"folders"`` or ``"torchvision"`` (see the module docstring).
        cache_dir: Directory for the parquet cache; ``None`` disables caching.
        on_bad_row: ``"error"`` raises on the first bad row/image; ``"skip"`` drops bad ones and logs a warning.
        class_map: Image folders only: class-folder renames and drops (``parse_class_map``).

    Returns:
        The dataset; ``load_dataset_with_report`` also returns the skipped count and cache details.

    Raises:
        DataError: Missing or malformed input; the message names the file, line or image and the fix.
    """
    return load_dataset_with_report(path, fmt, cache_dir, on_bad_row, class_map)[0]


def load_dataset_with_report(path: str | Path, fmt: str = "auto", cache_dir: str | Path | None = None,
                             on_bad_row: str = "error", class_map: str | dict | None = None
                             ) -> tuple[FERData, IngestReport]:
    """Like ``load_dataset`` but also returns an ``IngestReport`` (skipped rows, cache hit, timing).

    Args:
        path: A Kaggle ``fer2013.csv``, an image-folder root, or a torchvision ``FER2013`` root.
        fmt: ``"auto"``, ``"csv"``, ``"folders"`` or ``"torchvision"``.
        cache_dir: Directory for the parquet cache; ``None`` disables caching.
        on_bad_row: ``"error"`` or ``"skip"``.
        class_map: Image folders only: class-folder renames and drops (``parse_class_map``).

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
    source = _source(fmt, root, class_map)
    report = IngestReport(source=root, fmt=fmt)
    if cache_dir is not None:
        report.cache_path = cache_path(cache_dir, fmt, on_bad_row, source)
        cached = read_cache(report.cache_path)
        if cached is not None:
            data, meta = cached
            report.cache_hit = True
            report.skipped = int(meta.get("skipped", 0))
            report.problems = list(meta.get("problems", []))
            return data, _finish(report, data, t0)
    part = source.load(on_bad_row)
    data = FERData(part.images, part.labels, part.usage, part.ids)
    report.skipped, report.problems = part.skipped, part.problems
    if report.cache_path is not None:
        write_cache(report.cache_path, data, {"source": str(root), "fmt": fmt, "skipped": part.skipped,
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
    if split_dirs(p):
        return "folders", p
    for base in (p, p / "fer2013"):
        if any((base / name).is_file() for name in TV_FILES):
            return "torchvision", p
    if (p / "fer2013").is_dir() and split_dirs(p / "fer2013"):
        return "folders", p / "fer2013"
    if flat_class_dirs(p):
        return "folders", p
    raise DataError(f"{p}: cannot detect the dataset format: no train/ or test/ image folders, no class folders "
                    f"holding images and no {', '.join(TV_FILES)} (also looked in {p / 'fer2013'}); pass fmt= or a "
                    "fer2013.csv path")


def _source(fmt: str, root: Path, class_map: str | dict | None) -> Source:
    """The reader of ``fmt`` at ``root``; a class map is for image folders only."""
    if fmt == "folders":
        return FolderSource(root, class_map)
    if class_map:
        raise DataError(f"{root}: a class map applies to image-folder layouts only, not to fmt={fmt!r}")
    return _SOURCES[fmt](root)


def labelled_files(path: str | Path, class_map: str | dict | None = None) -> list[tuple[str, int]]:
    """``(image path, class index)`` of every image of an image-folder dataset (Kaggle or flat ``<class>/``
    layout, ``class_map`` applied), in id order, without decoding them (``fer-ray predict --labels``).

    Raises:
        DataError: ``path`` is not an image-folder dataset, or has an unknown class folder (one line).
    """
    fmt, root = detect_format(path)
    if fmt != "folders":
        raise DataError(f"{path}: labels are read from image-folder layouts (<class>/ or train/<class>/); this is "
                        f"{fmt!r}")
    return FolderSource(root, class_map).labelled_files()


def _finish(report: IngestReport, data: FERData, t0: float) -> IngestReport:
    """Fill in the row count and wall time, then log the skipped-rows warning and the one-line summary."""
    report.n_rows = len(data)
    report.seconds = time.perf_counter() - t0
    if report.problems:
        log.warning("skipped %d bad rows of %s (first: %s)", report.skipped, report.source, report.problems[0])
    log.info("loaded %d rows from %s (%s%s) in %.2fs", report.n_rows, report.source, report.fmt,
             ", cache hit" if report.cache_hit else "", report.seconds)
    return report
