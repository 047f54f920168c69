"""Exploratory data report: class balance, pixel statistics, duplicates and sample faces of one ``FERData``.

This module owns ``write_eda``, which writes CSV tables, PNG charts and a self-contained ``index.html`` (PNGs
embedded as base64) into one folder; every file is written to a temp file and ``os.replace``d. Duplicate and
blank counts come from ``fer_ray.data.quality.check``.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from fer_ray.atomic import atomic_write_bytes, atomic_write_text
from fer_ray.data.dataset import CLASSES, USAGES, FERData
from fer_ray.figures import data_uri, png_bytes, pyplot

SAMPLES_PER_CLASS = 8


def class_table(data: FERData) -> pd.DataFrame:
    """Images per class (columns) and usage (rows), with a ``total`` column; usages without images are left out."""
    rows = {u: data.class_counts(u) for i, u in enumerate(USAGES) if (data.usage == i).any()}
    df = pd.DataFrame.from_dict(rows, orient="index", columns=list(CLASSES))
    df["total"] = df.sum(axis=1)
    df.index.name = "split"
    return df


def pixel_table(data: FERData) -> pd.DataFrame:
    """Per usage: images, pixel mean and std over all pixels, and the mean per-image std."""
    rows = []
    for i, u in enumerate(USAGES):
        x = data.images[data.usage == i]
        if len(x):
            flat = x.reshape(len(x), -1).astype(np.float32)
            rows.append({"split": u, "images": len(x), "pixel_mean": float(flat.mean()), "pixel_std": float(flat.std()),
                         "mean_image_std": float(flat.std(axis=1).mean())})
    return pd.DataFrame(rows)


def _class_chart(table: pd.DataFrame) -> bytes:
    plt = pyplot()

    counts = table[list(CLASSES)]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(counts)
    x = np.arange(len(CLASSES))
    for k, (split, row) in enumerate(counts.iterrows()):
        a1.bar(x + k * width, row.to_numpy(), width, label=split)
        a2.bar(x + k * width, row.to_numpy() / max(row.sum(), 1), width, label=split)
    for ax, title in ((a1, "images per class"), (a2, "class share within each split")):
        ax.set_xticks(x + width * (len(counts) - 1) / 2, CLASSES, rotation=30)
        ax.set_title(title)
        ax.legend(fontsize=8)
    return png_bytes(fig)


def _sample_grid(data: FERData, seed: int = 0) -> bytes:
    plt = pyplot()

    rng = np.random.default_rng(seed)
    k = SAMPLES_PER_CLASS
    fig, axes = plt.subplots(len(CLASSES), k, figsize=(k * 1.1, len(CLASSES) * 1.2))
    for c, name in enumerate(CLASSES):
        members = np.flatnonzero(data.labels == c)
        pick = rng.choice(members, size=min(k, len(members)), replace=False) if len(members) else members
        for j in range(k):
            ax = axes[c, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(pick):
                ax.imshow(data.images[pick[j]], cmap="gray", vmin=0, vmax=255)
            else:
                ax.axis("off")
        axes[c, 0].set_ylabel(f"{name}\n({len(members)})", fontsize=9)
    fig.suptitle("random samples per class (all splits)")
    return png_bytes(fig)


def _duplicate_grid(data: FERData, groups: pd.DataFrame, n: int = 8) -> bytes | None:
    """First two members of up to ``n`` near-duplicate groups (leaking ones first), side by side."""
    plt = pyplot()

    near = groups[groups.kind == "near"]
    if near.empty:
        return None
    first = near.groupby("group_id").agg(leak=("leakage", "first"), size=("index", "size"))
    ids = first.sort_values(["leak", "size"], ascending=False).index[:n]
    fig, axes = plt.subplots(len(ids), 2, figsize=(3.2, 1.7 * len(ids)), squeeze=False)
    for r, gid in enumerate(ids):
        rows = near[near.group_id == gid].head(2)
        for j, row in enumerate(rows.itertuples()):
            ax = axes[r, j]
            ax.imshow(data.images[row.index], cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{row.split} / {row.emotion}", fontsize=7)
    fig.suptitle("near-duplicate groups (first two members)", fontsize=9)
    return png_bytes(fig)


def write_eda(data: FERData, out_dir: str | Path, check_df: pd.DataFrame | None = None) -> dict[str, Path]:
    """Write the exploratory report of ``data`` into ``out_dir``.

    Args:
        data: The dataset.
        out_dir: Output folder (created if missing).
        check_df: A ``quality.check`` table of ``data``; computed when ``None``.

    Returns:
        Paths by name: ``class_counts`` (CSV), ``class_chart`` (PNG), ``pixel_stats`` (CSV), ``quality``
        (JSON summary), ``samples`` (PNG grid, one row per class), ``near_duplicates`` (PNG, when any) and
        ``html`` (``index.html`` embedding everything).
    """
    from fer_ray.data import quality

    pyplot()  # the Agg backend before any figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = quality.check(data) if check_df is None else check_df
    summary = quality.summarize(groups)
    classes, pixels = class_table(data), pixel_table(data)
    pngs = {"class_chart": _class_chart(classes), "samples": _sample_grid(data),
            "near_duplicates": _duplicate_grid(data, groups)}
    files = {"class_counts": ("class_counts.csv", classes.to_csv().encode()),
             "pixel_stats": ("pixel_stats.csv", pixels.to_csv(index=False).encode()),
             "quality": ("quality_summary.json", (json.dumps(summary, indent=1) + "\n").encode())}
    files |= {k: (f"{k}.png", v) for k, v in pngs.items() if v is not None}
    paths = {}
    for key, (name, payload) in files.items():
        paths[key] = out / name
        atomic_write_bytes(paths[key], lambda f, b=payload: f.write(b))

    def img(key: str) -> str:
        return f"<img src='{data_uri(pngs[key])}'/>" if pngs[key] else ""

    qrows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in summary.items())
    page = ["<!doctype html><html><head><meta charset='utf-8'><title>fer_ray data report</title>",
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
            "td,th{border:1px solid #ccc;padding:3px 6px}</style></head><body>",
            f"<h1>fer_ray data report</h1><p>{len(data)} images, classes: {', '.join(CLASSES)}.</p>",
            "<h2>Class distribution</h2>", classes.to_html(), img("class_chart"),
            "<h2>Pixel statistics</h2>", pixels.to_html(index=False, float_format=lambda x: f"{x:.2f}"),
            "<h2>Duplicates and blanks</h2><p>exact: identical pixels; near: perceptual-hash distance within the "
            "threshold (shift-tolerant); leaking: Training images duplicating a PublicTest/PrivateTest image.</p>",
            f"<table>{qrows}</table>", img("near_duplicates"),
            "<h2>Samples per class</h2>", img("samples"), "</body></html>\n"]
    paths["html"] = out / "index.html"
    atomic_write_text(paths["html"], "\n".join(page))
    return paths
