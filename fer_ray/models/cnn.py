"""Plain CNN family for 48×48 grayscale faces (AdvancedEmotionNet and relatives)."""

from __future__ import annotations

import torch
from torch import nn

from fer_ray.models._registry import register_model


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class AdvancedEmotionNet(nn.Module):
    """3 double-conv blocks (32/64 → 128 → 256) with BN, dropout 0.25, FC 256·6·6 → 512 → classes."""

    def __init__(self, num_classes: int = 7, in_chans: int = 1, drop_rate: float = 0.5, block_drop: float = 0.25):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(in_chans, 32), *_conv_bn(32, 64), nn.MaxPool2d(2), nn.Dropout(block_drop),
            *_conv_bn(64, 128), *_conv_bn(128, 128), nn.MaxPool2d(2), nn.Dropout(block_drop),
            *_conv_bn(128, 256), *_conv_bn(256, 256), nn.MaxPool2d(2), nn.Dropout(block_drop),
            nn.AdaptiveAvgPool2d(6))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(256 * 6 * 6, 512), nn.BatchNorm1d(512),
                                  nn.ReLU(inplace=True), nn.Dropout(drop_rate), nn.Linear(512, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model(in_chans=1, img_size=48)
def advanced_emotion_net(num_classes: int = 7, in_chans: int = 1, img_size: int = 48, drop_rate: float = 0.5,
                         **kwargs) -> nn.Module:
    """AdvancedEmotionNet: 3 double-conv blocks 32/64→128→256, BN, dropout 0.25/0.5, FC 512."""
    return AdvancedEmotionNet(num_classes, in_chans, drop_rate, **kwargs)


@register_model(in_chans=1, img_size=48)
def basic_cnn(num_classes: int = 7, in_chans: int = 1, img_size: int = 48, drop_rate: float = 0.5) -> nn.Module:
    """BasicCNN: conv3×3 1→32→64→128 + ReLU + maxpool, FC 512, dropout 0.5."""
    layers: list[nn.Module] = []
    for cin, cout in ((in_chans, 32), (32, 64), (64, 128)):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(6), nn.Flatten(), nn.Linear(128 * 36, 512),
                         nn.ReLU(inplace=True), nn.Dropout(drop_rate), nn.Linear(512, num_classes))
