"""Test-time augmentation: the execution of named views, batched multi-view inference.

A view is a deterministic transform of the float ``[B, 1, 48, 48]`` batch, named in a policy list in the grammar
of ``fer_ray.views`` (``identity``, ``hflip``, ``rot10``, ``shift2,0``, ``scale1.1``, ``crop40c``, ``hflip+rot10``;
``tencrop40`` in a policy). This module owns executing them: ``ViewStep`` runs one step from its geometry
(``fer_ray.views.GEOMETRY``: an exact gather, or one bilinear ``grid_sample``), ``parse_view`` chains a view's steps
and ``ViewStack`` stacks a policy's views; the same modules run in ``tta_logits`` and inside the exported graph
(``fer_ray.export``). All views of a batch are stacked and go through the model as one forward pass, on an
inference copy of the model (channels-last, conv+BN folded: ``inference_model``). ``fer_ray.inference.fill_store``
scores each trial's best checkpoint with these functions as Ray tasks on the cluster and writes the experiment's
``logits/<trial_id>/<split>.parquet``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fer_ray import engine
from fer_ray.data.augment import Preprocess, spatial_size
from fer_ray.data.dataset import IMG_SIZE
from fer_ray.views import expand_views, parse_view_spec, step_geometry

__all__ = ["ViewStack", "ViewStep", "expand_views", "inference_model", "parse_view", "tta_logits", "tta_logits_loop"]


class ViewStep(nn.Module):
    """One step of a view, executed from its geometry (``fer_ray.views.step_geometry``): every output pixel reads its
    source coordinate, clamped to the step's window. Where all of them are whole pixels (``hflip``, whole-pixel
    shifts, a full-size crop) the step is an exact gather; otherwise one bilinear ``grid_sample`` (border padding,
    ``align_corners=True``). The table of a ``size``×``size`` image is a buffer (the exported graph's constant);
    other sizes are planned when met."""

    def __init__(self, op: str, args: tuple, size: int = IMG_SIZE) -> None:
        super().__init__()
        self.op, self.args, self.size = op, tuple(args), size
        self.gather, table = self.plan(size, size)
        self.register_buffer("table", table, persistent=False)

    def plan(self, h: int, w: int) -> tuple[bool, torch.Tensor]:
        """``(True, flat source indices [h·w])`` for a gather, else ``(False, normalised grid [1, h, w, 2])``."""
        ((a, b, c), (d, e, f)), (x0, y0, x1, y1) = step_geometry(self.op, self.args, h, w)
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
        sx, sy = (a * xs + b * ys + c).clamp(x0, x1), (d * xs + e * ys + f).clamp(y0, y1)
        rx, ry = sx.round(), sy.round()
        if max((sx - rx).abs().max().item(), (sy - ry).abs().max().item()) < 1e-6:
            return True, (ry * w + rx).long().flatten()
        grid = torch.stack([sx / max(w - 1, 1) * 2 - 1, sy / max(h - 1, 1) * 2 - 1], dim=-1)
        return False, grid[None].float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = spatial_size(x)
        gather, table = (self.gather, self.table) if (h, w) == (self.size, self.size) else self.plan(h, w)
        table = table.to(x.device)
        if gather:
            return x.flatten(-2).index_select(-1, table).view_as(x)
        grid = table.to(x.dtype).expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def parse_view(name: str) -> nn.Sequential:
    """The module of one view name (``fer_ray.views`` grammar): its ``ViewStep``s in order (none for ``identity``);
    float ``[B, C, H, W]`` in, the same shape out. Unknown names and impossible crops raise ``ValueError``."""
    return nn.Sequential(*[ViewStep(op, args) for op, args in parse_view_spec(name)])


class ViewStack(nn.Module):
    """A policy's views of one float batch ``[B, 1, H, W]``, stacked view-major: ``[V·B, 1, H, W]`` (one forward
    pass of the model scores them all). ``views``: names, or modules ``parse_view`` built."""

    def __init__(self, views: Sequence[str | nn.Module]) -> None:
        super().__init__()
        self.views = nn.ModuleList([parse_view(v) if isinstance(v, str) else v for v in views])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([v(x) for v in self.views]) if len(self.views) > 1 else self.views[0](x)


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
    stack = ViewStack(views).to(images.device)
    per = max(1, batch_size // len(views))
    out = []
    for lo in range(0, len(images), per):
        x = preprocess.to_float(images[lo:lo + per])
        stacked = stack(x)
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
        fn = parse_view(view).to(images.device)
        res.append(torch.cat([model(preprocess(fn(preprocess.to_float(images[lo:lo + batch_size]))).contiguous())
                              .float() for lo in range(0, len(images), batch_size)]))
    return torch.stack(res)
