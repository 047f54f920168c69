"""Batch transforms on the training device: uint8 faces in, normalised model input out.

``Preprocess`` turns a uint8 ``[B, 48, 48]`` batch into the float ``[B, C, S, S]`` tensor a model expects
(resize to its input size, stack grey to its channel count, normalise with its mean/std from
``model.fer_cfg``). ``Augment`` applies per-sample random flip / affine / jitter / resized crop / erasing to
whole batches with kornia, one kernel call per op for the batch, before ``Preprocess``. Nothing here loops over samples.
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import nn

from fer_ray.config import AugmentConfig
from fer_ray.data.dataset import IMG_SIZE


class Preprocess(nn.Module):
    """uint8 ``[B, H, W]`` → normalised float ``[B, in_chans, img_size, img_size]``."""

    def __init__(self, img_size: int, in_chans: int, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.img_size, self.in_chans = img_size, in_chans
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    @classmethod
    def for_model(cls, fer_cfg: dict) -> Preprocess:
        pre = cls(fer_cfg["img_size"], fer_cfg["in_chans"], tuple(fer_cfg["mean"]), tuple(fer_cfg["std"]))
        pre.center_crop = fer_cfg.get("input") == "center_crop"
        return pre

    center_crop = False
    """Take the center ``img_size`` crop of a larger input instead of resizing it (``TrainConfig.input``)."""

    def to_float(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, H, W]`` (or float ``[B, 1, H, W]``) → float ``[B, 1, H, W]`` in [0, 1]."""
        if images.dtype == torch.uint8:
            images = images.unsqueeze(1).float().div_(255.0)
        return images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.to_float(images)
        if self.center_crop and min(x.shape[-2:]) > self.img_size:
            top, left = (x.shape[-2] - self.img_size) // 2, (x.shape[-1] - self.img_size) // 2
            x = x[..., top:top + self.img_size, left:left + self.img_size]
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > self.img_size)
        x = x.expand(-1, self.in_chans, -1, -1)
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)


class Augment(nn.Module):
    """Per-sample random augmentation of float ``[B, 1, H, W]`` batches in [0, 1] (kornia)."""

    def __init__(self, cfg: AugmentConfig, crop: int = 0):
        """``crop``: also take a random ``crop``×``crop`` window of every image (``TrainConfig.input:
        center_crop``), before erasing."""
        super().__init__()
        s = cfg.strength
        ops: list[nn.Module] = []
        if cfg.hflip > 0:
            ops.append(K.RandomHorizontalFlip(p=cfg.hflip))
        if s > 0 and (cfg.rotate or cfg.translate or cfg.scale or cfg.shear):
            ops.append(K.RandomAffine(
                degrees=cfg.rotate * s,
                translate=(cfg.translate * s, cfg.translate * s) if cfg.translate else None,
                scale=(1 - cfg.scale * s, 1 + cfg.scale * s) if cfg.scale else None,
                shear=cfg.shear * s if cfg.shear else None,
                padding_mode="border", p=cfg.affine_p))
        if s > 0 and (cfg.brightness or cfg.contrast):
            ops.append(K.ColorJiggle(brightness=cfg.brightness * s, contrast=cfg.contrast * s, p=cfg.jitter_p))
        if cfg.resized_crop > 0:  # Augment sees the stored 48×48 faces, before Preprocess resizes them
            ops.append(K.RandomResizedCrop(size=(IMG_SIZE, IMG_SIZE), scale=(0.7, 1.0), p=cfg.resized_crop))
        if crop:
            ops.append(K.RandomCrop((crop, crop), p=1.0))
        if cfg.erasing > 0:
            ops.append(K.RandomErasing(scale=(0.02, 0.2), p=cfg.erasing))
        self.ops = nn.Sequential(*ops)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops(x).clamp_(0.0, 1.0) if len(self.ops) else x
