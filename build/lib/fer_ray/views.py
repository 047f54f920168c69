"""The TTA views, torch-free: their grammar and their geometry. ``parse_view_spec`` turns a view name into its steps,
``expand_views`` expands a policy, and ``GEOMETRY`` is the one table of what each step does to an image: an affine map
from output to source pixel coordinates plus the window the source coordinates are clamped to (``step_geometry``).
``fer_ray.config`` checks sweep files with the grammar before anything runs; ``fer_ray.tta`` executes the geometry
(one module, the same in TTA scoring and in the exported graph).

A view is ``identity``, ``hflip``, ``rot<deg>`` (``rot10``, ``rot-10``), ``shift<dx>,<dy>`` (px), ``scale<s>``
(``scale1.1``), ``crop<c><pos>`` (a ``c``×``c`` crop at ``tl``/``tr``/``bl``/``br``/``c``, resized back), or a
``+`` combination (``hflip+rot10``). In a policy, ``tencrop<c>`` stands for the ten-crop views (4 corners + centre,
each also flipped), and ``tenshift<d>`` for the ten-crop of center-crop models (``expand_views``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

_VIEW_RE = re.compile(r"^(identity|hflip|rot(-?\d+(?:\.\d+)?)|shift(-?\d+),(-?\d+)|scale(\d+(?:\.\d+)?)"
                      r"|crop(\d+)(tl|tr|bl|br|c))$")
CROP_POSITIONS = ("tl", "tr", "bl", "br", "c")


def expand_views(views: Sequence[str]) -> list[str]:
    """A policy with ``tencrop<c>`` entries replaced by their ten views (crops at 4 corners + centre, ± flip), and
    ``tenshift<d>`` by the ten-crop of a center-crop model (``TrainConfig.input: center_crop``): the face shifted
    by ±``d`` px to each corner (its center crop is then that corner's crop) and unshifted, ± flip."""
    out: list[str] = []
    for view in views:
        view = str(view).strip()
        if m := re.fullmatch(r"tencrop(\d+)", view):
            crops = [f"crop{m.group(1)}{pos}" for pos in CROP_POSITIONS]
        elif m := re.fullmatch(r"tenshift(\d+)", view):
            d = m.group(1)
            crops = ["identity", f"shift{d},{d}", f"shift-{d},{d}", f"shift{d},-{d}", f"shift-{d},-{d}"]
        else:
            out.append(view)
            continue
        out.extend([*crops, *(f"{c}+hflip" if c != "identity" else "hflip" for c in crops)])
    return out


def parse_view_spec(name: str) -> list[tuple[str, tuple]]:
    """The steps of one view: ``("hflip", ())``, ``("rotate", (deg,))``, ``("shift", (dx, dy))``,
    ``("scale", (s,))``, ``("crop", (size, pos))``; ``identity`` has none. Unknown names raise ``ValueError``."""
    steps: list[tuple[str, tuple]] = []
    for part in str(name).split("+"):
        m = _VIEW_RE.match(part.strip())
        if not m:
            raise ValueError(f"unknown TTA view {name!r} (part {part!r}); use identity, hflip, rot<deg>, "
                             "shift<dx>,<dy>, scale<s>, crop<c><tl|tr|bl|br|c> or +-combinations "
                             "(tencrop<c> in a policy)")
        if m.group(1) == "hflip":
            steps.append(("hflip", ()))
        elif m.group(2) is not None:
            steps.append(("rotate", (float(m.group(2)),)))
        elif m.group(3) is not None:
            steps.append(("shift", (float(m.group(3)), float(m.group(4)))))
        elif m.group(5) is not None:
            steps.append(("scale", (float(m.group(5)),)))
        elif m.group(6) is not None:
            steps.append(("crop", (int(m.group(6)), m.group(7))))
    return steps


# -- geometry: the one table of what each step does --------------------------------------------------------------
Affine = tuple[tuple[float, float, float], tuple[float, float, float]]
"""``((a, b, c), (d, e, f))``: the source pixel ``(a·x + b·y + c, d·x + e·y + f)`` of output pixel ``(x, y)``."""
Window = tuple[float, float, float, float]
"""``(x0, y0, x1, y1)``: the source coordinates are clamped into this box (border padding)."""


def _warp(h: int, w: int, angle: float = 0.0, scale: float = 1.0, shift: tuple[float, float] = (0.0, 0.0)
          ) -> tuple[Affine, Window]:
    """Rotation by ``angle`` degrees (counter-clockwise on screen) and scaling about the image centre, then a
    shift by ``shift`` px: the forward map of OpenCV's ``getRotationMatrix2D`` (and kornia's ``warp_affine``, which
    TTA used before), inverted; border padding over the whole image."""
    cx, cy = (w - 1) / 2, (h - 1) / 2
    a, b = scale * math.cos(math.radians(angle)), scale * math.sin(math.radians(angle))
    tx, ty = (1 - a) * cx - b * cy + shift[0], b * cx + (1 - a) * cy + shift[1]  # dst = [[a, b], [-b, a]] src + t
    d = a * a + b * b
    inv = ((a / d, -b / d), (b / d, a / d))
    return ((inv[0][0], inv[0][1], -(inv[0][0] * tx + inv[0][1] * ty)),
            (inv[1][0], inv[1][1], -(inv[1][0] * tx + inv[1][1] * ty))), (0.0, 0.0, w - 1.0, h - 1.0)


def _crop(h: int, w: int, size: int, pos: str) -> tuple[Affine, Window]:
    """The ``size``×``size`` crop at ``pos`` resized back to ``h``×``w`` (bilinear, ``align_corners=False``: what
    ``F.interpolate`` of the crop does, whose source coordinates stop at the crop's edges)."""
    if not 0 < size <= min(h, w):
        raise ValueError(f"crop size {size} must be in 1..{min(h, w)}")
    top = {"tl": 0, "tr": 0, "bl": h - size, "br": h - size, "c": (h - size) // 2}[pos]
    left = {"tl": 0, "tr": w - size, "bl": 0, "br": w - size, "c": (w - size) // 2}[pos]
    sx, sy = size / w, size / h
    return (((sx, 0.0, 0.5 * sx - 0.5 + left), (0.0, sy, 0.5 * sy - 0.5 + top)),
            (float(left), float(top), left + size - 1.0, top + size - 1.0))


GEOMETRY: dict[str, Callable[..., tuple[Affine, Window]]] = {
    "hflip": lambda h, w: (((-1.0, 0.0, w - 1.0), (0.0, 1.0, 0.0)), (0.0, 0.0, w - 1.0, h - 1.0)),
    "rotate": lambda h, w, deg: _warp(h, w, angle=deg),
    "shift": lambda h, w, dx, dy: _warp(h, w, shift=(dx, dy)),
    "scale": lambda h, w, s: _warp(h, w, scale=s),
    "crop": _crop,
}
"""Each step of ``parse_view_spec`` as ``(h, w, *args) -> (affine, window)``: the whole geometry of a view. A new
kind of view is one entry here (and its name in ``_VIEW_RE``); ``fer_ray.tta.ViewStep`` executes every entry, for
TTA scoring and for the exported graph alike."""


def step_geometry(op: str, args: tuple, h: int, w: int) -> tuple[Affine, Window]:
    """The affine map and clamping window of one parsed step on an ``h``×``w`` image (``GEOMETRY``)."""
    return GEOMETRY[op](h, w, *args)
