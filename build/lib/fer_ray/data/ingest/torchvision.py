"""The ``torchvision`` format: torchvision's ``FER2013`` root (``fer2013/`` or its files directly).

This module owns choosing the files (``icml_face_data.csv``, which carries all three official splits, else
``train.csv`` as Training and ``test.csv`` as PublicTest, skipped with a warning when unlabelled) and their ids
(``<file relative to root>:row:<line>``). Each file is read by ``fer_ray.data.ingest.csv.parse_csv``.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import fer_ray.data.ingest.csv as ingest_csv
from fer_ray.data.dataset import DataError
from fer_ray.data.ingest.common import Part, concat_parts, hash_file

log = logging.getLogger(__name__)

TV_FILES = ("icml_face_data.csv", "train.csv", "test.csv")


class TorchvisionSource:
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
            raise DataError(f"{root}: no {', '.join(TV_FILES)} in {base}; download torchvision's FER2013 files "
                            "there or pass fmt='csv'/'folders'")
        self.root = root

    def fingerprint(self, h: hashlib._Hash) -> None:
        for f in self.files:
            h.update(f"{f.relative_to(self.root).as_posix()}\0".encode())
            hash_file(h, f)

    def load(self, on_bad_row: str) -> Part:
        parts = []
        for f in self.files:
            default = 1 if f.name == "test.csv" else 0
            part = ingest_csv.parse_csv(f, on_bad_row=on_bad_row, default_usage=default,
                                        id_prefix=f"{f.relative_to(self.root).as_posix()}:",
                                        allow_unlabeled=f.name == "test.csv")
            if part is None:
                log.warning("%s has no emotion column (unlabelled Kaggle test set); its rows were not loaded", f)
                continue
            parts.append(part)
        if not parts:
            raise DataError(f"{self.root}: no labelled rows in {', '.join(map(str, self.files))}; "
                            "add train.csv or icml_face_data.csv")
        return concat_parts(parts)
