"""Plain and attention CNN family for 48×48 grayscale faces.

Owns ``advanced_emotion_net`` (the project's main CNN), ``advanced_emotion_net_improved``, ``basic_cnn``,
``basic_cnn_bn``, ``attention_cnn`` (CBAM after every block) and ``vggnet_fer`` (Khaireddin & Chen 2021). Layers
that had a fixed flatten size in the published designs sit behind an adaptive pool sized so the FC layer keeps its
published width at its published input size while any input of 32 px or more still works.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fer_ray.models._registry import register_model


def conv_bn_relu(cin: int, cout: int, kernel_size: int = 3) -> list[nn.Module]:
    """Conv (no bias) → BatchNorm → ReLU, as a list to splice into an ``nn.Sequential``."""
    return [nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


def vgg_blocks(in_chans: int, blocks: Sequence[Sequence[int]], drop: float | Sequence[float] = 0.0,
               spatial: bool = False) -> list[nn.Module]:
    """VGG-style blocks: each block is conv-BN-ReLU per width, then 2×2 max-pool and dropout.

    Args:
        in_chans: Input channels.
        blocks: Conv widths per block, e.g. ``((32, 64), (128, 128))``.
        drop: Dropout after each block: one rate for all, or one per block (missing or 0 leaves it out).
        spatial: ``Dropout2d`` (whole channels) instead of ``Dropout``.

    Returns:
        The layers, to splice into an ``nn.Sequential``.
    """
    rates = [drop] * len(blocks) if isinstance(drop, int | float) else list(drop)
    layers: list[nn.Module] = []
    cin = in_chans
    for i, widths in enumerate(blocks):
        for w in widths:
            layers += conv_bn_relu(cin, w)
            cin = w
        layers.append(nn.MaxPool2d(2))
        if i < len(rates) and rates[i]:
            layers.append((nn.Dropout2d if spatial else nn.Dropout)(rates[i]))
    return layers


class AdvancedEmotionNet(nn.Module):
    """VGG-style blocks with BN and dropout, adaptive pool to 6×6, FC → 512 → BN → ReLU → dropout → classes."""

    def __init__(self, num_classes: int = 7, in_chans: int = 1,
                 blocks: Sequence[Sequence[int]] = ((32, 64), (128, 128), (256, 256)),
                 drop_rate: float = 0.5, block_drop: float = 0.25, hidden: int = 512):
        super().__init__()
        width = blocks[-1][-1]
        self.features = nn.Sequential(*vgg_blocks(in_chans, blocks, block_drop), nn.AdaptiveAvgPool2d(6))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width * 6 * 6, hidden), nn.BatchNorm1d(hidden),
                                  nn.ReLU(inplace=True), nn.Dropout(drop_rate), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model(in_chans=1, img_size=48)
def advanced_emotion_net(num_classes: int = 7, in_chans: int = 1, img_size: int = 48, drop_rate: float = 0.5,
                         block_drop: float = 0.25, **kwargs) -> nn.Module:
    """AdvancedEmotionNet: 3 double-conv blocks 32-64/128-128/256-256, BN, dropout 0.25, FC 256·6·6→512, drop 0.5."""
    return AdvancedEmotionNet(num_classes, in_chans, drop_rate=drop_rate, block_drop=block_drop, **kwargs)


@register_model(in_chans=1, img_size=48)
def advanced_emotion_net_improved(num_classes: int = 7, in_chans: int = 1, img_size: int = 48,
                                  drop_rate: float = 0.5, block_drop: float = 0.25, **kwargs) -> nn.Module:
    """AdvancedEmotionNet (improved): blocks of 2×64, 3×128, 3×256 convs, BN, FC 256·6·6→512, dropout 0.25/0.5."""
    return AdvancedEmotionNet(num_classes, in_chans, blocks=((64, 64), (128, 128, 128), (256, 256, 256)),
                              drop_rate=drop_rate, block_drop=block_drop, **kwargs)


def mlp_head(dims: Sequence[int], num_classes: int, drop_rate: float, batch_norm: bool = False) -> list[nn.Module]:
    """Linear → (BN) → ReLU → dropout for each consecutive pair in ``dims``, then Linear → classes."""
    layers: list[nn.Module] = []
    for cin, cout in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(cin, cout), *([nn.BatchNorm1d(cout)] if batch_norm else []), nn.ReLU(inplace=True),
                   nn.Dropout(drop_rate)]
    return [*layers, nn.Linear(dims[-1], num_classes)]


class BasicCNN(nn.Sequential):
    """Three conv3×3 → ReLU → max-pool blocks (no BN), adaptive pool to 6×6, FC 512, dropout (one flat Sequential)."""

    def __init__(self, num_classes: int = 7, in_chans: int = 1, widths: Sequence[int] = (32, 64, 128),
                 drop_rate: float = 0.5, hidden: int = 512):
        layers: list[nn.Module] = []
        cin = in_chans
        for w in widths:
            layers += [nn.Conv2d(cin, w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            cin = w
        head = mlp_head((cin * 6 * 6, hidden), num_classes, drop_rate)
        super().__init__(*layers, nn.AdaptiveAvgPool2d(6), nn.Flatten(), *head)


@register_model(in_chans=1, img_size=48)
def basic_cnn(num_classes: int = 7, in_chans: int = 1, img_size: int = 48, drop_rate: float = 0.5,
              **kwargs) -> nn.Module:
    """BasicCNN: conv3×3 1→32→64→128 + ReLU + max-pool, FC 128·6·6→512, dropout 0.5."""
    return BasicCNN(num_classes, in_chans, drop_rate=drop_rate, **kwargs)


class BasicCNNBN(nn.Module):
    """Double-conv BN blocks 64/128/256 with max-pool, conv 256→512, global average pool, FC 512→256→128."""

    def __init__(self, num_classes: int = 7, in_chans: int = 1, drop_rate: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(*vgg_blocks(in_chans, ((64, 64), (128, 128), (256, 256))),
                                      *conv_bn_relu(256, 512), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(*mlp_head((512, 256, 128), num_classes, drop_rate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model(in_chans=1, img_size=48)
def basic_cnn_bn(num_classes: int = 7, in_chans: int = 1, img_size: int = 48, drop_rate: float = 0.5,
                 **kwargs) -> nn.Module:
    """BasicCNN+BN: conv blocks 64-64/128-128/256-256, conv→512, global avg pool, FC 512→256→128, dropout 0.5."""
    return BasicCNNBN(num_classes, in_chans, drop_rate=drop_rate, **kwargs)


class VggNet(nn.Module):
    """Khaireddin & Chen (2021), usef-kh/fer ``models/vgg.py``: four stages of two 3×3 conv-BN-ReLU (64, 128, 256,
    512) each ending in a 2×2 max-pool, then FC 512·2·2 → 4096 → 4096 → classes with dropout after each hidden FC.
    At its 40-px input the last pool leaves 2×2, as published; other sizes are average-pooled to 2×2."""

    def __init__(self, num_classes: int = 7, in_chans: int = 1, drop_rate: float = 0.2, hidden: int = 4096):
        super().__init__()
        self.features = nn.Sequential(*vgg_blocks(in_chans, ((64, 64), (128, 128), (256, 256), (512, 512))),
                                      nn.AdaptiveAvgPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), *mlp_head((512 * 2 * 2, hidden, hidden), num_classes, drop_rate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model(in_chans=1, img_size=40)
def vggnet_fer(num_classes: int = 7, in_chans: int = 1, img_size: int = 40, drop_rate: float = 0.2,
               **kwargs) -> nn.Module:
    """VGGNet (Khaireddin & Chen 2021, 73.28 %): 4×2 conv-BN 64-512, FC 2048→4096→4096, dropout 0.2, 40 px crops."""
    return VggNet(num_classes, in_chans, drop_rate=drop_rate, **kwargs)


class ChannelAttention(nn.Module):
    """CBAM channel attention: a shared MLP over the average- and max-pooled descriptors, summed, sigmoid."""

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden, channels, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(x.mean(dim=(2, 3), keepdim=True))
        mx = self.mlp(x.amax(dim=(2, 3), keepdim=True))
        return torch.sigmoid(avg + mx)


class SpatialAttention(nn.Module):
    """CBAM spatial attention: a 7×7 conv over the channel-average and channel-max maps, sigmoid."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(maps))


class CBAM(nn.Module):
    """Channel then spatial attention; ``forward`` returns the refined features and the spatial map."""

    def __init__(self, channels: int, reduction: int = 8, kernel_size: int = 7):
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(kernel_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x * self.channel(x)
        attn = self.spatial(x)
        return x * attn, attn


class AttentionCNN(nn.Module):
    """Double-conv BN blocks, each followed by max-pool and CBAM; global average pool; FC → BN → dropout."""

    def __init__(self, num_classes: int = 7, in_chans: int = 1, widths: Sequence[int] = (32, 64, 128),
                 drop_rate: float = 0.5, hidden: int = 256, reduction: int = 8):
        super().__init__()
        self.blocks, self.attention = nn.ModuleList(), nn.ModuleList()
        cin = in_chans
        for w in widths:
            self.blocks.append(nn.Sequential(*vgg_blocks(cin, ((w, w),))))
            self.attention.append(CBAM(w, reduction))
            cin = w
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(*mlp_head((cin, hidden), num_classes, drop_rate, batch_norm=True))

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        """Classify ``x``.

        Args:
            x: Images ``[B, C, H, W]``.
            return_attention: Also return the spatial attention maps.

        Returns:
            Logits ``[B, num_classes]``, or ``(logits, maps)`` where ``maps`` holds one ``[B, 1, h, w]`` spatial
            attention map per block (``h, w`` = the block's output size: H/2, H/4, H/8).
        """
        maps = []
        for block, attention in zip(self.blocks, self.attention):
            x, attn = attention(block(x))
            maps.append(attn)
        logits = self.head(self.pool(x))
        return (logits, maps) if return_attention else logits


@register_model(in_chans=1, img_size=48)
def attention_cnn(num_classes: int = 7, in_chans: int = 1, img_size: int = 48, drop_rate: float = 0.5,
                  **kwargs) -> nn.Module:
    """AttentionCNN: double-conv blocks 32/64/128 + CBAM, global avg pool, FC 128→256, BN, dropout 0.5."""
    return AttentionCNN(num_classes, in_chans, drop_rate=drop_rate, **kwargs)

