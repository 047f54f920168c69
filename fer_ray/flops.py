"""Params and FLOPs of a model at its input size, counted once by fvcore (reported as GMACs)."""

from __future__ import annotations

import torch
from fvcore.nn import FlopCountAnalysis
from torch import nn


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_gmacs(model: nn.Module, in_chans: int | None = None, img_size: int | None = None) -> float:
    """GMACs of one forward pass at ``(1, C, S, S)``; fvcore counts one multiply-add as one "flop"."""
    cfg = getattr(model, "fer_cfg", {})
    c, s = in_chans or cfg.get("in_chans", 1), img_size or cfg.get("img_size", 48)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            fca = FlopCountAnalysis(model, torch.zeros(1, c, s, s))
            fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            return fca.total() / 1e9
    finally:
        model.train(was_training)
