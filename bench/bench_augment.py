"""Benchmark 1: augmented training images/s — fer_ray's batched kornia pipeline on uint8 tensors vs the
seed-style per-image PIL pipeline (ToPILImage → RandomRotation → RandomHorizontalFlip → RandomAffine →
ToTensor → Normalize) through a DataLoader with 2 workers. Same augmentation ranges, same process. A third figure
bounds what any batched implementation can reach: one ``affine_grid`` + ``grid_sample`` per batch with flip,
rotation, scale and shift folded into one matrix, then normalise (the resampling every geometric augmentation
needs)."""

from __future__ import annotations

import numpy as np
import torch
from common import emit, parser, timed
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from fer_ray.config import AugmentConfig
from fer_ray.data.augment import Augment, Preprocess


class SeedStyle(Dataset):
    def __init__(self, images: np.ndarray):
        self.images = images
        self.tf = T.Compose([T.ToPILImage(), T.RandomRotation(10), T.RandomHorizontalFlip(),
                             T.RandomAffine(0, translate=(0.1, 0.1), scale=(0.9, 1.1)), T.ToTensor(),
                             T.Normalize((0.5,), (0.25,))])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.tf(self.images[i]), 0


def baseline(images: np.ndarray, batch: int) -> None:
    for _x, _y in DataLoader(SeedStyle(images), batch_size=batch, shuffle=True, num_workers=2):
        pass


def fer_ray_pipeline(images: torch.Tensor, batch: int) -> None:
    aug = Augment(AugmentConfig(hflip=0.5, rotate=10, translate=0.1, scale=0.1))
    pre = Preprocess(48, 1, (0.5,), (0.25,))
    order = torch.randperm(len(images))
    for lo in range(0, len(images), batch):
        pre(aug(pre.to_float(images[order[lo:lo + batch]])))


def one_resample(images: torch.Tensor, batch: int) -> None:
    import math

    import torch.nn.functional as F

    for lo in range(0, len(images), batch):
        x = images[lo:lo + batch].unsqueeze(1).float()
        b = len(x)
        ang, scale = (torch.rand(b) * 2 - 1) * math.radians(10), 1 + (torch.rand(b) * 2 - 1) * 0.1
        shift, flip = (torch.rand(b, 2) * 2 - 1) * 0.2, torch.where(torch.rand(b) < 0.5, -1.0, 1.0)
        c, s = torch.cos(ang) / scale, torch.sin(ang) / scale
        rows = [torch.stack([c * flip, -s, shift[:, 0]], 1), torch.stack([s * flip, c, shift[:, 1]], 1)]
        theta = torch.stack(rows, 1)
        y = F.grid_sample(x, F.affine_grid(theta, x.shape, align_corners=False), padding_mode="border",
                          align_corners=False)
        y.mul_(1 / (255 * 0.25)).sub_(2.0)


def main() -> None:
    args = parser(__doc__).parse_args()
    n = 256 if args.smoke else 8192
    batch = 64 if args.smoke else 256
    images = np.random.default_rng(0).integers(0, 256, (n, 48, 48), dtype=np.uint8)
    t_base = timed(lambda: baseline(images, batch))
    t_ours = timed(lambda: fer_ray_pipeline(torch.from_numpy(images), batch), repeat=1 if args.smoke else 3)
    t_one = timed(lambda: one_resample(torch.from_numpy(images), batch), repeat=1 if args.smoke else 3)
    emit("augment", {"images": n, "baseline_img_s": n / t_base, "fer_ray_img_s": n / t_ours,
                     "one_grid_sample_img_s": n / t_one, "speedup": t_base / t_ours,
                     "bound_speedup": t_base / t_one, "target": ">= 10x"}, args)


if __name__ == "__main__":
    main()
