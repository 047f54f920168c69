"""Benchmark 12: ``fer-ray predict`` throughput, 10,000 faces on 2 cores: the exported ONNX bundle under ONNX Runtime
vs the same ensemble in torch eager mode as fer_ray scores it (``tta_logits`` per member on its ``inference_model``
copy, then ``apply_fitted``), and vs a per-image loop as a notebook would write it (each face, member and view one
forward pass of the model as given). Same faces, same process; outputs checked equal.

The ensemble has the demo's top-3 shape: basic_cnn@48, basic_cnn@32 and baseline_cnn_v1@40, 2 TTA views
(identity, hflip), mean of logits with a fitted temperature. Weights are random (throughput does not depend on
them); the experiment is built here without Ray and exported with ``fer_ray.export``."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from common import emit, parser, timed

from fer_ray.bundle import load_bundle
from fer_ray.checkpoint import save_checkpoint
from fer_ray.config import SweepConfig, TrainConfig
from fer_ray.data.augment import Preprocess
from fer_ray.data.synthetic import generate, write_csv
from fer_ray.ensemble import EnsembleSpec, apply_fitted, run_ensemble
from fer_ray.experiment import Experiment
from fer_ray.export import export_bundle, load_models, plan_ensemble, reference_outputs
from fer_ray.flops import count_gmacs, count_params
from fer_ray.inference import fill_store
from fer_ray.metrics import softmax
from fer_ray.models import create_model
from fer_ray.predict import PROB_COLUMNS, predict
from fer_ray.sweep import write_setup
from fer_ray.tta import parse_view

MEMBERS = [("basic_cnn", 48), ("basic_cnn", 32), ("baseline_cnn_v1", 40)]
VIEWS = ["identity", "hflip"]


def build_bundle(root: Path, members=MEMBERS, views=VIEWS, n: int = 280) -> Path:
    """An experiment under ``root`` (random-weight members, logits scored in-process, a ``top3`` ensemble of
    ``mean_logits`` + temperature fitted on val) and its ONNX bundle ``root/bundle``."""
    data = generate(n, seed=0)
    idx = np.random.default_rng(0).permutation(n)
    splits = {"train": idx[: n // 3], "val": idx[n // 3: 2 * n // 3], "public_test": idx[2 * n // 3:]}
    exp = root / "exp"
    cfg = SweepConfig.from_dict({"name": "bench", "data": {"synthetic_n": n}, "asha": {"max_t": 1},
                                 "train": {"epochs": 1, "num_workers": 0}, "tta_views": views}, "bench")
    write_setup(cfg, exp, data, splits)
    rows = []
    for i, (arch, size) in enumerate(members):
        torch.manual_seed(i)
        model = create_model(arch, img_size=size).eval()
        config = dict(TrainConfig(model=arch, img_size=size, epochs=1, num_workers=0).to_dict(), in_chans=1)
        ckpt = save_checkpoint(exp / "ck" / f"m{i}", 1, model, config, {"val_acc": 0.5})
        rows.append({"trial_id": f"m{i}", "arch": arch, "img_size": size, "in_chans": 1, "params": count_params(model),
                     "gmacs": count_gmacs(model), "best_val_acc": 0.5 - i / 100, "best_epoch": 1, "epochs_run": 1,
                     "stopped_early": False, "checkpoint": str(ckpt), "config": json.dumps(config)})
    pd.DataFrame(rows).to_parquet(exp / "trials.parquet", index=False)
    fill_store(exp, data, splits, views, json.loads((exp / "split_roles.json").read_text()), progress=False,
               on_ray=False)
    raw = {"name": "top3", "members": [r["trial_id"] for r in rows], "combiner": "mean_logits", "temperature": True}
    if "oof_folds" in EnsembleSpec.__dataclass_fields__:
        raw["oof_folds"] = 0
    run_ensemble(exp, EnsembleSpec.from_dict(raw, "bench"))
    export_bundle(exp, root / "bundle", ensemble="top3")
    return root / "bundle"


@torch.inference_mode()
def per_image_loop(models: list, views: list[str], fitted: dict, faces: np.ndarray) -> np.ndarray:
    """A notebook's loop: every face, member and view on its own, the models as given; ``[N, 7]`` probabilities."""
    pre = [Preprocess.for_model(m.fer_cfg) for m in models]
    fns = [parse_view(v) for v in views]
    out = []
    for face in torch.from_numpy(faces):
        x = face[None].unsqueeze(1).float() / 255
        stack = np.stack([np.mean([m(p(fn(x)))[0].numpy() for fn in fns], axis=0) for m, p in zip(models, pre)])
        out.append(softmax(apply_fitted(stack[:, None], fitted))[0])
    return np.stack(out)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args()
    n, loop_n = (64, 16) if args.smoke else (args.images, args.images)
    threads = torch.get_num_threads()
    tmp = Path(tempfile.mkdtemp(prefix="fer_bench_predict_"))
    try:
        bundle_dir = build_bundle(tmp, n=70 if args.smoke else 280)  # smoke: the fewest the config allows
        data = generate(n, seed=1)
        faces = data.images
        bundle = load_bundle(bundle_dir, threads=threads)
        plan = plan_ensemble(Experiment(tmp / "exp"), "top3")
        models = load_models(plan)
        repeat = 1 if args.smoke else 2
        ort_probs = bundle.predict(faces, args.batch)[0]
        t_ort = timed(lambda: bundle.predict(faces, args.batch), repeat)
        eager_probs = reference_outputs(models, plan.views, plan.fitted, faces, batch_size=args.batch * len(VIEWS))[0]
        t_eager = timed(lambda: reference_outputs(models, plan.views, plan.fitted, faces,
                                                  batch_size=args.batch * len(VIEWS)), repeat)
        t0 = time.perf_counter()
        loop_probs = per_image_loop(models, plan.views, plan.fitted, faces[:loop_n])
        t_loop = (time.perf_counter() - t0) * n / loop_n
        csv = write_csv(tmp / "fer2013.csv", data)
        t0 = time.perf_counter()
        df = predict(bundle, [csv], batch=args.batch, progress=False)
        t_cli = time.perf_counter() - t0
        emit("predict", {"images": n, "members": [f"{a}@{s}" for a, s in MEMBERS], "views": len(VIEWS),
                         "threads": threads, "batch": args.batch, "onnxruntime_s": t_ort, "torch_eager_s": t_eager,
                         "per_image_loop_s": t_loop, "loop_images_timed": loop_n,
                         "faces_per_s_onnxruntime": n / t_ort, "faces_per_s_torch_eager": n / t_eager,
                         "faces_per_s_loop": n / t_loop, "speedup_vs_eager": t_eager / t_ort,
                         "speedup_vs_loop": t_loop / t_ort, "predict_csv_end_to_end_s": t_cli,
                         "max_abs_diff_vs_eager": float(np.abs(ort_probs - eager_probs).max()),
                         "max_abs_diff_vs_loop": float(np.abs(ort_probs[:loop_n] - loop_probs).max()),
                         "max_abs_diff_predict_csv": float(np.abs(df[PROB_COLUMNS].to_numpy() - ort_probs).max()),
                         "target": ">= 1.5x vs torch eager"}, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
