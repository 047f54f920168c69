"""fer_ray's engine layer imports and trains with Ray (and fvcore) absent, as on the GPU check machine.

The GPU machine that runs ``scripts/gpu_check.py`` has no Ray (its wheel is larger than what a run may carry) and
no fvcore unless its wheel travels. A fresh interpreter with both blocked from import proves that the engine,
models, data, augmentation, TTA, checkpoint, metrics and GPU modules never import them at module level, and that
``fer_ray.flops.count_gmacs`` degrades to NaN instead of raising.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess  # a fresh interpreter with ray and fvcore blocked
ROOT = Path(__file__).resolve().parents[1]

BLOCKED = ("ray", "fvcore")
MODULES = ("fer_ray.engine", "fer_ray.models", "fer_ray.data", "fer_ray.data.augment", "fer_ray.data.synthetic",
           "fer_ray.tta", "fer_ray.flops", "fer_ray.checkpoint", "fer_ray.metrics", "fer_ray.gpu")

CHILD = r"""
import importlib, importlib.abc, json, math, sys

BLOCKED = {blocked!r}
assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED], "a blocked package was imported at start-up"


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by test_no_ray)", name=name)
        return None


sys.meta_path.insert(0, Block())
for name in {modules!r}:
    importlib.import_module(name)

import torch
from fer_ray import engine, flops, tta
from fer_ray.config import AugmentConfig, TrainConfig
from fer_ray.data import split_indices, synthetic
from fer_ray.data.augment import Augment, Preprocess
from fer_ray.models import create_model

torch.manual_seed(0)
data = synthetic.generate(64, seed=0)
idx = split_indices(data, 0.25, seed=0)["train"]
images, labels = torch.from_numpy(data.images[idx]), torch.from_numpy(data.labels[idx])
model = create_model("basic_cnn", num_classes=7, in_chans=1, img_size=48)
cfg = TrainConfig(model="basic_cnn", batch_size=16, num_workers=0, augment=AugmentConfig())
stats = engine.train_one_epoch(model, images, labels, engine.build_optimizer(cfg, model.parameters()),
                               Preprocess.for_model(model.fer_cfg), Augment(cfg.augment), cfg, epoch=0)
logits = tta.tta_logits(model, images[:4], ["identity", "hflip"])
gmacs = flops.count_gmacs(model)
print(json.dumps({{"stats": stats, "tta_shape": list(logits.shape), "gmacs": gmacs,
                  "fvcore_error": flops.FVCORE_ERROR, "params": flops.count_params(model),
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}}))
"""


def test_engine_layer_runs_without_ray_or_fvcore():
    code = CHILD.format(blocked=BLOCKED, modules=MODULES)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loaded"] == []
    assert out["stats"]["images"] > 0 and math.isfinite(out["stats"]["train_loss"])
    assert out["tta_shape"][:2] == [2, 4]
    assert out["gmacs"] is None or math.isnan(out["gmacs"])
    assert "fvcore" in (out["fvcore_error"] or "") and out["params"] > 0
