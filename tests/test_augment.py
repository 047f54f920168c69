"""Batch augmentation and preprocessing: shapes, normalisation, per-sample randomness."""

import torch

from fer_ray.config import AugmentConfig
from fer_ray.data.augment import Augment, Preprocess


def test_preprocess_resizes_stacks_and_normalises():
    pre = Preprocess(img_size=64, in_chans=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = torch.full((4, 48, 48), 255, dtype=torch.uint8)
    y = pre(x)
    assert y.shape == (4, 3, 64, 64)
    assert torch.allclose(y, torch.full_like(y, 2.0))  # (1 - 0.5) / 0.25


def test_no_augmentation_is_identity():
    aug = Augment(AugmentConfig(strength=0.0, hflip=0.0))
    x = torch.rand(8, 1, 48, 48)
    assert torch.equal(aug(x), x)


def test_flip_only():
    aug = Augment(AugmentConfig(strength=0.0, hflip=1.0))
    x = torch.rand(8, 1, 48, 48)
    assert torch.allclose(aug(x), x.flip(-1))


def test_augmentation_is_per_sample_random():
    torch.manual_seed(0)
    aug = Augment(AugmentConfig(strength=1.0, hflip=0.0, rotate=15, translate=0.1, scale=0.1))
    x = torch.rand(1, 1, 48, 48).expand(16, -1, -1, -1).contiguous()
    y = aug(x)
    assert y.shape == x.shape and 0.0 <= y.min() and y.max() <= 1.0
    diffs = (y[1:] - y[0]).abs().flatten(1).amax(1)
    assert (diffs > 1e-3).all(), "every sample should get its own random transform"


def test_random_resized_crop_is_per_sample_and_keeps_the_size():
    torch.manual_seed(0)
    aug = Augment(AugmentConfig(strength=0.0, hflip=0.0, resized_crop=1.0))
    x = torch.rand(1, 1, 48, 48).expand(8, -1, -1, -1).contiguous()
    y = aug(x)
    assert y.shape == x.shape
    assert ((y - x).abs().flatten(1).amax(1) > 1e-3).all() and ((y[1:] - y[0]).abs().flatten(1).amax(1) > 1e-3).all()
