"""Baseline family from the research series: small CNN baselines, deeper CNNs and the 224 px RGB baselines.

Owns ``baseline_cnn_v1``/``v2``, ``deep_cnn_v1``/``v2``, ``large_cnn_224`` and ``mlp_224``. The 224 px models
expect 3-channel ImageNet-normalised input (the gray image stacked three times); ``large_cnn_224`` pools to 28×28
before its FC so other sizes still run, while ``mlp_224``'s input width follows ``in_chans·img_size²``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fer_ray.models._registry import register_model
from fer_ray.models.cnn import mlp_head, vgg_blocks
from fer_ray.models.timm_models import IMAGENET_MEAN, IMAGENET_STD


class BaselineCNNv1(nn.Module):
    """Two conv5×5 → ReLU → max-pool layers (32, 64), dropout, FC 64·12·12 → 128 → classes."""

    def __init__(self, num_classes: int = 7, in_chans: int = 1, drop_rate: float = 0.3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 32, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Dropout(drop_rate), nn.AdaptiveAvgPool2d(12), nn.Flatten())
        self.head = nn.Sequential(*mlp_head((64 * 12 * 12, 128), num_classes, drop_rate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model(in_chans=1, img_size=48)
def baseline_cnn_v1(num_classes: int = 7, in_chans: int = 1, img_size: int = 48, drop_rate: float = 0.3,
                    **kwargs) -> nn.Module:
    """Baseline CNN v1: conv5×5 32 → pool → conv5×5 64 → pool, dropout 0.3, FC 64·12·12→128, dropout 0.3."""
    return BaselineCNNv1(num_classes, in_chans, drop_rate=drop_rate, **kwargs)


class PooledCNN(nn.Module):
    """Conv blocks → global average pool → MLP head: the shape shared by the v2 baseline and the deep CNNs."""

    def __init__(self, num_classes: int, in_chans: int, blocks: Sequence[Sequence[int]], head: Sequence[int],
                 drop_rate: float, spatial_drop: Sequence[float] = (), batch_norm_head: bool = False):
        super().__init__()
        width = blocks[-1][-1]
        self.features = nn.Sequential(*vgg_blocks(in_chans, blocks, spatial_drop, spatial=True),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(*mlp_head((width, *head), num_classes, drop_rate, batch_norm_head))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model(in_chans=1, img_size=48)
def baseline_cnn_v2(num_classes: int = 7, in_chans: int = 1, img_size: int = 48, drop_rate: float = 0.6,
                    spatial_drop: float = 0.2, **kwargs) -> nn.Module:
    """Baseline CNN v2: conv-BN 64/128/256/512 + pool + Dropout2d 0.2, global avg pool, FC 512→256→128, drop 0.6."""
    blocks = ((64,), (128,), (256,), (512,))
    return PooledCNN(num_classes, in_chans, blocks, (256, 128), drop_rate, (spatial_drop,) * 4, **kwargs)


@register_model(in_chans=1, img_size=48)
def deep_cnn_v1(num_classes: int = 7, in_chans: int = 1, img_size: int = 48, drop_rate: float = 0.5,
                **kwargs) -> nn.Module:
    """Deep CNN v1: 4 double-conv BN blocks 32/64/128/256 + pool, global avg pool, FC 256→512 + BN, dropout 0.5."""
    blocks = ((32, 32), (64, 64), (128, 128), (256, 256))
    return PooledCNN(num_classes, in_chans, blocks, (512,), drop_rate, batch_norm_head=True, **kwargs)


@register_model(in_chans=1, img_size=48)
def deep_cnn_v2(num_classes: int = 7, in_chans: int = 1, img_size: int = 48, drop_rate: float = 0.7,
                spatial_drop: float = 0.1, **kwargs) -> nn.Module:
    """Deep CNN v2: v1 with Dropout2d 0.1 after block 1, last conv 256→192, FC 192→256 + BN, dropout 0.7."""
    blocks = ((32, 32), (64, 64), (128, 128), (256, 192))
    return PooledCNN(num_classes, in_chans, blocks, (256,), drop_rate, (spatial_drop,), batch_norm_head=True,
                     **kwargs)


class LargeCNN(nn.Module):
    """Conv3×3 → ReLU → max-pool at 16/32/64 channels, adaptive pool to 28×28, FC 64·28·28 → 1024 → 512."""

    def __init__(self, num_classes: int = 7, in_chans: int = 3, drop_rate: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_chans
        for w in (16, 32, 64):
            layers += [nn.Conv2d(cin, w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            cin = w
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(28), nn.Flatten())
        self.head = nn.Sequential(*mlp_head((64 * 28 * 28, 1024, 512), num_classes, drop_rate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model(in_chans=3, img_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
def large_cnn_224(num_classes: int = 7, in_chans: int = 3, img_size: int = 224, drop_rate: float = 0.0,
                  **kwargs) -> nn.Module:
    """Large-input CNN baseline: conv 16/32/64 each + max-pool at 224 px, FC 64·28·28→1024→512."""
    return LargeCNN(num_classes, in_chans, drop_rate=drop_rate, **kwargs)


class MLP(nn.Module):
    """Flatten → Linear → ReLU → dropout → Linear."""

    def __init__(self, num_classes: int, in_features: int, hidden: int = 1024, drop_rate: float = 0.0):
        super().__init__()
        self.head = nn.Sequential(nn.Flatten(), *mlp_head((in_features, hidden), num_classes, drop_rate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


@register_model(in_chans=3, img_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
def mlp_224(num_classes: int = 7, in_chans: int = 3, img_size: int = 224, drop_rate: float = 0.0,
            **kwargs) -> nn.Module:
    """Large-input MLP baseline: flatten 3·224·224 → 1024 → classes (input width follows the input size)."""
    return MLP(num_classes, in_chans * img_size * img_size, drop_rate=drop_rate, **kwargs)
