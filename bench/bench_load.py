"""Benchmark 8: dataset load. Real FER-2013 image folders (../shared/data/fer2013): cold parse and cached load.
CSV form: the same 32,298 images written as a Kaggle fer2013.csv, parsed by fer_ray (pyarrow, vectorised)
vs the usual pandas ``read_csv`` + per-row ``str.split`` baseline, in the same process."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from common import emit, parser

from fer_ray.data import FERData
from fer_ray.data.ingest import load_dataset
from fer_ray.data.synthetic import generate, write_csv

REAL = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "fer2013"


def pandas_baseline(csv: Path) -> np.ndarray:
    df = pd.read_csv(csv)
    return np.stack([np.array(p.split(), dtype=np.uint8).reshape(48, 48) for p in df["pixels"]])


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--data", default=str(REAL), help="image-folder root (default: ../shared/data/fer2013)")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fer_bench_"))
    try:
        result = {}
        if args.smoke or not Path(args.data).is_dir():
            data = generate(400, seed=0)
            result["source"] = "synthetic(400)"
        else:
            t0 = time.perf_counter()
            data = load_dataset(args.data, cache_dir=tmp / "cache")
            result["folders_cold_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            again = load_dataset(args.data, cache_dir=tmp / "cache")
            result["folders_cached_s"] = time.perf_counter() - t0
            assert np.array_equal(again.images, data.images)
            result["source"] = str(args.data)
        result["images"] = len(data)
        csv = write_csv(tmp / "fer2013.csv", FERData(data.images, data.labels, data.usage, data.ids))
        t0 = time.perf_counter()
        base = pandas_baseline(csv)
        result["csv_pandas_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours = load_dataset(csv, cache_dir=tmp / "cache")
        result["csv_cold_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_dataset(csv, cache_dir=tmp / "cache")
        result["csv_cached_s"] = time.perf_counter() - t0
        assert np.array_equal(base, ours.images)
        result["csv_speedup_vs_pandas"] = result["csv_pandas_s"] / result["csv_cold_s"]
        result["target"] = "cold < 30 s, cached < 2 s"
        emit("load", result, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
