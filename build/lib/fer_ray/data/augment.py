"""Batch transforms on the training device: uint8 faces in, normalised model input out.

``Preprocess`` turns a uint8 ``[B, 48, 48]`` batch into the float ``[B, C, S, S]`` tensor a model expects
(resize to its input size, or its center crop; stack grey to its channel count, normalise with its mean/std from
``model.fer_cfg``): the one preprocessing of training, scoring and the exported graph. ``Augment`` applies
per-sample random flip / affine / jitter / resized crop / erasing to whole batches with kornia, one kernel call per
op for the batch, before ``Preprocess``; or, with ``alternate_flip``, airbench's deterministic flips (each image
flipped in the epochs of its own parity, from a hash of its position: ``flip_phase``). Nothing here loops over
samples.
"""

from __future__ import annotations

import warnings

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import nn

from fer_ray.config import AugmentConfig
from fer_ray.data.dataset import IMG_SIZE


def spatial_size(x: torch.Tensor) -> tuple[int, int]:
    """``(H, W)`` of ``x`` as ints. A trace (``torch.onnx.export``, ``torch.jit.trace``) fixes them (only the batch
    axis is dynamic), so branching on them is sound there; its warning about it is silenced."""
    if not torch.jit.is_tracing():
        return int(x.shape[-2]), int(x.shape[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return int(x.shape[-2]), int(x.shape[-1])


def resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``[n_out, n_in]`` matrix of the 1-D resize ``Preprocess`` does (bilinear, ``align_corners=False``,
    antialiased when shrinking): ``F.interpolate``'s own weights, read off by resizing the identity."""
    eye = torch.eye(n_in).view(1, 1, n_in, n_in)
    return F.interpolate(eye, size=(n_out, n_in), mode="bilinear", align_corners=False, antialias=n_out < n_in)[0, 0]


class Preprocess(nn.Module):
    """uint8 ``[B, H, W]`` → normalised float ``[B, in_chans, img_size, img_size]``.

    The one implementation of a model's input preprocessing: training, evaluation and TTA scoring call it, and the
    exported graph (``fer_ray.export.MemberNet``) holds it, so its ops are ONNX-exportable: the resize is two matrix
    products with ``resize_matrix`` (ONNX's opset-17 ``Resize`` has no antialiasing); those of an ``in_size``
    square input are buffers, other input sizes get theirs when met."""

    def __init__(self, img_size: int, in_chans: int, mean: tuple[float, ...], std: tuple[float, ...],
                 center_crop: bool = False, in_size: int = IMG_SIZE):
        super().__init__()
        self.img_size, self.in_chans, self.center_crop, self.in_size = img_size, in_chans, center_crop, in_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        rows = resize_matrix(in_size, img_size)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", rows.t().contiguous(), persistent=False)

    @classmethod
    def for_model(cls, fer_cfg: dict) -> Preprocess:
        return cls(fer_cfg["img_size"], fer_cfg["in_chans"], tuple(fer_cfg["mean"]), tuple(fer_cfg["std"]),
                   center_crop=fer_cfg.get("input") == "center_crop")

    center_crop = False
    """Take the center ``img_size`` crop of a larger input instead of resizing it (``TrainConfig.input``)."""

    @staticmethod
    def to_float(images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, H, W]`` (or float ``[B, 1, H, W]``) → float ``[B, 1, H, W]`` in [0, 1]."""
        if images.dtype == torch.uint8:
            images = images.unsqueeze(1).float().div_(255.0)
        return images

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, C, H, W]`` resized to ``img_size``² as ``R @ x @ Cᵀ`` (``resize_matrix`` of each axis)."""
        h, w = spatial_size(x)
        if (h, w) == (self.in_size, self.in_size):
            rows, cols = self.rows, self.cols
        else:
            rows = resize_matrix(h, self.img_size).to(x.device)
            cols = resize_matrix(w, self.img_size).t().to(x.device)
        return torch.matmul(torch.matmul(rows.to(x.dtype), x), cols.to(x.dtype))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.to_float(images)
        h, w = spatial_size(x)
        if self.center_crop and min(h, w) > self.img_size:
            top, left = (h - self.img_size) // 2, (w - self.img_size) // 2
            x = x[..., top:top + self.img_size, left:left + self.img_size]
            h = w = self.img_size
        if (h, w) != (self.img_size, self.img_size):
            x = self.resize(x)
        x = x.expand(-1, self.in_chans, -1, -1)
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)


def flip_phase(idx: torch.Tensor, seed: int) -> torch.Tensor:
    """A fixed pseudo-random bit (0/1, int64) per image position ``idx`` for ``seed``: an integer hash computed on
    ``idx``'s device (int64 arithmetic wraps), the same on every device, rank and resumed run."""
    h = idx.long() * 1103515245 + (seed * 2654435761 + 12345) % 2**31
    h = h ^ (h >> 13)
    h = h * 1274126177
    return (h ^ (h >> 16)) >> 7 & 1


def alternating_flip(x: torch.Tensor, idx: torch.Tensor, epoch: int, seed: int) -> torch.Tensor:
    """``x`` ``[B, C, H, W]`` with image ``i`` mirrored when ``flip_phase(idx[i], seed)`` differs from ``epoch``'s
    parity: every image alternates between its two orientations from one epoch to the next."""
    flip = (flip_phase(idx, seed) ^ (epoch & 1)).bool().view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)


class Augment(nn.Module):
    """Per-sample random augmentation of float ``[B, 1, H, W]`` batches in [0, 1] (kornia)."""

    def __init__(self, cfg: AugmentConfig, crop: int = 0):
        """``crop``: also take a random ``crop``×``crop`` window of every image (``TrainConfig.input:
        center_crop``), before erasing."""
        super().__init__()
        s = cfg.strength
        ops: list[nn.Module] = []
        self.alternate_flip = cfg.alternate_flip
        if cfg.hflip > 0 and not cfg.alternate_flip:
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
    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None, epoch: int = 0, seed: int = 0) -> torch.Tensor:
        """Augment ``x``; ``idx`` (the images' positions in the split), ``epoch`` and ``seed`` drive
        ``alternate_flip``, which needs them."""
        if self.alternate_flip:
            if idx is None:
                raise ValueError("alternate_flip needs the batch's image positions (idx)")
            x = alternating_flip(x, idx, epoch, seed)
        return self.ops(x).clamp_(0.0, 1.0) if len(self.ops) else x
