"""The embedded dataset: procedurally drawn FER-like 48×48 grayscale faces, so every command runs offline.

This module owns the synthetic stand-in for FER-2013 and its writers: ``generate`` draws a ``FERData``,
``write_csv`` writes it as a Kaggle ``fer2013.csv`` (``emotion,pixels,Usage``) and ``write_folders`` as the
Kaggle image-folder layout, so demos and tests go through the real loaders. ``main`` is the command line
(``python -m fer_ray.data.synthetic --out DIR``).

The seven expressions differ in mouth curvature and opening, brow angle and height, and eye opening. Each sample
also has its own identity (face shape, skin tone, eye spacing, hair colour, hairline, long hair), scene
(background brightness and texture, shoulders), pose (rotation, shift, scale), lighting (gradient, contrast,
gamma), sensor noise, sometimes an occluding patch, and an expression intensity
drawn per sample, so weak expressions look neutral and fear/surprise, angry/disgust and sad/disgust overlap.
Class frequencies follow FER-2013 Training (disgust rare). Rendering is vectorised over images with
broadcasting on coordinate grids; the same seed gives identical bytes.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fer_ray.atomic import atomic_write_text
from fer_ray.data.dataset import CLASSES, IMG_SIZE, USAGES, DataError, FERData

# FER-2013 Training class counts, in ``CLASSES`` order; generate() draws labels in these proportions.
FER_TRAIN_COUNTS = np.array([3995, 436, 4097, 7215, 4830, 3171, 4965])
FER_TRAIN_PROBS = FER_TRAIN_COUNTS / FER_TRAIN_COUNTS.sum()

# Expression parameters per class, in ``CLASSES`` order. Neutral is the reference: a sample's expression is
# ``neutral + intensity * (class - neutral)`` plus person-to-person jitter.
#   curve:   mouth-corner lift in px (+ smile, - frown)
#   open:    mouth opening half-height in px (0 = closed)
#   width:   mouth half-width multiplier
#   brow_in: inner brow end drop in px (+ lowered/frowning, - raised/worried)
#   brow_h:  whole-brow lift in px
#   eye:     eye opening multiplier (< 1 squint, > 1 wide)
_PARAMS = ("curve", "open", "width", "brow_in", "brow_h", "eye")
_EXPR = np.array([
    # curve open  width brow_in brow_h eye
    [-0.8, 0.0, 0.85, 2.6, -1.2, 0.70],  # angry: lowered inner brows, narrowed eyes, tight mouth
    [-2.0, 0.7, 0.95, 1.7, -0.7, 0.55],  # disgust: frown with raised upper lip, squint, brows down
    [-0.9, 2.0, 1.15, -1.8, 1.6, 1.55],  # fear: raised inner brows, wide eyes, mouth stretched open
    [3.0, 0.4, 1.25, 0.0, 0.3, 0.55],  # happy: smile, squinted eyes
    [-2.4, 0.0, 0.90, -2.2, 0.4, 0.85],  # sad: corners down, inner brows raised
    [0.0, 3.0, 0.75, -0.3, 2.6, 1.75],  # surprise: high brows, round open mouth, wide eyes
    [0.0, 0.0, 1.00, 0.0, 0.0, 1.00],  # neutral
], dtype=np.float32)
# Person-to-person jitter (std) of each expression parameter, independent of the class.
_JITTER = np.array([0.55, 0.35, 0.10, 0.65, 0.55, 0.15], dtype=np.float32)
_OCCLUSION_RATE = 0.15
_CHUNK = 1000  # images rendered at once (bounds memory: ~10 float32 [chunk, 48, 48] temporaries)


def _coverage(signed_dist: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape from its signed distance in px (negative inside)."""
    return np.clip(0.5 - signed_dist, 0.0, 1.0)


def _ellipse_sd(u: np.ndarray, v: np.ndarray, cx, cy, a, b) -> np.ndarray:
    """Approximate signed distance (px) to the ellipse centred ``(cx, cy)`` with half-axes ``a``, ``b``."""
    return (np.sqrt(((u - cx) / a) ** 2 + ((v - cy) / b) ** 2) - 1.0) * np.minimum(a, b)


def _segment_dist(u: np.ndarray, v: np.ndarray, x0, y0, x1, y1) -> np.ndarray:
    """Distance from points ``(u, v)`` to segments ``(x0, y0)-(x1, y1)``; all broadcast over ``[N, H, W]``."""
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((u - x0) * dx + (v - y0) * dy) / (dx * dx + dy * dy + 1e-6), 0.0, 1.0)
    return np.hypot(u - (x0 + t * dx), v - (y0 + t * dy))


def _paint(img: np.ndarray, cover: np.ndarray, value) -> np.ndarray:
    """Alpha-blend ``value`` over ``img`` with per-pixel ``cover``."""
    return img + cover * (value - img)


def _draw_params(labels: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every per-image random quantity except pixel noise, as float32 ``[N]`` arrays."""
    n = len(labels)

    def u(lo: float, hi: float) -> np.ndarray:
        return rng.uniform(lo, hi, n).astype(np.float32)

    # Expression intensity: mostly clear, a tail of weak (near-neutral, ambiguous) expressions.
    intensity = rng.beta(2.2, 1.4, n).astype(np.float32)
    expr = _EXPR[6] + intensity[:, None] * (_EXPR[labels] - _EXPR[6])
    expr = expr + rng.normal(0.0, 1.0, expr.shape).astype(np.float32) * _JITTER
    p = {name: expr[:, i] for i, name in enumerate(_PARAMS)}
    p["intensity"] = intensity
    # Identity.
    p.update(face_a=u(12.5, 18.0), face_b=u(16.5, 22.0), skin=u(105, 215), bg=u(5, 250), hair=u(10, 230),
             hairline=np.where(rng.random(n) < 0.15, 2.0, u(0.45, 0.8)).astype(np.float32),
             eye_x=u(5.5, 7.8), eye_y=u(-5.0, -2.5), eye_w=u(2.4, 3.2), brow_w=u(0.7, 1.3),
             mouth_y=u(7.5, 10.0), mouth_w=u(4.2, 5.6), lip_w=u(0.6, 1.1), feature_dark=u(0.2, 0.5))
    # Scene: a smooth background (two random plane waves), shoulders, and long hair on some people.
    p.update(bg_amp=u(0, 60), bg_f1=u(0.5, 2.5), bg_d1=u(0, 2 * np.pi), bg_p1=u(0, 2 * np.pi), bg_f2=u(0.5, 2.5),
             bg_d2=u(0, 2 * np.pi), bg_p2=u(0, 2 * np.pi), cloth=u(0, 255), shoulder_w=u(17, 26),
             long_hair=(rng.random(n) < 0.4).astype(np.float32), hair_len=u(4, 16), hair_x=u(-3, 3))
    # Pose.
    p.update(angle=np.deg2rad(u(-15, 15)), shift_x=u(-4.5, 4.5), shift_y=u(-4, 4), scale=u(0.85, 1.2))
    # Lighting and sensor.
    light_dir = u(0, 2 * np.pi)
    p.update(light_x=np.cos(light_dir), light_y=np.sin(light_dir), light=u(0.0, 1.2), contrast=u(0.65, 1.3),
             gamma=np.exp(u(-0.35, 0.35)), noise=u(2.0, 14.0))
    # Occlusion: a rectangle of random intensity on some images.
    p.update(occluded=(rng.random(n) < _OCCLUSION_RATE).astype(np.float32), occ_x=u(0, 40), occ_y=u(0, 40),
             occ_w=u(7, 20), occ_h=u(7, 20), occ_val=u(0, 255))
    return p


def _render(p: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Render the faces described by ``p`` (``[N]`` arrays) into uint8 ``[N, 48, 48]``."""
    q = {k: v[:, None, None] for k, v in p.items()}
    ys, xs = np.mgrid[0:IMG_SIZE, 0:IMG_SIZE].astype(np.float32) - (IMG_SIZE - 1) / 2
    # Face coordinates (u right, v down, origin at the face centre): inverse of rotate/scale/shift.
    cos, sin = np.cos(q["angle"]), np.sin(q["angle"])
    dx, dy = xs - q["shift_x"], ys - q["shift_y"]
    u = (cos * dx + sin * dy) / q["scale"]
    v = (-sin * dx + cos * dy) / q["scale"]

    a, b, skin = q["face_a"], q["face_b"], q["skin"]
    img = q["bg"] + q["bg_amp"] * sum(
        np.cos(2 * np.pi * q[f"bg_f{k}"] * (np.cos(q[f"bg_d{k}"]) * xs + np.sin(q[f"bg_d{k}"]) * ys) / IMG_SIZE
               + q[f"bg_p{k}"]) for k in (1, 2)) / 2
    # Shoulders below the chin, then long hair behind the face on some people.
    shoulders = _ellipse_sd(u, v, 0.0, b + 11.0, q["shoulder_w"] * 1.4, 11.0)
    img = _paint(img, _coverage(shoulders), q["cloth"])
    mane = _ellipse_sd(u, v, q["hair_x"], 1.0 + q["hair_len"] / 2, a * 1.3, b + q["hair_len"] / 2)
    img = _paint(img, _coverage(mane) * q["long_hair"], q["hair"])
    # Face oval, slightly darker towards its rim.
    rim = np.clip((u / a) ** 2 + ((v - 1.0) / b) ** 2, 0.0, 1.0)
    img = _paint(img, _coverage(_ellipse_sd(u, v, 0.0, 1.0, a, b)), skin * (1.0 - 0.22 * rim))
    # Hair band: a cap over the top of the head down to the hairline.
    cap = np.maximum(_ellipse_sd(u, v, 0.0, 1.0, a * 1.07, b * 1.06), v - (1.0 - b * q["hairline"]))
    img = _paint(img, _coverage(cap), q["hair"])
    dark = skin * q["feature_dark"]
    # Nose: a faint shading line (carries no label information).
    nose = _segment_dist(u, v, 0.0, q["eye_y"] + 2.5, 0.4, q["mouth_y"] - 3.5)
    img = _paint(img, 0.35 * _coverage(nose - 0.7), dark)

    eye_h = 1.3 * np.clip(q["eye"], 0.2, None)
    for side in (-1.0, 1.0):
        ex, ey = side * q["eye_x"], q["eye_y"]
        eye = _ellipse_sd(u, v, ex, ey, q["eye_w"], eye_h)
        img = _paint(img, _coverage(eye), np.minimum(skin * 1.25, 250.0))  # sclera
        iris = np.maximum(eye, np.hypot(u - ex, v - ey) - 1.5)  # iris clipped by the lids
        img = _paint(img, _coverage(iris), dark * 0.6)
        img = _paint(img, 0.8 * _coverage(np.abs(eye) - 0.35), dark)  # lid outline
        # Brow: a thick segment; inner end moves by brow_in, whole brow by brow_h.
        by = ey - 4.2 - q["brow_h"]
        inner, outer = side * (q["eye_x"] - 3.3), side * (q["eye_x"] + 3.6)
        brow = _segment_dist(u, v, inner, by + 0.9 * q["brow_in"], outer, by - 0.25 * q["brow_in"])
        img = _paint(img, _coverage(brow - q["brow_w"]), dark * 0.8)

    my, mw = q["mouth_y"], q["mouth_w"] * np.clip(q["width"], 0.45, None)
    opening = np.clip(q["open"], 0.0, None)
    # Lips: a parabola whose corners rise by ``curve`` (smile) or drop (frown).
    t = np.clip(u / mw, -1.0, 1.0)
    lip_v = my - q["curve"] * (t**2 - 0.4)
    lip = np.maximum(np.abs(v - lip_v) - q["lip_w"], np.abs(u) - mw)
    img = _paint(img, _coverage(lip), dark * 0.9)
    # Open mouth: a dark ellipse hanging below the lip line, its height set by ``open``.
    mouth = _ellipse_sd(u, v, 0.0, my + 0.6 * q["curve"] * 0.4 + 0.45 * opening, mw * 0.8, 0.15 + opening)
    img = _paint(img, _coverage(mouth) * np.clip(opening / 0.6, 0.0, 1.0), dark * 0.45)

    # Lighting: directional gradient, contrast about the mean, gamma; then sensor noise.
    img = img * (1.0 + q["light"] * (q["light_x"] * xs + q["light_y"] * ys) / IMG_SIZE)
    mean = img.mean(axis=(1, 2), keepdims=True)
    img = np.clip((img - mean) * q["contrast"] + mean, 0.0, 255.0)
    img = 255.0 * (img / 255.0) ** q["gamma"]
    img = img + rng.standard_normal(img.shape, dtype=np.float32) * q["noise"]
    # Occlusion patch (image coordinates, unaffected by pose).
    px, py = xs + (IMG_SIZE - 1) / 2, ys + (IMG_SIZE - 1) / 2
    box = ((px >= q["occ_x"]) & (px < q["occ_x"] + q["occ_w"]) & (py >= q["occ_y"]) & (py < q["occ_y"] + q["occ_h"]))
    img = np.where(box & (q["occluded"] > 0), q["occ_val"], img)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _class_counts(n: int) -> np.ndarray:
    """Exactly ``n`` labels split in FER-2013 Training proportions (largest remainder)."""
    exact = FER_TRAIN_PROBS * n
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]] += 1
    return counts


def generate(n: int = 6000, seed: int = 0,
             split_fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> FERData:
    """Draw ``n`` synthetic faces with FER-2013 class frequencies.

    Args:
        n: Number of images.
        seed: Seed of everything random; the same seed gives identical bytes, different seeds differ.
        split_fractions: Fractions of each class assigned to Training, PublicTest and PrivateTest (normalised).
            The split is stratified: every class with at least 3 images (all classes once ``n >= 250``)
            appears in every split with a non-zero fraction.

    Returns:
        ``FERData`` with uint8 ``[n, 48, 48]`` images, int64 labels, int8 usage codes and ids
        ``synthetic:<seed>:<i>``.

    Raises:
        DataError: If ``n`` is negative or ``split_fractions`` is not three non-negative numbers with a
            positive sum.
    """
    fractions = np.asarray(split_fractions, dtype=np.float64)
    if n < 0:
        raise DataError(f"n must be >= 0, got {n}")
    if fractions.shape != (3,) or (fractions < 0).any() or fractions.sum() <= 0:
        raise DataError(f"split_fractions must be 3 non-negative numbers with a positive sum, got {split_fractions}")
    fractions = fractions / fractions.sum()
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(CLASSES)), _class_counts(n)))
    usage = np.zeros(n, dtype=np.int8)
    for c in range(len(CLASSES)):
        members = rng.permutation(np.flatnonzero(labels == c))
        k = len(members)
        n_split = np.floor(fractions * k + 0.5).astype(np.int64)
        if k >= 3:  # every split with a non-zero fraction gets at least one image, Training keeps the rest
            n_split[1:] = np.where(fractions[1:] > 0, np.maximum(n_split[1:], 1), 0)
        n_split[1:] = np.minimum(n_split[1:], [k, k - min(n_split[1], k)])
        usage[members[: n_split[1]]] = 1
        usage[members[n_split[1]: n_split[1] + n_split[2]]] = 2
    params = _draw_params(labels, rng)
    images = np.empty((n, IMG_SIZE, IMG_SIZE), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        sl = slice(start, start + _CHUNK)
        images[sl] = _render({k: v[sl] for k, v in params.items()}, rng)
    ids = np.array([f"synthetic:{seed}:{i}" for i in range(n)], dtype=object)
    return FERData(images, labels.astype(np.int64), usage, ids)


def write_csv(path: str | Path, data: FERData) -> Path:
    """Write ``data`` as a Kaggle ``fer2013.csv`` (header ``emotion,pixels,Usage``), atomically.

    Args:
        path: Destination file; its folder is created if missing.
        data: The dataset to write.

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    digits = np.char.mod("%d", data.images.reshape(len(data), -1))
    usage = np.asarray(USAGES)[data.usage]
    lines = [f"{lab},{' '.join(pix)},{use}" for lab, pix, use in zip(data.labels.tolist(), digits, usage,
                                                                        strict=True)]
    atomic_write_text(path, "\n".join(["emotion,pixels,Usage", *lines]) + "\n")
    return path


def write_folders(root: str | Path, data: FERData) -> Path:
    """Write ``data`` in the Kaggle image-folder layout, as lossless PNGs.

    Training images go to ``train/<class>/Training_<i>.png``, PublicTest and PrivateTest images to
    ``test/<class>/PublicTest_<i>.png`` and ``test/<class>/PrivateTest_<i>.png``; ``i`` is the row index.

    Args:
        root: Folder to write under (created if missing).
        data: The dataset to write.

    Returns:
        ``root``.
    """
    from PIL import Image

    root = Path(root)
    for i, (img, lab, use) in enumerate(zip(data.images, data.labels, data.usage, strict=True)):
        folder = root / ("train" if use == 0 else "test") / CLASSES[lab]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(folder / f"{USAGES[use]}_{i}.png")
    return root


def main(argv: list[str] | None = None) -> None:
    """Command line: write ``DIR/fer2013.csv`` (and with ``--folders`` the image folders) and print counts.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).
    """
    p = argparse.ArgumentParser(prog="python -m fer_ray.data.synthetic",
                                description="Write the synthetic FER-like dataset as a Kaggle fer2013.csv.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=6000, help="number of images (default 6000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--folders", action="store_true", help="also write the train/ and test/ image folders")
    args = p.parse_args(argv)
    data = generate(args.n, seed=args.seed)
    path = write_csv(Path(args.out) / "fer2013.csv", data)
    print(f"wrote {path}: {len(data)} images (seed {args.seed})")
    for u, name in enumerate(USAGES):
        counts = data.class_counts(name)
        print(f"  {name:<11} {int((data.usage == u).sum()):>6}  " + " ".join(f"{c}={k}" for c, k in
                                                                             zip(CLASSES, counts, strict=True)))
    if args.folders:
        print(f"wrote {write_folders(Path(args.out), data)}/{{train,test}}/<class>/*.png")


if __name__ == "__main__":
    main()
