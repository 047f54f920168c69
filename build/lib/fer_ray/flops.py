"""Parameter counts and compute (GMACs, counted by fvcore) of a model at its input size.

fvcore counts one multiply-add as one "flop", so its totals are MACs: every number here is GMACs (multiply by 2
for FLOPs). ``F.scaled_dot_product_attention``, which fvcore does not know, is counted as its two matmuls.
fvcore is optional: where it cannot be imported (a GPU machine without its wheel), ``count_gmacs`` returns NaN
and ``FVCORE_ERROR`` says why; parameter counts and everything else still work. ``profile_model`` is what a
training run records in its checkpoints (``fer_ray.loop.TrainingRun.profile``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from math import prod
from typing import Any

import torch
from torch import nn

FVCORE_ERROR: str | None = None
"""Why fvcore could not be imported (``count_gmacs`` then returns NaN), or ``None`` when it is available."""
try:
    with warnings.catch_warnings():  # fvcore.nn applies the deprecated torch.jit.script at import
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        from fvcore.nn import FlopCountAnalysis
        from fvcore.nn.jit_handles import get_shape
except ImportError as e:  # only the GMACs number is lost
    FlopCountAnalysis = get_shape = None
    FVCORE_ERROR = f"{type(e).__name__}: {e}"


def count_params(model: nn.Module) -> int:
    """Number of parameters of ``model`` (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def _sdpa_macs(inputs: Sequence[Any], outputs: Sequence[Any]) -> int:
    """MACs of ``aten::scaled_dot_product_attention``: ``q @ kᵀ`` and ``attn @ v``."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    batch, length, depth = prod(q[:-2]), q[-2], q[-1]
    return batch * length * k[-2] * (depth + v[-1])


def count_gmacs(model: nn.Module, in_chans: int | None = None, img_size: int | None = None) -> float:
    """GMACs of one forward pass of one image ``(1, C, S, S)``, counted by fvcore in eval mode.

    fvcore counts one multiply-add as one flop, so the result is GMACs (not GFLOPs). The model's train/eval mode
    is restored afterwards. Without fvcore (``FVCORE_ERROR``) nothing is counted and the result is NaN.

    Args:
        model: The model; ``model.fer_cfg`` (set by ``create_model``) gives the default channels and size.
        in_chans: Input channels (default: ``fer_cfg["in_chans"]``, else 1).
        img_size: Input height and width (default: ``fer_cfg["img_size"]``, else 48).

    Returns:
        Multiply-adds of one forward pass, in billions; NaN when fvcore is not installed.
    """
    if FlopCountAnalysis is None:
        return math.nan
    cfg = getattr(model, "fer_cfg", {})
    c, s = in_chans or cfg.get("in_chans", 1), img_size or cfg.get("img_size", 48)
    param = next(model.parameters(), None)
    x = torch.zeros(1, c, s, s, device=param.device if param is not None else None,
                    dtype=param.dtype if param is not None else None)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            fca = FlopCountAnalysis(model, x).set_op_handle("aten::scaled_dot_product_attention", _sdpa_macs)
            fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            return fca.total() / 1e9
    finally:
        model.train(was_training)


def profile_model(model: nn.Module) -> dict:
    """``{"img_size", "in_chans", "params", "gmacs"}`` of ``model`` at its ``fer_cfg`` input (GMACs NaN without
    fvcore): what ``fer_ray.loop.TrainingRun`` records in its checkpoints and ``trials.parquet`` reports."""
    cfg = getattr(model, "fer_cfg", {})
    return {"img_size": cfg.get("img_size", 48), "in_chans": cfg.get("in_chans", 1),
            "params": count_params(model), "gmacs": float(count_gmacs(model))}


def model_profile(name: str, img_size: int | None = None, **kwargs) -> dict:
    """Build ``name`` (pretrained=False) and report its size and compute.

    Args:
        name: A registered model or ``timm/<name>``.
        img_size: Input size (default: the model's).
        **kwargs: Passed to ``create_model`` (e.g. ``in_chans``).

    Returns:
        ``{"arch", "img_size", "in_chans", "params", "gmacs"}`` (GMACs as counted by fvcore; NaN without it).
    """
    from fer_ray.models import create_model

    return {"arch": name, **profile_model(create_model(name, img_size=img_size, **kwargs))}
