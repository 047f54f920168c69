"""Data: loaders for every FER-2013 format, the synthetic set, splits, a run's prepared dataset
(``prepare_dataset``, ``fer_ray.data.prepare``) and batch augmentation."""

from __future__ import annotations

from pathlib import Path

from fer_ray.data.dataset import CLASSES, IMG_SIZE, SPLITS, USAGES, DataError, FERData, split_indices
from fer_ray.data.prepare import prepare_dataset

__all__ = ["CLASSES", "IMG_SIZE", "SPLITS", "USAGES", "DataError", "FERData", "load_data", "prepare_dataset",
           "split_indices"]


def load_data(cfg) -> FERData:
    """Load ``cfg.path`` (a ``DataConfig``), or when it is ``None`` draw the synthetic set, write it as a Kaggle
    ``fer2013.csv`` under ``cfg.cache_dir`` (once) and load that file through the real CSV reader. Then apply
    ``cfg.ferplus`` (FER+ majority-vote labels, ``fer_ray.data.ferplus``) and ``cfg.dedup``
    (``fer_ray.data.quality.dedup``), each printing one line of what it changed."""
    from fer_ray.data.ingest import load_dataset

    if cfg.path is not None:
        data = load_dataset(cfg.path, fmt=cfg.format, cache_dir=cfg.cache_dir, on_bad_row=cfg.on_bad_row)
    else:
        from fer_ray.data import synthetic

        root = Path(cfg.cache_dir or ".cache/fer_ray") / f"synthetic-n{cfg.synthetic_n}-s{cfg.synthetic_seed}"
        csv = root / "fer2013.csv"
        if not csv.is_file():
            synthetic.write_csv(csv, synthetic.generate(cfg.synthetic_n, seed=cfg.synthetic_seed))
        data = load_dataset(csv, fmt="csv", cache_dir=cfg.cache_dir)
    if getattr(cfg, "ferplus", None):
        from fer_ray.data.ferplus import apply_ferplus

        data, info = apply_ferplus(data, cfg.ferplus)
        print(f"FER+ labels from {cfg.ferplus}: kept {info['kept']} of {info['rows']} images "
              f"({info['dropped']} dropped: contempt/unknown/not-a-face/tie; {info['changed']} relabelled)")
    mode = getattr(cfg, "dedup", "none")
    if mode != "none":
        from fer_ray.data.quality import dedup, describe_dedup

        data, info = dedup(data, mode, threshold=cfg.near_dup_threshold)
        print(describe_dedup(info))
    return data
