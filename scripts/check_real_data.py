"""Check the ingest layer against the real FER-2013 copies in the shared data folder.

Loads ``<data>/fer2013`` (Kaggle image folders) twice, cold and from the parquet cache, and compares its
per-split and per-class counts with the published ones; parses ``<data>/fer2013_original_rows.csv`` (1,167
exact rows of the original ``fer2013.csv``); then checks every CSV row has a JPEG counterpart: the nearest
folder image by RMS pixel difference must lie within ``--tol`` grey levels (JPEG noise) and carry the same
label. Prints counts, timings and match statistics; exits 1 when any check fails.

Usage: ``python scripts/check_real_data.py [--data ../shared/data] [--cache-dir DIR]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fer_ray.data.dataset import CLASSES, USAGES, FERData  # noqa: E402
from fer_ray.data.ingest import load_dataset_with_report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Published counts (shared/data/README.md): Training / PublicTest per class, in CLASSES order.
EXPECTED_FOLDERS = {
    "Training": [3995, 436, 4097, 7215, 4830, 3171, 4965],
    "PublicTest": [467, 56, 496, 895, 653, 415, 607],
}
EXPECTED_CSV = [177, 14, 189, 272, 182, 141, 192]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data",
                    help="folder holding fer2013/ and fer2013_original_rows.csv (../shared/data from the repo root)")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="parquet cache directory; None: a fresh temporary one, so the first load is cold")
    ap.add_argument("--tol", type=float, default=6.0, help="max RMS grey-level difference of a CSV row to its JPEG")
    ap.add_argument("--chunk", type=int, default=4096, help="folder images per distance-matrix block")
    return ap.parse_args(argv)


def nearest(queries: np.ndarray, base: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Index of and exact RMS distance to the nearest ``base`` image for every query (float32 matmul in chunks).

    Args:
        queries: uint8 ``[Q, 48, 48]``.
        base: uint8 ``[B, 48, 48]``.
        chunk: Rows of ``base`` per block.

    Returns:
        ``(index [Q], rms [Q])``; the rms is recomputed exactly in float64 for the chosen image.
    """
    q = queries.reshape(len(queries), -1).astype(np.float32) - 128.0
    q_sq = (q * q).sum(1)
    best_d = np.full(len(q), np.inf, np.float32)
    best_i = np.zeros(len(q), np.int64)
    for a in range(0, len(base), chunk):
        b = base[a:a + chunk].reshape(-1, q.shape[1]).astype(np.float32) - 128.0
        d = q_sq[:, None] + (b * b).sum(1)[None, :] - 2.0 * (q @ b.T)
        i = d.argmin(1)
        di = d[np.arange(len(q)), i]
        better = di < best_d
        best_d[better], best_i[better] = di[better], i[better] + a
    diff = queries.reshape(len(queries), -1).astype(np.float64) - base[best_i].reshape(len(queries), -1)
    return best_i, np.sqrt((diff * diff).mean(1))


def check_counts(name: str, got: np.ndarray, want: list[int]) -> bool:
    ok = got.tolist() == want
    print(f"  {name:11s} {int(got.sum()):6d}  " + " ".join(f"{c}:{n}" for c, n in zip(CLASSES, got.tolist()))
          + ("" if ok else f"   MISMATCH, expected {want}"))
    return ok


def main(argv: list[str] | None = None) -> int:
    """Run every check; returns the process exit code."""
    args = parse_args(argv)
    folders, csv_path = args.data / "fer2013", args.data / "fer2013_original_rows.csv"
    ok = True
    with tempfile.TemporaryDirectory(prefix="fer_ray-cache-") as tmp:
        cache = args.cache_dir or Path(tmp)
        print(f"folders: {folders}  (cache {cache})")
        data, cold = load_dataset_with_report(folders, fmt="auto", cache_dir=cache)
        _, warm = load_dataset_with_report(folders, fmt="auto", cache_dir=cache)
        print(f"  load: first {cold.seconds:.2f}s (cache hit: {cold.cache_hit}), cached {warm.seconds:.2f}s "
              f"(cache hit: {warm.cache_hit}), {len(data)} images, fmt {cold.fmt}")
        ok &= warm.cache_hit
        for usage in USAGES:
            got = data.class_counts(usage)
            if usage in EXPECTED_FOLDERS:
                ok &= check_counts(usage, got, EXPECTED_FOLDERS[usage])
            elif got.sum():
                print(f"  {usage:11s} {int(got.sum()):6d}  unexpected: the README says these are withheld")
                ok = False

    print(f"csv: {csv_path}")
    rows, first = load_dataset_with_report(csv_path)
    _, again = load_dataset_with_report(csv_path)
    print(f"  parse: first {first.seconds:.3f}s (includes pyarrow warm-up), again {again.seconds:.3f}s, "
          f"{len(rows)} rows, usage {dict(zip(USAGES, np.bincount(rows.usage, minlength=3).tolist()))}")
    ok &= check_counts("rows", rows.class_counts(), EXPECTED_CSV)
    ok &= check_match(rows, data, args.tol, args.chunk)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def check_match(rows: FERData, data: FERData, tol: float, chunk: int) -> bool:
    """Every CSV row has a folder image of the same usage within ``tol`` RMS grey levels, with the same label.

    The search is restricted to the row's own usage because FER-2013 has pixel-identical images across splits
    (sometimes labelled differently); how many rows have such a cross-split twin is printed for information.
    """
    t0 = time.perf_counter()
    idx = np.zeros(len(rows), np.int64)
    rms = np.zeros(len(rows))
    for u in np.unique(rows.usage):
        members = np.flatnonzero(data.usage == u)
        sel = np.flatnonzero(rows.usage == u)
        if len(members) == 0:
            print(f"  match: no {USAGES[u]} folder images to match {len(sel)} CSV rows against")
            return False
        i, r = nearest(rows.images[sel], data.images[members], chunk)
        idx[sel], rms[sel] = members[i], r
    any_idx, any_rms = nearest(rows.images, data.images, chunk)
    seconds = time.perf_counter() - t0
    close = rms <= tol
    agree = data.labels[idx] == rows.labels
    twins = (data.usage[any_idx] != rows.usage) & (any_rms <= rms + 1e-9)
    print(f"  match: {int(close.sum())}/{len(rows)} rows within {tol:g} grey levels RMS of a same-usage folder image, "
          f"labels agree for {int((close & agree).sum())}; RMS mean {rms.mean():.2f} median {np.median(rms):.2f} "
          f"max {rms.max():.2f}; {len(np.unique(idx[close]))} distinct images; {seconds:.1f}s")
    print(f"  info: {int(twins.sum())} rows have an equally close image in another split (cross-split duplicates), "
          f"{int((twins & (data.labels[any_idx] != rows.labels)).sum())} of them labelled differently")
    for i in np.flatnonzero(~(close & agree))[:5]:
        print(f"    {rows.ids[i]}: nearest {data.ids[idx[i]]} rms {rms[i]:.2f} "
              f"label {CLASSES[rows.labels[i]]} vs {CLASSES[data.labels[idx[i]]]}")
    return bool(close.all() and agree.all())


if __name__ == "__main__":
    sys.exit(main())
