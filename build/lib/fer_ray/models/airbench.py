"""airbench-style nets for 40-48 px grayscale faces: ``airbench_fer``.

After Keller Jordan's airbench (CIFAR-10 at 94 % in seconds): a small-kernel stem meant to be whitened
(``fer_ray.whiten``: ``2·C·k²`` filters, no padding, GELU), then conv groups of conv3×3 → max-pool → BN → GELU →
conv3×3 → BN → GELU, widths 64/256/256/256 (ResNet-9-like, scaled by ``width``), a global max-pool and a linear head
whose logits are scaled down (airbench's ``1/9``). Four groups halve 47 px to 2 (31 px to 1), so 32-48 px all fit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fer_ray.models._registry import register_model


class ConvGroup(nn.Sequential):
    """conv3×3 → 2×2 max-pool → BN → GELU, then ``depth − 1`` × (conv3×3 → BN → GELU); convs without bias."""

    def __init__(self, cin: int, cout: int, depth: int = 2):
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.MaxPool2d(2),
                                   nn.BatchNorm2d(cout), nn.GELU()]
        for _ in range(depth - 1):
            layers += [nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU()]
        super().__init__(*layers)


class AirbenchNet(nn.Module):
    """Whitenable ``k×k`` stem (``stem_conv()``), ``ConvGroup`` per width, global max-pool, dropout, scaled linear."""

    def __init__(self, num_classes: int = 7, in_chans: int = 1, widths: Sequence[int] = (64, 256, 256, 256),
                 width: float = 1.0, whiten_patch: int = 2, depth: int = 2, drop_rate: float = 0.0,
                 head_scale: float = 1 / 9):
        super().__init__()
        stem = 2 * in_chans * whiten_patch ** 2
        self.whiten = nn.Conv2d(in_chans, stem, whiten_patch, padding=0, bias=True)
        self.act = nn.GELU()
        cin, groups = stem, []
        for w in widths:
            w = max(8, round(w * width))
            groups.append(ConvGroup(cin, w, depth))
            cin = w
        self.groups = nn.Sequential(*groups)
        self.pool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Dropout(drop_rate))
        self.head = nn.Linear(cin, num_classes, bias=False)
        self.head_scale = head_scale

    def stem_conv(self) -> nn.Conv2d:
        """The conv ``fer_ray.whiten`` initialises."""
        return self.whiten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.groups(self.act(self.whiten(x))))) * self.head_scale


@register_model(in_chans=1, img_size=48)
def airbench_fer(num_classes: int = 7, in_chans: int = 1, img_size: int = 48, drop_rate: float = 0.0,
                 width: float = 1.0, **kwargs) -> nn.Module:
    """airbench-style: whitenable 2×2 stem, conv-BN-GELU groups 64/256/256/256 × width with max-pool, max-pool head."""
    return AirbenchNet(num_classes, in_chans, width=width, drop_rate=drop_rate, **kwargs)
