"""The TTA view grammar, torch-free: ``parse_view_spec`` turns a view name into its steps and ``expand_views``
expands a policy. ``fer_ray.config`` checks sweep files with it before anything runs; ``fer_ray.tta`` builds the
tensor transforms from the same steps.

A view is ``identity``, ``hflip``, ``rot<deg>`` (``rot10``, ``rot-10``), ``shift<dx>,<dy>`` (px), ``scale<s>``
(``scale1.1``), ``crop<c><pos>`` (a ``c``×``c`` crop at ``tl``/``tr``/``bl``/``br``/``c``, resized back), or a
``+`` combination (``hflip+rot10``). In a policy, ``tencrop<c>`` stands for the ten-crop views (4 corners + centre,
each also flipped), and ``tenshift<d>`` for the ten-crop of center-crop models (``expand_views``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

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
