"""Data quality: exact and near duplicates, split leakage, label conflicts and blank images, and deduplication.

This module owns the duplicate audit of a ``FERData``:

* exact duplicates share a ``pixel_hashes`` key (blake2b-64 of the 2304 pixel bytes);
* near duplicates are pairs whose 64-bit DCT perceptual hashes (``perceptual_hashes``) differ in at most
  ``threshold`` bits, also comparing hashes of copies moved by up to ``max_shift`` pixels (a 1-px shift
  alone moves a pHash by ~6 bits); ``near_pairs`` finds them without comparing every pair (multi-index hashing);
* blank images have a per-image pixel std below ``blank_std`` and are left out of the near-duplicate search
  (their hashes are noise);
* leakage: a Training image that exactly or nearly duplicates a PublicTest/PrivateTest image.

``check`` lists every group as one row per member image and ``summarize`` counts them; ``dedup`` drops images
for a ``DataConfig.dedup`` mode. Near-duplicate groups are connected components of the near pairs, so a group
can chain images further apart than ``threshold``; the per-image ``leak`` flag (and ``dedup``) only uses
direct pairs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fer_ray.data.dataset import CLASSES, USAGES, FERData
from fer_ray.names import DEDUP_MODES  # noqa: F401  (re-exported)

DEFAULT_THRESHOLD = 4
DEFAULT_BLANK_STD = 2.0
DEFAULT_MAX_SHIFT = 1
_HASH_SIDE = 32  # images are resized to 32x32 before the DCT
_LOW = 8  # the 8x8 lowest DCT frequencies make the hash
_CHUNK = 4096  # images per vectorised batch (bounds float32 temporaries to ~40 MB)
GROUP_COLUMNS = ["group_id", "kind", "index", "id", "split", "label", "emotion", "cross_split", "leakage",
                 "label_conflict", "leak"]


def pixel_hashes(images: np.ndarray) -> np.ndarray:
    """Exact-duplicate key of each image: the first 8 bytes of blake2b over its raw pixels.

    Args:
        images: uint8 ``[N, H, W]``.

    Returns:
        uint64 ``[N]``; equal images have equal keys (a collision between different images has probability
        about ``N**2 / 2**65``).
    """
    flat = np.ascontiguousarray(images).reshape(len(images), -1)
    digests = b"".join(hashlib.blake2b(row.tobytes(), digest_size=8).digest() for row in flat)
    return np.frombuffer(digests, dtype=np.uint64).copy() if len(flat) else np.zeros(0, np.uint64)


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` area-averaging resampling matrix (each output cell averages the input it covers)."""
    edges = np.linspace(0.0, n_in, n_out + 1)
    lo, hi = edges[:-1, None], edges[1:, None]
    j = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None)
    return (overlap / overlap.sum(1, keepdims=True)).astype(np.float32)


def perceptual_hashes(images: np.ndarray) -> np.ndarray:
    """DCT perceptual hash (pHash) of each image, vectorised over the batch.

    Each image is area-resized to 32x32, transformed with an orthonormal 2-D DCT-II (``scipy.fft.dctn`` over
    the whole batch), and its 8x8 lowest frequencies minus the DC term (63 coefficients) are compared with
    their median: bit ``k`` (k = 0..62, row-major order after DC) is set when coefficient ``k`` is above it.
    Bit 63 is always 0. The hash ignores brightness and contrast and changes little under small shifts,
    resampling and JPEG recompression.

    Args:
        images: uint8 ``[N, H, W]`` (any size; 48x48 for FER).

    Returns:
        uint64 ``[N]``.
    """
    from scipy.fft import dctn

    n, h, w = images.shape
    rows, cols = _area_matrix(h, _HASH_SIDE), _area_matrix(w, _HASH_SIDE)
    weights = (np.uint64(1) << np.arange(_LOW * _LOW - 1, dtype=np.uint64))
    out = np.zeros(n, dtype=np.uint64)
    for start in range(0, n, _CHUNK):
        x = images[start:start + _CHUNK].astype(np.float32)
        small = np.einsum("ih,nhw,jw->nij", rows, x, cols, optimize=True)
        low = dctn(small, type=2, axes=(1, 2), norm="ortho")[:, :_LOW, :_LOW].reshape(len(x), -1)[:, 1:]
        bits = low > np.median(low, axis=1, keepdims=True)
        out[start:start + len(x)] = (bits.astype(np.uint64) * weights).sum(1, dtype=np.uint64)
    return out


def _band_pairs(key: np.ndarray, hashes: np.ndarray, threshold: int) -> np.ndarray:
    """Pairs ``[i, j]`` with equal ``key`` whose ``hashes`` differ in <= ``threshold`` bits.

    Sorts by key, then compares each element with the one ``k`` places later for k = 1, 2, ... while any
    run of equal keys is still longer than ``k``: work is proportional to the candidate pairs, in numpy.
    """
    order = np.argsort(key, kind="stable")
    sk = key[order]
    active = np.arange(len(sk))
    found = []
    k = 1
    while len(active):
        active = active[active + k < len(sk)]
        active = active[sk[active] == sk[active + k]]
        a, b = order[active], order[active + k]
        keep = np.bitwise_count(hashes[a] ^ hashes[b]) <= threshold
        found.append(np.stack([a[keep], b[keep]], axis=1))
        k += 1
    return np.concatenate(found) if found else np.zeros((0, 2), np.int64)


def shifted(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``images`` moved by ``(dy, dx)`` pixels (down, right), edges replicated into the uncovered border."""
    r = max(abs(dy), abs(dx))
    if r == 0:
        return images
    _, h, w = images.shape
    padded = np.pad(images, ((0, 0), (r, r), (r, r)), mode="edge")
    return padded[:, r - dy:r - dy + h, r - dx:r - dx + w]


def shift_hashes(images: np.ndarray, max_shift: int = 1) -> np.ndarray:
    """uint64 ``[V, N]`` perceptual hashes of ``images`` moved by each integer shift with ``|dy|+|dx| <= max_shift``
    other than ``(0, 0)``; ``[0, N]`` when ``max_shift`` is 0."""
    offsets = [(dy, dx) for dy in range(-max_shift, max_shift + 1) for dx in range(-max_shift, max_shift + 1)
               if 0 < abs(dy) + abs(dx) <= max_shift]
    return np.stack([perceptual_hashes(shifted(images, dy, dx)) for dy, dx in offsets] or
                    [np.zeros((0, len(images)), np.uint64)]).reshape(len(offsets), len(images))


def near_pairs(hashes: np.ndarray, threshold: int = DEFAULT_THRESHOLD,
               variants: np.ndarray | None = None) -> np.ndarray:
    """All pairs of 64-bit hashes within ``threshold`` Hamming distance (multi-index hashing).

    The 64 bits are cut into ``threshold + 1`` disjoint bands; by pigeonhole two hashes within ``threshold``
    bits agree exactly on at least one band, so candidates are pairs sharing a band value, then verified with
    a popcount. Runs in about a second on 32k FER images.

    Args:
        hashes: uint64 ``[N]``.
        threshold: Largest Hamming distance counted as near (0..63).
        variants: Optional uint64 ``[V, N]`` extra hashes of each image (``shift_hashes``); images ``i`` and
            ``j`` are then near when any hash of ``i`` is within ``threshold`` of the plain hash of ``j``.

    Returns:
        int64 ``[P, 2]`` index pairs ``i < j``, sorted, each once.
    """
    if not 0 <= threshold < 64:
        raise ValueError(f"threshold must be in [0, 63], got {threshold}")
    n = len(hashes)
    extra = np.zeros((0, n), np.uint64) if variants is None else np.asarray(variants, np.uint64).reshape(-1, n)
    allh = np.concatenate([np.asarray(hashes, dtype=np.uint64), extra.ravel()])
    edges = np.linspace(0, 64, threshold + 2).round().astype(int)
    parts = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        mask = np.uint64((1 << int(hi - lo)) - 1)
        parts.append(_band_pairs((allh >> np.uint64(lo)) & mask, allh, threshold))
    pairs = np.concatenate(parts)
    pairs = pairs[(pairs < n).any(axis=1)] % n  # at least one plain hash; back to image indices
    pairs = np.sort(pairs[pairs[:, 0] != pairs[:, 1]], axis=1)
    return np.unique(pairs, axis=0) if len(pairs) else np.zeros((0, 2), np.int64)


def image_std(images: np.ndarray) -> np.ndarray:
    """float32 ``[N]`` standard deviation of each image's pixels."""
    flat = images.reshape(len(images), -1)
    return np.concatenate([flat[s:s + _CHUNK].std(axis=1, dtype=np.float32) for s in range(0, len(flat), _CHUNK)]
                          or [np.zeros(0, np.float32)])


@dataclass
class _Audit:
    """Everything ``check`` and ``dedup`` derive from one pass over the images."""

    exact: np.ndarray  # [N] exact-duplicate group id (np.unique inverse of the pixel hashes)
    exact_sizes: np.ndarray  # [G] members per exact group
    pairs: np.ndarray  # [P, 2] near pairs among non-blank images (exact copies included, distance 0)
    blank: np.ndarray  # [N] bool
    leak: np.ndarray  # [N] bool: Training image directly duplicating an eval image


def _audit(data: FERData, threshold: int, blank_std: float, max_shift: int) -> _Audit:
    _, exact, sizes = np.unique(pixel_hashes(data.images), return_inverse=True, return_counts=True)
    blank = image_std(data.images) < blank_std
    keep = np.flatnonzero(~blank)
    images = data.images[keep]
    pairs = keep[near_pairs(perceptual_hashes(images), threshold, shift_hashes(images, max_shift))]
    train = data.usage == 0
    # Exact copies: every Training member of a group that holds an eval image leaks.
    eval_groups = np.zeros(len(sizes), bool)
    eval_groups[exact[~train]] = True
    leak = train & eval_groups[exact]
    a, b = pairs[:, 0], pairs[:, 1]
    cross = train[a] != train[b]
    leak[a[cross & train[a]]] = True
    leak[b[cross & train[b]]] = True
    return _Audit(exact, sizes, pairs, blank, leak)


def _components(n: int, pairs: np.ndarray) -> np.ndarray:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def check(data: FERData, threshold: int = DEFAULT_THRESHOLD, blank_std: float = DEFAULT_BLANK_STD,
          max_shift: int = DEFAULT_MAX_SHIFT) -> pd.DataFrame:
    """Find exact-duplicate, near-duplicate and blank images.

    Args:
        data: The dataset.
        threshold: Largest pHash Hamming distance counted as a near duplicate.
        blank_std: Images whose pixel std is below this are ``blank``.
        max_shift: Near matching tolerates translations up to this many pixels (``shift_hashes``).

    Returns:
        One row per (group, member image), columns ``GROUP_COLUMNS``: ``group_id`` (unique over all kinds),
        ``kind`` (``exact``: identical pixels; ``near``: a connected component of near pairs holding at least
        two different images; ``blank``: one group per blank image), ``index`` (row in ``data``), ``id``,
        ``split`` (usage name), ``label``, ``emotion``; per group ``cross_split`` (members in more than one
        usage), ``leakage`` (Training and an eval usage) and ``label_conflict`` (more than one label); per
        image ``leak`` (a Training image that directly duplicates a PublicTest/PrivateTest image). ``attrs``
        hold ``n_images``, ``threshold`` and ``blank_std``.
    """
    audit = _audit(data, threshold, blank_std, max_shift)
    n = len(data)
    exact_members = np.flatnonzero(audit.exact_sizes[audit.exact] > 1)
    comp = _components(n, audit.pairs)
    in_pair = np.zeros(n, bool)
    in_pair[audit.pairs.ravel()] = True
    members = np.flatnonzero(in_pair)
    # A near group must hold two different images; components made of one exact group are reported as exact.
    distinct = pd.Series(audit.exact[members]).groupby(comp[members]).nunique()
    near_members = members[np.isin(comp[members], distinct.index[distinct > 1])]
    blanks = np.flatnonzero(audit.blank)
    parts = [("exact", exact_members, audit.exact[exact_members]), ("near", near_members, comp[near_members]),
             ("blank", blanks, blanks)]
    frames, offset = [], 0
    for kind, idx, key in parts:
        _, gid = np.unique(key, return_inverse=True)
        order = np.lexsort((idx, gid))
        frames.append(pd.DataFrame({"group_id": gid[order] + offset, "kind": kind, "index": idx[order]}))
        offset += int(gid.max()) + 1 if len(gid) else 0
    df = pd.concat(frames, ignore_index=True)
    idx = df["index"].to_numpy()
    df["id"] = data.ids[idx].astype(str)
    df["split"] = np.asarray(USAGES)[data.usage[idx]]
    df["label"] = data.labels[idx]
    df["emotion"] = np.asarray(CLASSES)[data.labels[idx]]
    g = df.groupby("group_id")
    usages = g["split"].transform("nunique")
    has_train = (df["split"] == USAGES[0]).groupby(df["group_id"]).transform("any")
    df["cross_split"] = usages > 1
    df["leakage"] = df["cross_split"] & has_train
    df["label_conflict"] = g["label"].transform("nunique") > 1
    df["leak"] = audit.leak[idx]
    df.attrs.update(n_images=n, threshold=threshold, blank_std=blank_std, max_shift=max_shift)
    return df[GROUP_COLUMNS]


def summarize(groups: pd.DataFrame) -> dict:
    """Counts from a ``check`` table.

    Returns:
        ``exact_groups``, ``exact_images`` (images in exact groups), ``exact_redundant`` (images beyond the
        first of each exact group), ``near_groups``, ``near_images``, ``cross_split_groups``,
        ``leakage_groups`` (span Training and an eval split), ``leaking_training_images`` (Training images
        that directly duplicate an eval image), ``label_conflict_groups``, ``blank_images``, and the
        ``n_images``/``threshold``/``blank_std`` the table was made with (when known).
    """
    dup = groups[groups.kind != "blank"]
    per_group = dup.groupby("group_id").agg(kind=("kind", "first"), n=("index", "size"),
                                            cross=("cross_split", "first"), leakage=("leakage", "first"),
                                            conflict=("label_conflict", "first"))
    exact = per_group[per_group.kind == "exact"]
    near = per_group[per_group.kind == "near"]
    out = {k: groups.attrs[k] for k in ("n_images", "threshold", "blank_std", "max_shift") if k in groups.attrs}
    out.update(
        exact_groups=len(exact), exact_images=int(exact.n.sum()), exact_redundant=int((exact.n - 1).sum()),
        near_groups=len(near), near_images=int(near.n.sum()),
        cross_split_groups=int(per_group.cross.sum()), leakage_groups=int(per_group.leakage.sum()),
        leaking_training_images=int(dup.loc[dup.leak, "index"].nunique()),
        label_conflict_groups=int(per_group.conflict.sum()),
        blank_images=int((groups.kind == "blank").sum()),
    )
    return out


def exact_groups(data: FERData) -> np.ndarray:
    """int64 ``[N]`` exact-duplicate group id per image, for ``split_indices(..., groups=...)``."""
    return np.unique(pixel_hashes(data.images), return_inverse=True)[1].astype(np.int64)


def near_groups(data: FERData, threshold: int = DEFAULT_THRESHOLD, max_shift: int = DEFAULT_MAX_SHIFT) -> np.ndarray:
    """int64 ``[N]`` group id per image joining exact copies and near duplicates (perceptual-hash distance <=
    ``threshold``, 1-px shifts included; near-blank images join only their exact copies), for ``split_indices``."""
    exact = exact_groups(data)
    keep = np.flatnonzero(image_std(data.images) >= DEFAULT_BLANK_STD)
    images = data.images[keep]
    near = keep[near_pairs(perceptual_hashes(images), threshold, shift_hashes(images, max_shift))]
    first = np.unique(exact, return_index=True)[1]  # each image to its exact group's first image
    pairs = np.concatenate([near.reshape(-1, 2), np.stack([np.arange(len(exact)), first[exact]], 1)])
    return _components(len(exact), pairs).astype(np.int64)


def dedup(data: FERData, mode: str, threshold: int = DEFAULT_THRESHOLD, blank_std: float = DEFAULT_BLANK_STD,
          max_shift: int = DEFAULT_MAX_SHIFT) -> tuple[FERData, dict]:
    """Drop duplicate images.

    Args:
        data: The dataset.
        mode: ``none`` keeps everything; ``within`` keeps the first image (lowest row) of each exact-duplicate
            group within each usage; ``leakage`` drops every Training image that exactly or nearly (pHash
            distance <= ``threshold``) duplicates a PublicTest/PrivateTest image; ``both`` does both.
        threshold: Near-duplicate pHash distance for ``leakage``.
        blank_std: Blank images are left out of the near-duplicate search (exact copies still count).
        max_shift: Translation tolerance of near matching, in pixels.

    Returns:
        ``(kept data, info)``; ``info`` has ``mode``, ``threshold``, ``before``, ``after``, ``dropped_within``,
        ``dropped_leakage`` (each counted on the original data; an image can be in both), ``dropped_per_split``
        and ``dropped_ids``.

    Raises:
        ValueError: Unknown ``mode``.
    """
    if mode not in DEDUP_MODES:
        raise ValueError(f"dedup mode must be one of {DEDUP_MODES}, got {mode!r}")
    drop_within = np.zeros(len(data), bool)
    drop_leak = np.zeros(len(data), bool)
    if mode != "none":
        audit = _audit(data, threshold, blank_std, max_shift)
        if mode in ("within", "both"):
            key = audit.exact.astype(np.int64) * len(USAGES) + data.usage
            first = np.unique(key, return_index=True)[1]
            drop_within[:] = True
            drop_within[first] = False
        if mode in ("leakage", "both"):
            drop_leak = audit.leak
    drop = drop_within | drop_leak
    info = {"mode": mode, "threshold": threshold, "before": len(data), "after": int((~drop).sum()),
            "dropped_within": int(drop_within.sum()), "dropped_leakage": int(drop_leak.sum()),
            "dropped_per_split": {u: int((drop & (data.usage == i)).sum()) for i, u in enumerate(USAGES)},
            "dropped_ids": data.ids[drop].astype(str).tolist()}
    return (data.subset(np.flatnonzero(~drop)) if drop.any() else data), info


def describe_dedup(info: dict) -> str:
    """One line for logs: what ``dedup`` dropped."""
    per = ", ".join(f"{u} {k}" for u, k in info["dropped_per_split"].items() if k)
    return (f"dedup={info['mode']} (threshold {info['threshold']}): dropped {info['before'] - info['after']} of "
            f"{info['before']} images ({info['dropped_within']} within-split copies, {info['dropped_leakage']} "
            f"Training images leaking into eval splits){'; ' + per if per else ''}")

