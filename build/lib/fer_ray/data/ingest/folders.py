"""The ``folders`` format: Kaggle image folders ``<root>/{train,test,val}/<class>/<image>``, or a flat
``<root>/<class>/<image>`` layout (CK+, JAFFE, RAF-DB, a user's own photos).

This module owns listing the tree (split and class folders matched case-insensitively, hidden and non-image
files ignored, misplaced images and unknown or empty class folders reported), the class map that renames or drops
class folders (``parse_class_map``: ``anger=angry,sadness=sad,contempt=drop``, presets such as ``rafdb`` for
numbered folders), the official usage of each image (file-name prefix, else its split folder; ``PublicTest`` in a
flat layout, which has no split) and decoding any image file to 48x48 grayscale.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from fer_ray.data.dataset import CLASSES, IMG_SIZE, USAGES, DataError
from fer_ray.data.ingest.common import MAX_PROBLEMS, SKIP_HINT, Part

log = logging.getLogger("fer_ray.data.ingest")

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm"})
_SPLIT_DIRS = {"train": "train", "test": "test", "val": "val", "validation": "val"}
DROP = "drop"
"""The class-map target that leaves a folder's images out (``contempt=drop``)."""
CLASS_MAP_PRESETS = {
    "rafdb": "1=surprise,2=fear,3=disgust,4=happy,5=sad,6=angry,7=neutral",
    "fer": ",".join(f"{i}={c}" for i, c in enumerate(CLASSES)),
}
"""Named class maps: RAF-DB's numbered basic-emotion folders ``1..7``, and FER-2013's own indices ``0..6``."""
FLAT_USAGE = USAGES.index("PublicTest")
"""The usage of an image in a flat ``<class>/`` layout without a ``Training_``-style file-name prefix."""


def parse_class_map(text: str | dict | None) -> dict[str, int | None]:
    """Folder name (lower case) → class index, or ``None`` for folders to leave out.

    Args:
        text: ``"anger=angry,sadness=sad,contempt=drop"`` (targets are class names, indices 0-6 or ``drop``), a
            preset name (``rafdb``, ``fer``; presets and pairs may be mixed: ``rafdb,8=drop``), a dict of the same
            (targets may also be ints, or ``None`` for drop: this function's own output), or ``None``.

    Raises:
        DataError: A malformed pair or an unknown target class, in one line.
    """
    if not text:
        return {}
    pairs = list(text.items()) if isinstance(text, dict) else []
    for part in ([] if isinstance(text, dict) else [p.strip() for p in str(text).split(",") if p.strip()]):
        if part.lower() in CLASS_MAP_PRESETS:
            pairs += [tuple(p.split("=")) for p in CLASS_MAP_PRESETS[part.lower()].split(",")]
        elif part.count("=") == 1 and all(x.strip() for x in part.split("=")):
            pairs.append(tuple(x.strip() for x in part.split("=")))
        else:
            raise DataError(f"--class-map: {part!r} is not FOLDER=CLASS; write e.g. anger=angry,contempt=drop or "
                            f"a preset ({', '.join(CLASS_MAP_PRESETS)})")
    return {str(folder).strip().lower(): _class_target(folder, target) for folder, target in pairs}


def _class_target(folder: object, target: object) -> int | None:
    """A class map target as a class index (``None``: drop the folder)."""
    t = DROP if target is None else str(target).strip().lower()
    if t == DROP:
        return None
    if t in CLASSES or (t.isdigit() and int(t) < len(CLASSES)):
        return CLASSES.index(t) if t in CLASSES else int(t)
    raise DataError(f"--class-map: {folder}={target}: {target!r} is not a class; use one of {', '.join(CLASSES)}, "
                    f"an index 0-{len(CLASSES) - 1} or {DROP}")


def class_of(folder: str, class_map: dict[str, int | None]) -> int | None:
    """The class index of a class folder (the map first, then ``CLASSES`` by name, any case); ``None`` for a
    folder the map drops; -1 for an unknown folder."""
    name = folder.lower()
    if name in class_map:
        return class_map[name]
    return CLASSES.index(name) if name in CLASSES else -1


def unknown_class_hint(folder: str) -> str:
    """The fix for an unknown class folder, naming the ``--class-map`` that would take it."""
    if folder.isdigit():
        return (f"numbered class folders need a map: --class-map rafdb (RAF-DB's 1..7), --class-map fer (FER's 0..6) "
                f"or --class-map {folder}=<class>,...")
    return (f"rename it to one of {', '.join(CLASSES)} (case-insensitive), remove it, or map it with "
            f"--class-map {folder}=<class>|{DROP}")


class FolderSource:
    """Kaggle image folders ``<root>/{train,test,val}/<class>/<image>``, or a flat ``<root>/<class>/<image>``
    layout (when ``root`` has no split folders); the tree is listed once at init. ``class_map``
    (``parse_class_map``'s text or result) renames or drops class folders in either layout."""

    def __init__(self, root: Path, class_map: str | dict | None = None) -> None:
        if not root.is_dir():
            if root.exists():
                raise DataError(f"{root}: not a directory; fmt='folders' expects a folder holding train/ and test/ "
                                "(or one folder per class)")
            raise DataError(f"{root}: not found; pass the folder holding train/ and test/ (or one folder per class)")
        self.class_map = parse_class_map(class_map)
        splits = split_dirs(root)
        self.flat = not splits
        if self.flat and not flat_class_dirs(root):
            raise DataError(f"{root}: no train/, test/ or val/ folders and no class folders holding images; "
                            "fmt='folders' expects <root>/train/<class>/*.jpg or <root>/<class>/*.jpg (or pass "
                            "fmt='csv'/'torchvision')")
        dir_usage = {"train": 0, "val": 1, "test": 2 if "val" in splits else 1}
        self.root = root
        # (relative posix path, label, usage, size, mtime_ns) per image
        self.entries: list[tuple[str, int, int, int, int]] = []
        self.problems: list[tuple[str, str, int]] = []  # (path, problem, files dropped if skipped)
        self.dropped: dict[str, int] = {}  # class folder the map drops → its image count
        for role, split_dir in sorted(splits.items()) if splits else [("flat", root)]:
            for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
                if not entry.name.startswith("."):
                    self._add(split_dir, entry, FLAT_USAGE if self.flat else dir_usage[role])
        self.entries.sort()  # rows are in relative-path order

    def _add(self, split_dir: Path, entry: os.DirEntry, default_usage: int) -> None:
        """List one child of a split folder (of the root, in a flat layout): a class folder's images, or a problem."""
        rel_dir = entry.name if self.flat else f"{split_dir.name}/{entry.name}"
        if not entry.is_dir():
            if is_image_name(entry.name):
                where = f"{split_dir.name}/<class>/" if not self.flat else "<class>/"
                self.problems.append((entry.path, f"image outside a class folder; move it into "
                                      f"{where} ({', '.join(CLASSES)})", 1))
            return
        files = [(f.name, f.stat()) for f in sorted(os.scandir(entry.path), key=lambda e: e.name)
                 if is_image_name(f.name) and f.is_file()]
        label = class_of(entry.name, self.class_map)
        if label is None:
            self.dropped[rel_dir] = len(files)
            return
        if label < 0:
            self.problems.append((entry.path, f"unknown class folder {entry.name!r}; "
                                  f"{unknown_class_hint(entry.name)}", len(files)))
            return
        if not files:
            self.problems.append((entry.path, "empty class folder (no image files); add its images or "
                                  "remove the folder", 0))
            return
        for name, st in files:
            usage = next((i for i, u in enumerate(USAGES) if name.startswith(f"{u}_")), default_usage)
            self.entries.append((f"{rel_dir}/{name}", label, usage, st.st_size, st.st_mtime_ns))

    def fingerprint(self, h: hashlib._Hash) -> None:
        h.update(f"flat={self.flat}\0{sorted(self.class_map.items())}\n".encode())
        listing = sorted((rel, size, mtime) for rel, _, _, size, mtime in self.entries)
        h.update("".join(f"{rel}\0{size}\0{mtime}\n" for rel, size, mtime in listing).encode())
        # Structural problems change the result in skip mode; include them so fixing them invalidates the cache.
        h.update("".join(f"{p}\0{n}\n" for p, _, n in self.problems).encode())

    def load(self, on_bad_row: str) -> Part:
        skip = on_bad_row == "skip"
        problems = [f"{p}: {msg}" for p, msg, _ in self.problems]
        if problems and not skip:
            raise DataError(f"{problems[0]}, {SKIP_HINT}")
        skipped = sum(n for _, _, n in self.problems)
        n = len(self.entries)
        images = np.empty((n, IMG_SIZE, IMG_SIZE), np.uint8)
        ok = np.ones(n, bool)
        for i, (rel, _, _, _, _) in enumerate(self.entries):
            try:
                images[i] = decode_image(os.path.join(self.root, rel))
            except DataError as e:
                if not skip:
                    raise DataError(f"{e}, {SKIP_HINT}") from e.__cause__
                ok[i] = False
                skipped += 1
                problems.append(str(e))
        if not ok.any():
            raise DataError(f"{self.root}: no readable images (skipped {skipped} bad files; first: "
                            f"{problems[0] if problems else 'none'}); check the folder layout")
        for folder, count in self.dropped.items():
            log.info("class map: left out %s/ (%d images)", folder, count)
        labels = np.fromiter((e[1] for e in self.entries), np.int64, n)
        usage = np.fromiter((e[2] for e in self.entries), np.int8, n)
        ids = np.array([e[0] for e in self.entries], dtype=object)
        return Part(images[ok], labels[ok], usage[ok], ids[ok], skipped, problems[:MAX_PROBLEMS])

    def labelled_files(self) -> list[tuple[str, int]]:
        """``(absolute path, class index)`` of every listed image, in id order (what ``fer-ray predict --labels``
        scores at full resolution); a structural problem (unknown class folder, ...) raises ``DataError``."""
        if self.problems:
            path, msg, _ = self.problems[0]
            raise DataError(f"{path}: {msg}")
        return [(os.path.join(self.root, rel), label) for rel, label, _, _, _ in self.entries]


def split_dirs(root: Path) -> dict[str, Path]:
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


def flat_class_dirs(root: Path) -> list[Path]:
    """The visible sub-folders of ``root`` that hold image files directly (the class folders of a flat layout)."""
    try:
        children = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return []
    out = []
    for e in children:
        if e.is_dir() and not e.name.startswith("."):
            with os.scandir(e.path) as files:
                if any(is_image_name(f.name) and f.is_file() for f in files):
                    out.append(Path(e.path))
    return out


def is_image_name(name: str) -> bool:
    """Whether ``name`` is a visible file with an image suffix (``IMAGE_SUFFIXES``, any case)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def decode_image(path: str) -> np.ndarray:
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
