"""ResNet family for small grayscale faces."""

from __future__ import annotations

import torch
from torch import nn

from fer_ray.models._registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.short = (nn.Identity() if stride == 1 and cin == cout else
                      nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.short(x))


class ResNetFER(nn.Module):
    def __init__(self, num_classes: int, in_chans: int, widths=(64, 128, 256, 512), drop_rate: float = 0.0):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks += [BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w)]
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(drop_rate),
                                  nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


@register_model(in_chans=1, img_size=48)
def resnet18_fer(num_classes: int = 7, in_chans: int = 1, img_size: int = 48, drop_rate: float = 0.2) -> nn.Module:
    """ResNet-18 for 48 px: 3×3 stride-1 stem, 4 stages × 2 basic blocks 64/128/256/512, no stem pooling."""
    return ResNetFER(num_classes, in_chans, drop_rate=drop_rate)
