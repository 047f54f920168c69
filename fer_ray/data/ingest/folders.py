"""The ``folders`` format: Kaggle image folders ``<root>/{train,test,val}/<class>/<image>``.

This module owns listing the tree (split and class folders matched case-insensitively, hidden and non-image
files ignored, misplaced images and unknown or empty class folders reported), the official usage of each image
(file-name prefix, else its split folder) and decoding any image file to 48x48 grayscale.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from fer_ray.data.dataset import CLASSES, IMG_SIZE, USAGES, DataError
from fer_ray.data.ingest.common import MAX_PROBLEMS, SKIP_HINT, Part

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm"})
_SPLIT_DIRS = {"train": "train", "test": "test", "val": "val", "validation": "val"}


class FolderSource:
    """Kaggle image folders ``<root>/{train,test,val}/<class>/<image>``; the tree is listed once at init."""

    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            if root.exists():
                raise DataError(f"{root}: not a directory; fmt='folders' expects a folder holding train/ and test/")
            raise DataError(f"{root}: not found; pass the folder holding train/ and test/")
        splits = split_dirs(root)
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
                if not entry.name.startswith("."):
                    self._add(split_dir, entry, dir_usage[role])
        self.entries.sort()  # rows are in relative-path order

    def _add(self, split_dir: Path, entry: os.DirEntry, default_usage: int) -> None:
        """List one child of a split folder: a class folder's images, or a problem."""
        rel_dir = f"{split_dir.name}/{entry.name}"
        if not entry.is_dir():
            if is_image_name(entry.name):
                self.problems.append((entry.path, f"image outside a class folder; move it into "
                                      f"{rel_dir.rsplit('/', 1)[0]}/<class>/ ({', '.join(CLASSES)})", 1))
            return
        files = [(f.name, f.stat()) for f in sorted(os.scandir(entry.path), key=lambda e: e.name)
                 if is_image_name(f.name) and f.is_file()]
        label = CLASSES.index(entry.name.lower()) if entry.name.lower() in CLASSES else -1
        if label < 0:
            self.problems.append((entry.path, f"unknown class folder {entry.name!r}; rename it to one of "
                                  f"{', '.join(CLASSES)} (case-insensitive) or remove it", len(files)))
            return
        if not files:
            self.problems.append((entry.path, "empty class folder (no image files); add its images or "
                                  "remove the folder", 0))
            return
        for name, st in files:
            usage = next((i for i, u in enumerate(USAGES) if name.startswith(f"{u}_")), default_usage)
            self.entries.append((f"{rel_dir}/{name}", label, usage, st.st_size, st.st_mtime_ns))

    def fingerprint(self, h: hashlib._Hash) -> None:
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
        labels = np.fromiter((e[1] for e in self.entries), np.int64, n)
        usage = np.fromiter((e[2] for e in self.entries), np.int8, n)
        ids = np.array([e[0] for e in self.entries], dtype=object)
        return Part(images[ok], labels[ok], usage[ok], ids[ok], skipped, problems[:MAX_PROBLEMS])


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
