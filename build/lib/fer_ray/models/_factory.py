"""The model factory: ``create_model`` and ``model_cfg`` for registered names and ``timm/<name>``, and
``check_model_names`` (the one place a config's model names are checked, when a sweep is loaded).

``create_model`` drops ``None`` kwargs (so a YAML default never breaks a model that lacks the argument) and attaches
``model.fer_cfg`` to every model it builds, which the data pipeline reads to resize, stack channels and normalise.
"""

from __future__ import annotations

from torch import nn

from fer_ray.models._registry import ModelCfg, list_models, registered


def is_model(name: str) -> bool:
    """A registered name, or ``timm/<name>`` of a model timm knows."""
    if name.startswith("timm/"):
        import timm.models

        return timm.models.is_model(name.split("/", 1)[1])
    return registered(name) is not None


def model_cfg(name: str) -> ModelCfg:
    """The registered data config of ``name`` (timm models: read from timm's pretrained config)."""
    if name.startswith("timm/"):
        from fer_ray.models.timm_models import timm_model_cfg

        return timm_model_cfg(name.split("/", 1)[1])
    entry = registered(name)
    if entry is None:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(list_models())} or timm/<name>")
    return entry[1]


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
        model = registered(name)[0](num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
    mean, std = cfg.mean, cfg.std
    if len(mean) != in_chans:  # normalisation follows the channel count actually built
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    model.fer_cfg = dict(cfg.to_dict(), arch=name, in_chans=in_chans, img_size=img_size, mean=mean, std=std)
    return model


def check_model_names(sweep) -> None:
    """Raise ``ConfigError`` (one line naming the field) for any model name in a ``SweepConfig`` that neither the
    registry nor timm knows: ``train.model``, ``search_space.model`` candidates and ``placement`` keys."""
    from fer_ray.config import ConfigError

    def check(name, where: str) -> None:
        if not isinstance(name, str) or not is_model(name):
            hint = "timm has no such model (see timm.list_models())" if str(name).startswith("timm/") else \
                "see `fer-ray models`, or timm/<name>"
            raise ConfigError(f"{where}: unknown model {name!r} ({hint})")

    check(sweep.train.model, "train.model")
    spec = sweep.search_space.get("model", {})
    for name in spec.get("choice", []) + spec.get("grid", []):
        check(name, "search_space.model")
    for name in sweep.placement:
        if name != "default":
            check(name, f"placement.{name}")
