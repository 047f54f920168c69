"""Benchmark 14: time to accuracy on the real data. A seed-style notebook pipeline (per-image PIL transforms in a
``DataLoader``, AdvancedEmotionNet, Adam 1e-3, batch 64: what the project's seed notebooks did) trains for a fixed
wall budget (30 minutes) and records the best validation accuracy it reached; then fer_ray's CPU reference recipe
(``--sweep``'s train config, default ``sweeps/fer2013_cpu_v2.yaml``: bf16 autocast, EMA hook; run by
``fer_ray.loop.TrainingRun``: batched uint8 augmentation on the device, channels-last) trains until its validation
accuracy (raw weights) reaches that figure. Same process, same train/val split (fer_ray's: leakage dedup,
near-duplicate-grouped val), same machine; wall clock from the first step, data already loaded on both sides. The
ratio is baseline minutes / fer_ray minutes."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from common import emit, parser
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fer_ray.config import load_sweep
from fer_ray.data import prepare_dataset
from fer_ray.loop import EMA, Hook, TrainingRun
from fer_ray.models import create_model

REPO = Path(__file__).resolve().parent.parent
REPO_SWEEP = REPO / "sweeps" / "fer2013_cpu_v2.yaml"
REAL = REPO.parent / "shared" / "data" / "fer2013"


class FaceImages(Dataset):
    """uint8 faces as PIL images through per-image torchvision transforms, as a notebook would."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, train: bool):
        import torchvision.transforms as T

        self.images, self.labels = images, labels
        aug = [T.RandomHorizontalFlip(), T.RandomRotation(10)] if train else []
        self.transform = T.Compose([*aug, T.ToTensor(), T.Normalize((0.5,), (0.25,))])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def baseline(images, labels, splits, budget_s: float | None, epochs: int | None = None,
             model_name: str = "advanced_emotion_net") -> tuple[float, list[tuple[float, float]]]:
    """Best val accuracy of the seed-style pipeline within ``budget_s`` (``None``: no wall budget) or ``epochs``
    epochs, whichever ends first; (seconds, val acc) after every epoch."""
    torch.manual_seed(0)
    budget_s = float("inf") if budget_s is None else budget_s
    model = create_model(model_name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    tr, va = splits["train"], splits["val"]
    train = DataLoader(FaceImages(images[tr], labels[tr], True), batch_size=64, shuffle=True, num_workers=2,
                       persistent_workers=True)
    val = DataLoader(FaceImages(images[va], labels[va], False), batch_size=256, num_workers=2,
                     persistent_workers=True)
    curve, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < budget_s and (epochs is None or len(curve) < epochs):
        model.train()
        for x, y in train:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if time.perf_counter() - t0 > budget_s:
                break
        model.eval()
        with torch.inference_mode():
            correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in val)
        curve.append((time.perf_counter() - t0, correct / len(va)))
        print(f"[baseline] {curve[-1][0] / 60:.1f} min: val_acc {curve[-1][1]:.4f}", flush=True)
    return max(a for _, a in curve), curve


MILESTONES = (0.65, 0.68)
"""Val accuracies whose minutes are reported besides the baseline's figure (issue 24: minutes to 0.65 and 0.68)."""


class StopAt(Hook):
    """Ends the run once every target is reached (the baseline's figure and ``MILESTONES``) or past ``limit_s``."""

    def __init__(self, targets: list[float], t0: float, limit_s: float | None):
        self.targets, self.t0, self.limit_s, self.curve = targets, t0, limit_s, []

    def after_epoch(self, run: TrainingRun, metrics: dict) -> None:
        self.curve.append((time.perf_counter() - self.t0, metrics["val_acc"]))
        print(f"[fer_ray] {self.curve[-1][0] / 60:.1f} min: val_acc {metrics['val_acc']:.4f}", flush=True)
        over = self.limit_s is not None and self.curve[-1][0] > self.limit_s
        run.stop = max(a for _, a in self.curve) >= max(self.targets) or over

    def minutes_to(self, target: float) -> float | None:
        return next((t / 60 for t, a in self.curve if a >= target), None)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--data", default=str(REAL), help="FER-2013 image folders (default: ../shared/data/fer2013)")
    p.add_argument("--minutes", type=float, default=30.0, help="the baseline's wall budget")
    p.add_argument("--sweep", default=str(REPO_SWEEP), help="the sweep whose train config is fer_ray's recipe")
    p.add_argument("--fer-ray-minutes", type=float, default=None,
                   help="fer_ray's wall limit (default: the baseline's budget); it stops earlier once it has reached "
                        "the baseline's figure and every milestone (val 0.65, 0.68), or its epochs end")
    args = p.parse_args()
    torch.set_num_threads(2)
    sweep = load_sweep(args.sweep)
    if args.smoke:  # synthetic faces, fixed work (1 baseline epoch, at most 2 of fer_ray's), no wall budget
        data_cfg = sweep.data.replace(path=None, synthetic_n=200, cache_dir="/tmp/fer_bench_cache")
        cfg = sweep.train.replace(epochs=2, model="basic_cnn")
    else:
        data_cfg = sweep.data.replace(path=args.data)
        budget, cfg = args.minutes * 60, sweep.train
    data, splits = prepare_dataset(data_cfg)
    if args.smoke:  # the wall the one epoch took stands for the budget, so the ratio below is computed the same way
        target, base_curve = baseline(data.images, data.labels, splits, None, epochs=1, model_name="basic_cnn")
        budget = base_curve[-1][0]
    else:
        target, base_curve = baseline(data.images, data.labels, splits, budget)
    arrays = {"images": data.images, "labels": data.labels, "splits": splits}
    t0 = time.perf_counter()
    run = TrainingRun(cfg, arrays, torch.device("cpu"))
    limit = None if args.smoke else 60 * args.fer_ray_minutes if args.fer_ray_minutes else budget
    stop = StopAt([target, *MILESTONES], t0, limit_s=limit)
    run.fit(([EMA(cfg.ema.decay, cfg.ema.warmup)] if cfg.ema.decay else []) + [stop])
    reached = next((t for t, a in stop.curve if a >= target), None)
    emit("time_to_accuracy", {"images_train": len(splits["train"]), "images_val": len(splits["val"]),
                              "baseline_minutes": budget / 60, "baseline_best_val_acc": target,
                              "baseline_curve": base_curve, "fer_ray_recipe": f"{Path(args.sweep).name} train",
                              "fer_ray_model": cfg.model, "fer_ray_amp": cfg.amp,
                              "fer_ray_minutes_to_target": None if reached is None
                              else reached / 60, "fer_ray_curve": stop.curve,
                              "speedup": None if reached is None else budget / reached,
                              "fer_ray_minutes_to": {f"{m:.2f}": stop.minutes_to(m) for m in MILESTONES},
                              "target": ">= 10x"}, args)


if __name__ == "__main__":
    main()
