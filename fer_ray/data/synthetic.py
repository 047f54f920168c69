"""The embedded dataset: procedurally drawn FER-like 48×48 grayscale faces, so every command runs offline.

Seven expressions differ in mouth curvature/opening, brow angle and height, and eye opening; each sample has
its own identity (face shape, skin tone, eye spacing), pose (rotation, shift, scale), lighting (gradient,
contrast, gamma), noise, occasional occlusion, and an expression intensity that makes some samples
ambiguous. Class frequencies follow FER-2013 Training (disgust rare). Everything is vectorised over images.
``write_csv`` writes the Kaggle ``fer2013.csv`` form so the demo goes through the real loader.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

from fer_ray.data.dataset import CLASSES, IMG_SIZE, USAGES, FERData

FER_TRAIN_COUNTS = np.array([3995, 436, 4097, 7215, 4830, 3171, 4965])
# Per class: mouth curvature (+ = smile), mouth opening, mouth width, brow inner-end drop (+ = frown),
# brow height, eye opening. Neutral is the reference; intensity interpolates from neutral to these.
_EXPR = np.array([
    # curve open  width  brow_in brow_h  eye
    [-0.6, 0.0, 0.75, 2.6, -1.0, 0.9],   # angry: lowered inner brows, tight mouth
    [-1.6, 0.5, 0.85, 1.8, -0.6, 0.6],   # disgust: frown, squint, slightly open
    [-0.4, 2.2, 1.10, -1.2, 1.6, 1.6],   # fear: raised inner brows, wide eyes, open wide mouth
    [2.8, 0.6, 1.20, 0.0, 0.2, 0.6],     # happy: smile, squinted eyes
    [-2.0, 0.0, 0.95, -2.2, 0.6, 0.8],   # sad: inner brows raised, mouth corners down
    [0.0, 3.2, 0.70, -0.2, 2.6, 1.8],    # surprise: high brows, round open mouth, wide eyes
    [0.0, 0.0, 1.00, 0.0, 0.0, 1.0],     # neutral
], dtype=np.float32)


def _segment_dist(u, v, x0, y0, x1, y1):
    """Distance from points (u, v) to segments (x0, y0)-(x1, y1); all arrays broadcast over [N, H, W]."""
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((u - x0) * dx + (v - y0) * dy) / (dx * dx + dy * dy + 1e-6), 0, 1)
    return np.hypot(u - (x0 + t * dx), v - (y0 + t * dy))


def _draw(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = len(labels)

    def r(lo, hi):
        return rng.uniform(lo, hi, (n, 1, 1)).astype(np.float32)

    ys, xs = np.mgrid[0:IMG_SIZE, 0:IMG_SIZE].astype(np.float32) - (IMG_SIZE - 1) / 2
    ang = np.deg2rad(r(-15, 15))
    scale = r(0.88, 1.12)
    cx, cy = r(-3, 3), r(-3, 3)
    u = (np.cos(ang) * (xs - cx) + np.sin(ang) * (ys - cy)) / scale
    v = (-np.sin(ang) * (xs - cx) + np.cos(ang) * (ys - cy)) / scale

    intensity = rng.beta(2.0, 1.6, n).astype(np.float32)
    e = _EXPR[6] + intensity[:, None] * (_EXPR[labels] - _EXPR[6])
    e = e + rng.normal(0, 0.35, e.shape).astype(np.float32)  # person-to-person expression variation
    curve, mouth_open, mouth_w, brow_in, brow_h, eye_open = (e[:, i, None, None] for i in range(6))

    face_a, face_b = r(13.5, 17.5), r(17.5, 21.5)
    skin, bg = r(120, 200), r(10, 100)
    img = np.where((u / face_a) ** 2 + ((v - 1) / face_b) ** 2 <= 1, skin, bg)
    hair = (v < -face_b * r(0.55, 0.8)) & ((u / face_a) ** 2 + ((v - 1) / face_b) ** 2 <= 1.05)
    img = np.where(hair, r(15, 80), img)

    dark = skin * r(0.25, 0.45)
    eye_x, eye_y = r(5.0, 7.5), r(-5.0, -2.5)
    for side in (-1.0, 1.0):
        eye = ((u - side * eye_x) / 2.6) ** 2 + ((v - eye_y) / (1.25 * eye_open.clip(0.25))) ** 2 <= 1
        img = np.where(eye, dark, img)
        inner, outer = side * (eye_x - 3.2), side * (eye_x + 3.2)
        by = eye_y - 4.0 - brow_h
        d = _segment_dist(u, v, inner, by + 0.9 * brow_in, outer, by - 0.2 * brow_in)
        img = np.where(d < 0.9, dark, img)

    my, mw = r(6.5, 9.0), 4.8 * mouth_w.clip(0.4)
    t = np.clip(u / mw, -1.2, 1.2)
    lip = np.abs(v - (my - curve * (t**2 - 0.35))) < 0.9
    lip &= np.abs(u) <= mw
    opening = ((u / (mw * 0.75)) ** 2 + ((v - my) / (0.9 * mouth_open.clip(0.05))) ** 2 <= 1) & (mouth_open > 0.4)
    img = np.where(lip | opening, dark * 0.8, img)

    gx, gy = r(-1, 1), r(-1, 1)
    img = img * (1 + r(0, 0.45) * (gx * xs + gy * ys) / IMG_SIZE)
    img = (img - img.mean(axis=(1, 2), keepdims=True)) * r(0.6, 1.3) + img.mean(axis=(1, 2), keepdims=True)
    img = 255 * (np.clip(img, 0, 255) / 255) ** r(0.7, 1.4)
    img = img + rng.normal(0, 1, img.shape).astype(np.float32) * r(4, 16)

    occ = rng.random(n) < 0.15
    if occ.any():
        x0, y0 = rng.integers(0, 36, n), rng.integers(0, 36, n)
        w, h = rng.integers(8, 20, n), rng.integers(8, 20, n)
        box = ((xs[None] + 23.5 >= x0[:, None, None]) & (xs[None] + 23.5 < (x0 + w)[:, None, None])
               & (ys[None] + 23.5 >= y0[:, None, None]) & (ys[None] + 23.5 < (y0 + h)[:, None, None]))
        img = np.where(box & occ[:, None, None], rng.uniform(0, 255, (n, 1, 1)).astype(np.float32), img)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def generate(n: int = 6000, seed: int = 0, split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
             chunk: int = 2000) -> FERData:
    """Draw ``n`` faces with FER-2013 class frequencies; same seed → identical bytes.

    Usage (Training/PublicTest/PrivateTest) is assigned per class by ``split_fractions``, so every class
    appears in every split once ``n`` is a few hundred.
    """
    rng = np.random.default_rng(seed)
    probs = FER_TRAIN_COUNTS / FER_TRAIN_COUNTS.sum()
    counts = np.floor(probs * n).astype(int)
    counts[np.argsort(-(probs * n - counts))[: n - counts.sum()]] += 1
    labels = rng.permutation(np.repeat(np.arange(len(CLASSES)), counts))
    usage = np.zeros(n, dtype=np.int8)
    for c in range(len(CLASSES)):
        idx = np.flatnonzero(labels == c)
        n_pub = max(1, int(round(len(idx) * split_fractions[1]))) if len(idx) >= 3 else 0
        n_priv = max(1, int(round(len(idx) * split_fractions[2]))) if len(idx) >= 3 else 0
        usage[idx[:n_pub]] = 1
        usage[idx[n_pub:n_pub + n_priv]] = 2
    images = np.concatenate([_draw(labels[i:i + chunk], rng) for i in range(0, n, chunk)])
    ids = np.array([f"synthetic:{seed}:{i}" for i in range(n)], dtype=object)
    return FERData(images, labels.astype(np.int64), usage, ids)


def write_csv(path: str | Path, data: FERData) -> Path:
    """Write ``data`` as a Kaggle ``fer2013.csv`` (``emotion,pixels,Usage``), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    digits = np.char.mod("%d", data.images.reshape(len(data), -1))
    pixels = [" ".join(row) for row in digits]
    usage = np.asarray(USAGES)[data.usage]
    body = "\n".join(f"{lab},{pix},{use}" for lab, pix, use in zip(data.labels, pixels, usage, strict=True))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write("emotion,pixels,Usage\n" + body + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_folders(root: str | Path, data: FERData) -> Path:
    """Write ``data`` in the Kaggle image-folder layout (``train/<class>/Training_<i>.png``, ``test/...``)."""
    from PIL import Image

    root = Path(root)
    for i, (img, lab, use) in enumerate(zip(data.images, data.labels, data.usage, strict=True)):
        folder = root / ("train" if use == 0 else "test") / CLASSES[lab]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(folder / f"{USAGES[use]}_{i}.png")
    return root


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write the synthetic FER-like dataset as a Kaggle fer2013.csv.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=6000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--folders", action="store_true", help="also write the image-folder layout")
    args = p.parse_args(argv)
    data = generate(args.n, seed=args.seed)
    path = write_csv(Path(args.out) / "fer2013.csv", data)
    print(f"wrote {path}: {len(data)} images, per class {np.bincount(data.labels, minlength=7).tolist()}")
    if args.folders:
        print(f"wrote {write_folders(Path(args.out), data)}")


if __name__ == "__main__":
    main()
