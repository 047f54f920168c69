"""ResNet family for small grayscale faces: ``resnet18_fer`` (48 px stem) and ``resnet_fer`` (ImageNet stem).

Both are ResNet-18 layouts (four stages of two basic blocks, 64/128/256/512, 1×1 projection shortcuts where the
shape changes) that differ in the stem: ``resnet18_fer`` keeps full resolution with a 3×3 stride-1 stem and no
max-pool, ``resnet_fer`` downsamples 4× with the ImageNet 7×7 stride-2 stem and max-pool.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fer_ray.models._registry import register_model


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with a residual connection (1×1 conv-BN projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.short = (nn.Identity() if stride == 1 and cin == cout else
                      nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.short(x))


def small_stem(in_chans: int, width: int) -> nn.Sequential:
    """3×3 stride-1 conv-BN-ReLU: keeps the full 48 px resolution."""
    return nn.Sequential(nn.Conv2d(in_chans, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                         nn.ReLU(inplace=True))


def imagenet_stem(in_chans: int, width: int) -> nn.Sequential:
    """7×7 stride-2 conv-BN-ReLU then 3×3 stride-2 max-pool: 4× downsampling."""
    return nn.Sequential(nn.Conv2d(in_chans, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                         nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))


class ResNetFER(nn.Module):
    """Stem, stages of basic blocks (first stage stride 1, the rest stride 2), global avg pool, dropout, FC."""

    def __init__(self, num_classes: int = 7, in_chans: int = 1, widths: Sequence[int] = (64, 128, 256, 512),
                 depths: Sequence[int] = (2, 2, 2, 2), drop_rate: float = 0.0, stem: str = "small"):
        super().__init__()
        self.stem = {"small": small_stem, "imagenet": imagenet_stem}[stem](in_chans, widths[0])
        blocks: list[nn.Module] = []
        cin = widths[0]
        for i, (w, d) in enumerate(zip(widths, depths)):
            blocks += [BasicBlock(cin if j == 0 else w, w, 2 if i > 0 and j == 0 else 1) for j in range(d)]
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(drop_rate),
                                  nn.Linear(cin, num_classes))

    def stem_conv(self) -> nn.Conv2d:
        """The stem's conv (``fer_ray.whiten``: its first ``2·C·k²`` filters can be whitened)."""
        return self.stem[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


@register_model(in_chans=1, img_size=48)
def resnet18_fer(num_classes: int = 7, in_chans: int = 1, img_size: int = 48, drop_rate: float = 0.2,
                 **kwargs) -> nn.Module:
    """ResNet-18 for 48 px: 3×3 stride-1 stem, no max-pool, 4 stages × 2 basic blocks 64/128/256/512."""
    return ResNetFER(num_classes, in_chans, drop_rate=drop_rate, stem="small", **kwargs)


@register_model(in_chans=1, img_size=48)
def resnet_fer(num_classes: int = 7, in_chans: int = 1, img_size: int = 48, drop_rate: float = 0.5,
               **kwargs) -> nn.Module:
    """ResNetFER: 7×7 stride-2 stem + max-pool, 4 stages × 2 basic blocks 64/128/256/512, dropout 0.5."""
    return ResNetFER(num_classes, in_chans, drop_rate=drop_rate, stem="imagenet", **kwargs)
