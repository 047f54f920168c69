#!/usr/bin/env python3
"""Pack FER-2013 (Training + PublicTest) into one small lossless file for the GPU check machine.

This script owns the ``.gpu/fer2013.npz`` format: ``write_pack`` makes it, ``read_pack`` (used by
``scripts/gpu_check.py --data``) reads it back with numpy and the standard library alone. The pixels are
exactly the uint8 arrays ``fer_ray.data.ingest`` decodes from the JPEG folders, so the GPU machine trains on the
same bytes as this one.

Format (an uncompressed ``np.savez`` archive, loaded with ``allow_pickle=False``):

* ``format``: ``"fer2013-med-xz-v1"``; ``shape``: ``[N, 48, 48]``;
* ``images_xz``: the images as LOCO-I/JPEG-LS median-edge-detector (MED) residuals mod 256, zigzag-mapped to
  small unsigned bytes and compressed with xz (LZMA2, preset 9e). The MED predictor (from the left, upper and
  upper-left neighbours, zero outside the image) leaves ~5.6 bits/pixel of zero-order entropy against 7.9 raw;
  xz then models the context. ``--compare`` measures the alternatives on the same data;
* ``labels``, ``usage``: uint8 ``[N]``; ``ids_xz``: the ids joined by newlines, UTF-8, xz-compressed;
* ``images_sha256``: sha256 of the raw image bytes, checked by ``read_pack`` after decoding.

Usage: ``.venv/bin/python scripts/pack_fer2013.py [--src ../shared/data/fer2013] [--out .gpu/fer2013.npz]``.
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import sys
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fer_ray.data.dataset import IMG_SIZE, FERData  # noqa: E402  (after the repo root is on sys.path)

FORMAT = "fer2013-med-xz-v1"
XZ_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def _med(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """JPEG-LS median edge detector from the left ``a``, upper ``b`` and upper-left ``c`` neighbours (int16)."""
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    return np.where(c >= hi, lo, np.where(c <= lo, hi, a + b - c))


def encode_residuals(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, H, W]`` → zigzag-mapped MED residuals, uint8 ``[N, H, W]`` (lossless: see ``decode_residuals``)."""
    x = images.astype(np.int16)
    a, b, c = np.zeros_like(x), np.zeros_like(x), np.zeros_like(x)
    a[:, :, 1:], b[:, 1:, :], c[:, 1:, 1:] = x[:, :, :-1], x[:, :-1, :], x[:, :-1, :-1]
    r = (x - _med(a, b, c) + 128) % 256 - 128  # in [-128, 127]
    return np.where(r >= 0, 2 * r, -2 * r - 1).astype(np.uint8)


def decode_residuals(z: np.ndarray) -> np.ndarray:
    """Inverse of ``encode_residuals``: one vectorised step per pixel position, over all images at once."""
    z = z.astype(np.int16)
    r = np.where(z % 2 == 0, z // 2, -(z + 1) // 2).transpose(1, 2, 0)  # [H, W, N]: contiguous per position
    h, w, n = r.shape
    x = np.zeros((h, w, n), np.int16)
    zero = np.zeros(n, np.int16)
    for i in range(h):
        for j in range(w):
            a = x[i, j - 1] if j else zero
            b = x[i - 1, j] if i else zero
            c = x[i - 1, j - 1] if i and j else zero
            x[i, j] = (r[i, j] + _med(a, b, c)) % 256
    return np.ascontiguousarray(x.transpose(2, 0, 1)).astype(np.uint8)


def write_pack(data: FERData, path: str | Path) -> dict:
    """Write ``data`` to ``path`` in the format above; returns sizes and timings."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    images_xz = lzma.compress(encode_residuals(data.images).tobytes(), format=lzma.FORMAT_XZ, filters=XZ_FILTERS)
    ids_xz = lzma.compress("\n".join(map(str, data.ids)).encode(), format=lzma.FORMAT_XZ, filters=XZ_FILTERS)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, format=np.array(FORMAT), shape=np.array(data.images.shape, np.int64),
             images_xz=np.frombuffer(images_xz, np.uint8), labels=data.labels.astype(np.uint8),
             usage=data.usage.astype(np.uint8), ids_xz=np.frombuffer(ids_xz, np.uint8),
             images_sha256=np.array(hashlib.sha256(data.images.tobytes()).hexdigest()))
    tmp.replace(path)
    return {"images": len(data), "raw_bytes": data.images.nbytes, "file_bytes": path.stat().st_size,
            "images_xz_bytes": len(images_xz), "ids_xz_bytes": len(ids_xz), "encode_s": time.perf_counter() - t0}


def read_pack(path: str | Path) -> FERData:
    """Read a pack back into ``FERData`` (numpy + lzma only); raises ``ValueError`` on a format or sha mismatch."""
    with np.load(path, allow_pickle=False) as z:
        if str(z["format"]) != FORMAT:
            raise ValueError(f"{path}: format {str(z['format'])!r}, expected {FORMAT!r}")
        shape = tuple(int(s) for s in z["shape"])
        residuals = np.frombuffer(lzma.decompress(z["images_xz"].tobytes()), np.uint8).reshape(shape)
        images = decode_residuals(residuals)
        if hashlib.sha256(images.tobytes()).hexdigest() != str(z["images_sha256"]):
            raise ValueError(f"{path}: decoded images do not match the sha256 recorded at packing")
        ids = np.array(lzma.decompress(z["ids_xz"].tobytes()).decode().split("\n"), dtype=object)
        return FERData(images, z["labels"].astype(np.int64), z["usage"].astype(np.int8), ids)


def compare(images: np.ndarray) -> list[dict]:
    """Measure candidate lossless packings of ``images`` (size in MiB, seconds to encode); slow (minutes)."""
    raw = images.tobytes()
    candidates = {
        "raw uint8": lambda: raw,
        "np.savez_compressed (zlib 6)": lambda: zlib.compress(raw, 6),
        "xz 9e, raw bytes": lambda: lzma.compress(raw, format=lzma.FORMAT_XZ, filters=XZ_FILTERS),
        "xz 9e, delta filter dist 48 (row above)": lambda: lzma.compress(
            raw, format=lzma.FORMAT_XZ, filters=[{"id": lzma.FILTER_DELTA, "dist": IMG_SIZE}, *XZ_FILTERS]),
        "xz 9e, MED residuals, zigzag (this format)": lambda: lzma.compress(
            encode_residuals(images).tobytes(), format=lzma.FORMAT_XZ, filters=XZ_FILTERS),
    }
    rows = []
    for name, fn in candidates.items():
        t0 = time.perf_counter()
        size = len(fn())
        rows.append({"packing": name, "MiB": size / 2**20, "encode_s": time.perf_counter() - t0})
        print(f"{name:45s} {size / 2**20:7.2f} MiB  {rows[-1]['encode_s']:6.1f} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", default=str(ROOT.parent / "shared" / "data" / "fer2013"), help="FER-2013 image folders")
    p.add_argument("--out", default=str(ROOT / ".gpu" / "fer2013.npz"))
    p.add_argument("--cache-dir", default=None, help="fer_ray.data.ingest parquet cache (default: none)")
    p.add_argument("--compare", action="store_true", help="also measure the alternative packings (minutes)")
    args = p.parse_args(argv)
    from fer_ray.data.ingest import load_dataset

    data = load_dataset(args.src, fmt="folders", cache_dir=args.cache_dir)
    keep = np.flatnonzero(data.usage <= 1)  # Training + PublicTest; PrivateTest stays out (none in the folders)
    data = data.subset(keep)
    print(f"loaded {len(data)} images from {args.src} (usage counts {np.bincount(data.usage).tolist()})", flush=True)
    if args.compare:
        compare(data.images)
    info = write_pack(data, args.out)
    t0 = time.perf_counter()
    back = read_pack(args.out)
    same = all(np.array_equal(getattr(back, k), getattr(data, k)) for k in ("images", "labels", "usage", "ids"))
    if not same:
        raise SystemExit(f"{args.out}: round trip changed the data")
    print(f"wrote {args.out}: {info['file_bytes'] / 2**20:.2f} MiB for {info['images']} images "
          f"({info['raw_bytes'] / 2**20:.2f} MiB raw), encode {info['encode_s']:.0f} s, "
          f"read back and verified in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
