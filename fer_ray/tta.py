"""Test-time augmentation: named views, batched multi-view inference and filling the logit store.

A view is a deterministic transform of the float ``[B, 1, 48, 48]`` batch, named in a policy list:
``identity``, ``hflip``, ``rot<deg>`` (``rot10``, ``rot-10``), ``shift<dx>,<dy>`` (px), ``scale<s>``
(``scale1.1``), ``crop<c><pos>`` (a ``c``×``c`` crop at ``tl``/``tr``/``bl``/``br``/``c``, resized back), and ``+``
combinations (``hflip+rot10``). In a policy, ``tencrop<c>`` expands to the ten-crop views (4 corners + centre, each
also flipped; ``expand_views``). All views of a batch are stacked and go through the model as one forward pass,
on an inference copy of the model (channels-last, conv+BN folded: ``inference_model``). ``fill_store`` scores each
trial's best checkpoint once per (split, policy) and writes ``logits/<trial_id>/<split>.parquet``; existing files
with the same checkpoint sha256 and views are reused.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import kornia.geometry.transform as KT
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from torch import nn

from fer_ray.checkpoint import load_checkpoint, model_from_checkpoint, sha256_file
from fer_ray.data import FERData
from fer_ray.data.augment import Preprocess
from fer_ray.store import write_logits

_VIEW_RE = re.compile(r"^(identity|hflip|rot(-?\d+(?:\.\d+)?)|shift(-?\d+),(-?\d+)|scale(\d+(?:\.\d+)?)"
                      r"|crop(\d+)(tl|tr|bl|br|c))$")
_CROP_POSITIONS = ("tl", "tr", "bl", "br", "c")


def expand_views(views: Sequence[str]) -> list[str]:
    """A policy with ``tencrop<c>`` entries replaced by their ten views (crops at 4 corners + centre, ± flip)."""
    out: list[str] = []
    for view in views:
        m = re.fullmatch(r"tencrop(\d+)", str(view).strip())
        crops = [f"crop{m.group(1)}{pos}" for pos in _CROP_POSITIONS] if m else []
        out.extend([*crops, *(f"{c}+hflip" for c in crops)] if m else [str(view)])
    return out


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
    """The transform for one view name; unknown names raise ``ValueError`` naming the view."""
    steps = []
    for part in name.split("+"):
        m = _VIEW_RE.match(part.strip())
        if not m:
            raise ValueError(f"unknown TTA view {name!r} (part {part!r}); use identity, hflip, rot<deg>, "
                             "shift<dx>,<dy>, scale<s>, crop<c><tl|tr|bl|br|c> or +-combinations "
                             "(tencrop<c> in a policy)")
        if m.group(1) == "hflip":
            steps.append(functools.partial(torch.flip, dims=[-1]))
        elif m.group(2) is not None:
            steps.append(functools.partial(_affine, angle=float(m.group(2))))
        elif m.group(3) is not None:
            steps.append(functools.partial(_affine, shift=(float(m.group(3)), float(m.group(4)))))
        elif m.group(5) is not None:
            steps.append(functools.partial(_affine, scale=float(m.group(5))))
        elif m.group(6) is not None:
            steps.append(functools.partial(_crop, size=int(m.group(6)), pos=m.group(7)))

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
def tta_logits(model: nn.Module, images: torch.Tensor, views: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Float32 logits ``[V, N, C]``: each batch's V views are stacked and scored in one forward pass of the
    ``inference_model`` copy of ``model`` (pass that copy to score several image sets without rebuilding it)."""
    model = inference_model(model)
    preprocess = Preprocess.for_model(model.fer_cfg).to(images.device)
    fns = [parse_view(v) for v in views]
    per = max(1, batch_size // len(views))
    out = []
    for lo in range(0, len(images), per):
        x = preprocess.to_float(images[lo:lo + per])
        stacked = torch.cat([fn(x) for fn in fns])
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


def fill_store(exp_dir: str | Path, data: FERData, splits: dict[str, np.ndarray], views: Sequence[str],
               roles: dict[str, str], trials: pd.DataFrame | None = None, progress: bool = True) -> list[Path]:
    """Write TTA logits of each trial's best checkpoint for every split in ``roles`` (skipping ``fit`` splits)."""
    exp_dir = Path(exp_dir)
    views = expand_views(views)
    trials = pd.read_parquet(exp_dir / "trials.parquet") if trials is None else trials
    written = []
    for i, row in enumerate(trials.itertuples(), 1):
        ckpt_path = Path(row.checkpoint)
        sha = sha256_file(ckpt_path)
        ckpt = load_checkpoint(ckpt_path)
        model = inference_model(model_from_checkpoint(ckpt))  # built once, scored on every split
        for split, role in roles.items():
            if role == "fit" or split not in splits:
                continue
            out = exp_dir / "logits" / row.trial_id / f"{split}.parquet"
            if _is_current(out, sha, views):
                written.append(out)
                continue
            idx = splits[split]
            images = torch.from_numpy(np.ascontiguousarray(data.images[idx]))
            logits = tta_logits(model, images, views).numpy()
            meta = {"member": row.trial_id, "arch": row.arch, "img_size": int(row.img_size),
                    "in_chans": int(row.in_chans), "params": int(row.params), "gmacs_per_view": float(row.gmacs),
                    "checkpoint": str(ckpt_path), "checkpoint_sha256": sha, "epoch": int(ckpt["epoch"]),
                    "split": split, "role": role, "views": list(views), "config": json.loads(row.config)}
            written.append(write_logits(out, logits, data.labels[idx], data.ids[idx].astype(str), list(views), meta))
        if progress:
            print(f"[tta] {i}/{len(trials)} {row.trial_id} ({row.arch} @ {row.img_size}px): "
                  f"{len(views)} views × {', '.join(s for s, r in roles.items() if r != 'fit')}", flush=True)
    return written


def _is_current(path: Path, sha: str, views: Sequence[str]) -> bool:
    if not path.is_file():
        return False
    meta = json.loads(pq.read_schema(path).metadata.get(b"fer_ray", b"{}"))
    return meta.get("checkpoint_sha256") == sha and list(meta.get("views", [])) == list(views)

