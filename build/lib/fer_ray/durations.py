"""Durations as users write them (``45m``, ``90s``, ``1.5h``, ``1h30m``, seconds) and as the log prints them: a leaf
module (no torch, no Ray, no fer_ray imports) so that ``fer_ray.config`` can check ``time_limit`` without importing
``fer_ray.budget``, which imports the config."""

from __future__ import annotations

import math
import re

_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([hms])")


def parse_duration(value: str | float | int) -> float:
    """Seconds in ``value``: a number of seconds (``600``, ``"600"``) or a duration (``"45m"``, ``"90s"``,
    ``"1.5h"``, ``"1h30m"``). Anything else, zero or negative is a one-line ``ValueError`` naming the value."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration (write 45m, 90s, 1.5h or seconds)")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            parts = _PART.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text or len({u for _, u in parts}) < len(parts):
                raise ValueError(f"{value!r} is not a duration (write 45m, 90s, 1.5h, 1h30m or seconds)") from None
            seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{value!r} is not a positive duration")
    return seconds


def format_duration(seconds: float) -> str:
    """``seconds`` as a person reads it: ``41s``, ``7m12s``, ``10m``, ``1h05m``."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        m, s = divmod(s, 60)
        return f"{m}m{s:02d}s" if s else f"{m}m"
    h, m = divmod(s // 60, 60)
    return f"{h}h{m:02d}m"
