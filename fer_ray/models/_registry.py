"""The model registry: ``@register_model`` entries, ``create_model`` and ``list_models``.

Each entry is a function ``fn(num_classes, in_chans, img_size, **kwargs) -> nn.Module`` registered with its
data config (default input size, channels, normalisation). ``create_model`` drops ``None`` kwargs (so a YAML
default never breaks a model that lacks the argument) and attaches ``model.fer_cfg`` to every model it
builds, which the data pipeline reads to resize, stack channels and normalise. Names ``timm/<name>`` reach
any timm model.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import asdict, dataclass

from torch import nn


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


_MODELS: dict[str, tuple[Callable[..., nn.Module], ModelCfg]] = {}


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


def is_model(name: str) -> bool:
    return name in _MODELS or name.startswith("timm/")


def model_cfg(name: str) -> ModelCfg:
    """The registered data config of ``name`` (timm models: read from timm's pretrained config)."""
    if name.startswith("timm/"):
        from fer_ray.models.timm_models import timm_model_cfg

        return timm_model_cfg(name.split("/", 1)[1])
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(list_models())} or timm/<name>")
    return _MODELS[name][1]


def create_model(
    name: str,
    num_classes: int = 7,
    in_chans: int | None = None,
    img_size: int | None = None,
    **kwargs,
) -> nn.Module:
    """Build a registered model (or ``timm/<name>``); ``None`` arguments fall back to the model's defaults."""
    cfg = model_cfg(name)
    in_chans = cfg.in_chans if in_chans is None else in_chans
    img_size = cfg.img_size if img_size is None else img_size
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if name.startswith("timm/"):
        from fer_ray.models.timm_models import create_timm_model

        model = create_timm_model(name.split("/", 1)[1], num_classes, in_chans, img_size, **kwargs)
    else:
        model = _MODELS[name][0](num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
    mean, std = cfg.mean, cfg.std
    if len(mean) != in_chans:  # normalisation follows the channel count actually built
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    model.fer_cfg = dict(cfg.to_dict(), arch=name, in_chans=in_chans, img_size=img_size, mean=mean, std=std)
    return model
