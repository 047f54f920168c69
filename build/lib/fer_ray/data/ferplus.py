"""FER+ relabelling: apply the FER+ majority-vote labels (Barsoum et al. 2016) on top of FER-2013 pixels.

The FER+ release ships ``fer2013new.csv`` with one row per row of the original ``fer2013.csv``, in the same order,
and the columns ``Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF``
(10 annotators' votes per image). ``apply_ferplus`` takes a ``FERData`` loaded from that ``fer2013.csv`` (its ids
are ``row:<line>``), matches FER+ row ``k`` to CSV line ``k + 2``, and relabels each image by majority vote:

- the label is the emotion with the most votes, mapped to fer_ray's classes: anger→angry, disgust→disgust,
  fear→fear, happiness→happy, sadness→sad, surprise→surprise, neutral→neutral;
- images whose top vote is ``contempt`` (no FER-2013 class), ``unknown`` or ``NF`` (not a face), or whose top vote
  is tied between classes, are dropped, as in the FER+ paper's majority-vote protocol.

It is applied in ``fer_ray.data.load_data`` when ``DataConfig.ferplus`` names the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fer_ray.data.dataset import CLASSES, USAGES, DataError, FERData

VOTE_COLUMNS = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt", "unknown", "NF"]
TO_FER = {"anger": "angry", "disgust": "disgust", "fear": "fear", "happiness": "happy", "sadness": "sad",
          "surprise": "surprise", "neutral": "neutral"}


def read_votes(path: str | Path) -> pd.DataFrame:
    """The FER+ vote table, checked: header, integer non-negative votes; errors name file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: FER+ label file not found (fer2013new.csv from the FER+ release)")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a FER+ label file ({e})") from None
    missing = [c for c in ["Usage", *VOTE_COLUMNS] if c not in df.columns]
    if missing:
        raise DataError(f"{path}: line 1: header lacks FER+ column(s) {', '.join(missing)}")
    votes = df[VOTE_COLUMNS].apply(pd.to_numeric, errors="coerce")
    bad = votes.isna() | (votes < 0) | (votes != votes.round())
    if bad.to_numpy().any():
        row, col = np.argwhere(bad.to_numpy())[0]
        raise DataError(f"{path}: line {row + 2}: {VOTE_COLUMNS[col]} vote {df.iloc[row][VOTE_COLUMNS[col]]!r} "
                        "is not a non-negative integer")
    out = votes.astype(np.int64)
    out.insert(0, "Usage", df["Usage"].to_numpy())
    return out


def majority_labels(votes: pd.DataFrame) -> np.ndarray:
    """fer_ray class index per FER+ row, or -1 where the row is dropped (contempt/unknown/NF top, or a tie)."""
    v = votes[VOTE_COLUMNS].to_numpy()
    top = v.argmax(1)
    tied = (v == v.max(1, keepdims=True)).sum(1) > 1
    mapping = np.array([CLASSES.index(TO_FER[c]) if c in TO_FER else -1 for c in VOTE_COLUMNS])
    labels = mapping[top]
    labels[tied | (v.sum(1) == 0)] = -1
    return labels


def apply_ferplus(data: FERData, path: str | Path) -> tuple[FERData, dict]:
    """Relabel ``data`` (loaded from the matching ``fer2013.csv``) with FER+ majority votes; drop unusable rows."""
    path = Path(path)
    if not all(str(i).startswith("row:") for i in data.ids):
        raise DataError(f"{path}: FER+ labels apply to data loaded from the original fer2013.csv (ids row:<line>), "
                        "not to image folders")
    votes = read_votes(path)
    rows = np.array([int(str(i)[4:]) - 2 for i in data.ids])
    if len(rows) and rows.max() >= len(votes):
        raise DataError(f"{path}: {len(votes)} FER+ rows, but the CSV has data row {rows.max() + 1}: "
                        "use the fer2013new.csv that matches this fer2013.csv")
    usage = votes["Usage"].to_numpy()[rows]
    mismatch = np.flatnonzero(usage != np.asarray(USAGES)[data.usage])
    if len(mismatch):
        k = mismatch[0]
        raise DataError(f"{path}: line {rows[k] + 2}: Usage {usage[k]!r} but fer2013.csv line {rows[k] + 2} says "
                        f"{USAGES[data.usage[k]]!r}: the files do not match row for row")
    labels = majority_labels(votes)[rows]
    keep = labels >= 0
    info = {"rows": len(data), "kept": int(keep.sum()), "dropped": int((~keep).sum()),
            "changed": int((labels[keep] != data.labels[keep]).sum())}
    out = FERData(data.images[keep], labels[keep].astype(np.int64), data.usage[keep], data.ids[keep])
    return out, info
