"""The model registry: the name → (builder, data config) table that ``@register_model`` fills, and ``list_models``.

Each entry is a function ``fn(num_classes, in_chans, img_size, **kwargs) -> nn.Module`` registered with its data
config (default input size, channels, normalisation). Building models (and reaching timm's) is the factory's job
(``fer_ray.models._factory``), as timm splits ``_registry`` from ``_factory``: family modules import only this one.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ModelCfg:
    """What the data pipeline needs to know about a model's input."""

    in_chans: int = 1
    img_size: int = 48
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)
    family: str = ""
    description: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


_MODELS: dict[str, tuple[Callable[..., Any], ModelCfg]] = {}


def register_model(fn: Callable | None = None, **cfg) -> Callable:
    """Register ``fn`` under its function name; use bare or as ``@register_model(in_chans=3, img_size=224)``."""

    def wrap(f: Callable) -> Callable:
        name = f.__name__
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        doc = (f.__doc__ or "").strip().splitlines()
        _MODELS[name] = (f, ModelCfg(family=f.__module__.rsplit(".", 1)[-1], description=doc[0] if doc else "", **cfg))
        return f

    return wrap(fn) if fn is not None else wrap


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style wildcard (``timm/*`` models are not listed)."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def registered(name: str) -> tuple[Callable[..., Any], ModelCfg] | None:
    """The builder and data config registered under ``name``, or ``None``."""
    return _MODELS.get(name)
