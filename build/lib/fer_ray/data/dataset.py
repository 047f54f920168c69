"""The in-memory form every loader produces (``FERData``) and the split roles carved from it.

A dataset is four aligned arrays: uint8 images ``[N, 48, 48]``, int64 labels, int8 usage codes (the
official Kaggle split of each image) and string ids naming where each image came from. Splits used by a run
(``train``/``val``/``public_test``/``private_test``) are index arrays derived here, seeded and stratified.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fer_ray.names import CLASSES, SPLITS, USAGES  # noqa: F401  (re-exported: the data layer's vocabulary)

IMG_SIZE = 48


class DataError(ValueError):
    """Bad input data. The message is one line naming the file, line or field, and the problem."""


@dataclass
class FERData:
    """Aligned arrays of one FER dataset.

    Attributes:
        images: uint8 ``[N, 48, 48]`` grayscale faces.
        labels: int64 ``[N]`` class indices into ``CLASSES``.
        usage: int8 ``[N]`` official split codes into ``USAGES``.
        ids: ``[N]`` object array of str ids (``row:<line>`` for CSV rows, relative paths for image files).
    """

    images: np.ndarray
    labels: np.ndarray
    usage: np.ndarray
    ids: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.dtype != np.uint8 or self.images.shape[1:] != (IMG_SIZE, IMG_SIZE):
            raise DataError(f"images must be uint8 [N,48,48], got {self.images.dtype} {self.images.shape}")
        for name in ("labels", "usage", "ids"):
            if len(getattr(self, name)) != n:
                raise DataError(f"{name} has {len(getattr(self, name))} entries for {n} images")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: np.ndarray) -> FERData:
        return FERData(self.images[idx], self.labels[idx], self.usage[idx], self.ids[idx])

    def class_counts(self, usage: str | None = None) -> np.ndarray:
        labels = self.labels if usage is None else self.labels[self.usage == USAGES.index(usage)]
        return np.bincount(labels, minlength=len(CLASSES))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays, for ``ray.put`` (numpy is zero-copy in Ray's object store)."""
        return {"images": self.images, "labels": self.labels, "usage": self.usage, "ids": self.ids.astype(str)}



def fingerprint(data: FERData, splits: dict[str, np.ndarray]) -> dict[str, str]:
    """``{"data": ..., "splits": ...}``: sha256 (16 hex digits) of the dataset's content (pixels, labels, usage)
    and of the run's split indices. Recorded when a sweep starts; every later stage that re-reads the data checks
    it, so a moved, edited or differently split source cannot be scored as if it were the one trained on."""
    import hashlib

    h = hashlib.sha256()
    for a in (data.images, data.labels.astype(np.int64), data.usage.astype(np.int8)):
        h.update(np.ascontiguousarray(a).tobytes())
    s = hashlib.sha256()
    for name in sorted(splits):
        s.update(name.encode() + b":" + np.asarray(splits[name], dtype=np.int64).tobytes())
    return {"data": h.hexdigest()[:16], "splits": s.hexdigest()[:16]}


def split_indices(data: FERData, val_fraction: float = 0.1, seed: int = 0,
                  groups: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Index arrays per run split: ``val`` is a seeded stratified sample of Training, ``train`` the rest.

    PublicTest and PrivateTest rows become ``public_test`` / ``private_test``; empty splits are omitted.
    With ``groups`` (``[N]`` group id per image, e.g. ``quality.exact_groups``) whole groups are sampled:
    each group's first Training image is drawn as above and its other Training images follow it, so no group
    straddles train/val (``val`` may then be slightly larger). Without ``groups`` the result is unchanged.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    training = np.flatnonzero(data.usage == 0)
    candidates = training
    if groups is not None:
        groups = np.asarray(groups)
        candidates = training[np.unique(groups[training], return_index=True)[1]]
        candidates.sort()
    val_parts = []
    for c in range(len(CLASSES)):
        members = candidates[data.labels[candidates] == c]
        k = int(round(len(members) * val_fraction))
        if val_fraction > 0 and len(members) >= 2:
            k = min(max(k, 1), len(members) - 1)
        val_parts.append(rng.choice(members, size=k, replace=False) if k else members[:0])
    val = np.sort(np.concatenate(val_parts)) if val_parts else training[:0]
    if groups is not None:
        val = training[np.isin(groups[training], groups[val])]
    out = {"train": np.setdiff1d(training, val, assume_unique=True), "val": val,
           "public_test": np.flatnonzero(data.usage == 1), "private_test": np.flatnonzero(data.usage == 2)}
    return {k: v for k, v in out.items() if len(v)}
