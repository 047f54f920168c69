"""A run's dataset, prepared: loaded (or drawn) once, checked for empty splits, and carved into the run splits
(validation carved from Training by duplicate group). Ray-free: ``fer_ray.cluster.put_dataset`` shares the result
through Ray's object store; the TTA stage, distillation and the benchmarks use it directly."""

from __future__ import annotations

import numpy as np

from fer_ray.config import DataConfig
from fer_ray.data.dataset import DataError, FERData, split_indices


def prepare_dataset(data_cfg: DataConfig) -> tuple[FERData, dict[str, np.ndarray]]:
    """Load (or draw) the dataset of ``data_cfg`` once and carve the run splits."""
    from fer_ray.data import load_data
    from fer_ray.data.ingest import require_splits

    data = load_data(data_cfg)
    require_splits(data, path=data_cfg.path)  # a split the run trains or selects on with zero rows: one line
    groups = None
    if data_cfg.group_duplicates != "none":
        from fer_ray.data import quality

        groups = (quality.near_groups(data, data_cfg.near_dup_threshold) if data_cfg.group_duplicates == "near"
                  else quality.exact_groups(data))
    splits = split_indices(data, data_cfg.val_fraction, data_cfg.split_seed, groups=groups)
    if "val" not in splits:
        raise DataError(f"{data_cfg.path or 'synthetic data'}: no validation images could be carved from Training "
                        f"(val_fraction {data_cfg.val_fraction}; every class needs >= 2 Training images)")
    return data, splits
