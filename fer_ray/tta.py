"""Test-time augmentation: named views, batched multi-view inference and filling the logit store.

A view is a deterministic transform of the float ``[B, 1, 48, 48]`` batch, named in a policy list in the grammar
of ``fer_ray.views`` (``identity``, ``hflip``, ``rot10``, ``shift2,0``, ``scale1.1``, ``crop40c``, ``hflip+rot10``;
``tencrop40`` in a policy); ``parse_view`` builds it from the parsed steps. All views of a batch are stacked and
go through the model as one forward pass, on an inference copy of the model (channels-last, conv+BN folded:
``inference_model``). ``fer_ray.inference.fill_store`` scores each trial's best checkpoint with these functions as
Ray tasks on the cluster and writes the experiment's ``logits/<trial_id>/<split>.parquet``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import kornia.geometry.transform as KT
import torch
from torch import nn

from fer_ray import engine
from fer_ray.data.augment import Preprocess
from fer_ray.views import expand_views, parse_view_spec

__all__ = ["expand_views", "inference_model", "parse_view", "tta_logits", "tta_logits_loop"]


def _crop(x: torch.Tensor, size: int, pos: str) -> torch.Tensor:
    """The ``size``×``size`` crop at ``pos`` of a ``[B, C, H, W]`` batch, resized back to ``H``×``W``."""
    h, w = x.shape[-2:]
    if not 0 < size <= min(h, w):
        raise ValueError(f"crop size {size} must be in 1..{min(h, w)}")
    top = {"tl": 0, "tr": 0, "bl": h - size, "br": h - size, "c": (h - size) // 2}[pos]
    left = {"tl": 0, "tr": w - size, "bl": 0, "br": w - size, "c": (w - size) // 2}[pos]
    patch = x[..., top:top + size, left:left + size]
    return torch.nn.functional.interpolate(patch, size=(h, w), mode="bilinear", align_corners=False)


def _affine(x: torch.Tensor, angle: float = 0.0, shift: tuple[float, float] = (0.0, 0.0),
            scale: float = 1.0) -> torch.Tensor:
    b, _, h, w = x.shape
    center = torch.tensor([[(w - 1) / 2, (h - 1) / 2]], device=x.device).expand(b, 2)
    mat = KT.get_rotation_matrix2d(center, torch.full((b,), angle, device=x.device),
                                   torch.full((b, 2), scale, device=x.device))
    mat[:, 0, 2] += shift[0]
    mat[:, 1, 2] += shift[1]
    return KT.warp_affine(x, mat, (h, w), padding_mode="border")


def parse_view(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The transform for one view name (``fer_ray.views`` grammar); unknown names raise ``ValueError``."""
    make = {"hflip": lambda: functools.partial(torch.flip, dims=[-1]),
            "rotate": lambda deg: functools.partial(_affine, angle=deg),
            "shift": lambda dx, dy: functools.partial(_affine, shift=(dx, dy)),
            "scale": lambda s: functools.partial(_affine, scale=s),
            "crop": lambda size, pos: functools.partial(_crop, size=size, pos=pos)}
    steps = [make[op](*args) for op, args in parse_view_spec(name)]

    def apply(x: torch.Tensor) -> torch.Tensor:
        for step in steps:
            x = step(x)
        return x

    return apply


def inference_model(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` laid out for fast inference: channels-last weights (oneDNN's native layout
    on CPU, tensor-core friendly on GPU) and, where torch.fx can trace the model, every conv → BatchNorm pair
    folded into one conv (``torch.fx.experimental.optimization.fuse``). Outputs match the original to float
    rounding. ``model`` itself is left untouched; a model this returned is returned as it is."""
    import copy

    from torch.fx.experimental.optimization import fuse

    if getattr(model, "fer_inference", False):
        return model
    fast = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
    try:
        fast = fuse(fast)
        fast.fer_cfg = model.fer_cfg
    except Exception:  # noqa: BLE001 - models torch.fx cannot trace (data-dependent control flow) stay unfused
        pass
    fast.fer_inference = True
    return fast


@torch.inference_mode()
def tta_logits(model: nn.Module, images: torch.Tensor, views: Sequence[str], batch_size: int = 256,
               amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Float32 logits ``[V, N, C]``: each batch's V views are stacked and scored in one forward pass of the
    ``inference_model`` copy of ``model`` (pass that copy to score several image sets without rebuilding it), under
    autocast to ``amp_dtype`` when given (``engine.autocast_dtype``: the trial's AMP)."""
    model = inference_model(model)
    preprocess = Preprocess.for_model(model.fer_cfg).to(images.device)
    fns = [parse_view(v) for v in views]
    per = max(1, batch_size // len(views))
    out = []
    for lo in range(0, len(images), per):
        x = preprocess.to_float(images[lo:lo + per])
        stacked = torch.cat([fn(x) for fn in fns])
        with engine.autocast(images.device, amp_dtype):
            logits = model(preprocess(stacked)).float()
        out.append(logits.view(len(views), len(x), -1))
    return torch.cat(out, dim=1) if out else torch.empty(len(views), 0, 0)


@torch.inference_mode()
def tta_logits_loop(model: nn.Module, images: torch.Tensor, views: Sequence[str],
                    batch_size: int = 256) -> torch.Tensor:
    """Reference implementation, as a notebook would write it: the model as given, plain NCHW batches, one pass
    over the data per view (the baseline that ``tta_logits`` is checked and benchmarked against)."""
    model.eval()
    preprocess = Preprocess.for_model(model.fer_cfg).to(images.device)
    res = []
    for view in views:
        fn = parse_view(view)
        res.append(torch.cat([model(preprocess(fn(preprocess.to_float(images[lo:lo + batch_size]))).contiguous())
                              .float() for lo in range(0, len(images), batch_size)]))
    return torch.stack(res)
