"""timm models: ``timm/<name>`` registry names, pretrained-weight loading and the EfficientNet transfer models.

``create_timm_model``/``timm_model_cfg`` back every ``timm/<name>`` the registry is asked for. Input channels are
chosen per model: ViT-family models (timm marks them ``fixed_input_size``: vit_*, visformer_*, …) take the gray image
stacked to 3 channels, every other timm model takes 1 channel (timm builds a 1-channel stem, and pretrained RGB stem
weights are summed over RGB, which equals feeding the gray image three times). The default input size, mean and std
come from timm's pretrained config (ImageNet statistics for most models; the registry collapses them to one channel
for gray input). ViT-family models are built at the requested ``img_size`` (position embeddings are resized when
weights are loaded); CNNs accept any size.

``pretrained`` may be ``False``, ``True`` (download through timm / the Hugging Face hub) or the path of a local
``.safetensors``/``.pth``/``.pt`` file (see ``load_pretrained``): the way in without internet access.

Freeze-then-unfreeze interface: any model with a ``freeze_backbone(frozen: bool)`` method supports the two-phase
transfer recipe (phase 1 trains the head on a frozen backbone, phase 2 fine-tunes everything). ``hybrid_effnet``
and ``efficientnet_b0_transfer`` are ``BackboneClassifier`` models (``.backbone``, ``.head``) that have it. A frozen
backbone also keeps its BatchNorm layers in eval mode (running statistics frozen) whatever ``model.train()`` is
called with.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from fer_ray.models._registry import ModelCfg, register_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema")
_PREFIXES = ("module.", "_orig_mod.")


def _pretrained_cfg(name: str) -> dict:
    import timm.models

    if not timm.models.is_model(name):
        raise KeyError(f"unknown timm model {name!r} (see timm.list_models())")
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg.to_dict() if cfg is not None else {}


def is_vit_family(name: str) -> bool:
    """Whether timm builds ``name`` for a fixed input size (ViT-family): it then takes ``img_size`` and 3 channels."""
    return bool(_pretrained_cfg(name).get("fixed_input_size", False))


def timm_model_cfg(name: str) -> ModelCfg:
    """The data config of timm model ``name``, read from timm's pretrained config.

    Args:
        name: A timm model name, with or without a pretrained tag (``resnet18``, ``resnet18.a1_in1k``).

    Returns:
        ``ModelCfg`` with in_chans 3 for ViT-family models and 1 otherwise, timm's default input size, mean and std.

    Raises:
        KeyError: ``name`` is not a timm model.
    """
    cfg = _pretrained_cfg(name)
    vit = bool(cfg.get("fixed_input_size", False))
    return ModelCfg(in_chans=3 if vit else 1, img_size=int(cfg.get("input_size", (3, 224, 224))[-1]),
                    mean=tuple(cfg.get("mean", IMAGENET_MEAN)), std=tuple(cfg.get("std", IMAGENET_STD)),
                    family="timm", description=f"timm {name} ({'ViT-family, 3-channel' if vit else '1-channel stem'})")


def create_timm_model(name: str, num_classes: int = 7, in_chans: int = 1, img_size: int = 224,
                      pretrained: bool | str | Path = False, drop_rate: float | None = None, **kwargs) -> nn.Module:
    """Build timm model ``name`` for ``num_classes`` outputs and ``in_chans`` input channels.

    Args:
        name: timm model name.
        num_classes: Classifier outputs.
        in_chans: Input channels (timm adapts the stem).
        img_size: Input size; passed to ViT-family models only (CNNs work at any size).
        pretrained: ``False``, ``True`` (timm hub download) or a local weights file (see ``load_pretrained``).
        drop_rate: Classifier dropout (timm's default when ``None``).
        **kwargs: Passed to ``timm.create_model`` (e.g. ``drop_path_rate``).

    Returns:
        The timm model.
    """
    if drop_rate is not None:
        kwargs["drop_rate"] = drop_rate
    if is_vit_family(name):
        kwargs["img_size"] = img_size
    return timm_create(name, pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)


def timm_create(name: str, pretrained: bool | str | Path = False, **kwargs) -> nn.Module:
    """``timm.create_model`` with ``pretrained`` as ``False``, ``True`` (hub) or a local weights file.

    Raises:
        RuntimeError: hub weights could not be fetched (offline) or a local file does not fit the model.
    """
    import timm

    if pretrained is True:
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except TypeError:
            raise
        except Exception as e:  # noqa: BLE001  (hub/network errors come in many types)
            raise _hub_error(name, e) from e
    return load_pretrained(timm.create_model(name, pretrained=False, **kwargs), pretrained)


def _hub_error(name: str, e: Exception) -> RuntimeError:
    return RuntimeError(
        f"could not load pretrained weights for {name} from the timm/Hugging Face hub ({type(e).__name__}: {e}). "
        f"Without internet access pass a local weights file instead: pretrained='/path/to/{name}.safetensors' "
        "(.safetensors, .pth or .pt); set HF_HUB_OFFLINE=1 to fail fast.")


def load_pretrained(model: nn.Module, pretrained: bool | str | Path | None) -> nn.Module:
    """Load weights into a timm ``model`` in place: nothing, hub weights or a local file.

    A local file (``.safetensors`` read with safetensors, anything else with ``torch.load(weights_only=True)``;
    a ``state_dict``/``model`` entry of a checkpoint dict and ``module.`` prefixes are unwrapped) is matched to the
    model: the first conv is adapted to the model's input channels with ``timm.models.adapt_input_conv``, classifier
    weights whose shape differs (other class count) are dropped, and everything else must match.

    Args:
        model: A timm model (its ``pretrained_cfg`` names the first conv and the classifier).
        pretrained: ``False``/``None`` (no-op), ``True`` (timm hub) or a local file path.

    Returns:
        ``model``.

    Raises:
        FileNotFoundError: the file does not exist.
        RuntimeError: hub weights could not be fetched, or keys other than the classifier are missing, unexpected
            or of another shape.
    """
    if pretrained is None or pretrained is False:
        return model
    if pretrained is True:
        return _load_from_hub(model)
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    state_dict = _apply_filter_fn(model, read_state_dict(path))
    state_dict = _adapt_first_conv(model, state_dict, cfg.get("first_conv"))
    _load_matching(model, state_dict, _as_tuple(cfg.get("classifier")), str(path))
    return model


def _load_from_hub(model: nn.Module) -> nn.Module:
    import timm.models

    cfg = getattr(model, "pretrained_cfg", None) or {}
    first_conv = _as_tuple(cfg.get("first_conv"))
    in_chans = model.get_submodule(first_conv[0]).in_channels if first_conv else 3
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    try:
        timm.models.load_pretrained(model, num_classes=getattr(model, "num_classes", 1000), in_chans=in_chans,
                                    filter_fn=filter_fn)
    except Exception as e:  # noqa: BLE001  (hub/network errors come in many types)
        raise _hub_error(cfg.get("architecture", type(model).__name__), e) from e
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``torch.save`` file, unwrapping checkpoint dicts and prefixes."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(str(path), device="cpu")
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise RuntimeError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        obj = next((obj[k] for k in _CHECKPOINT_KEYS if isinstance(obj.get(k), dict)), obj)
    out = {}
    for k, v in obj.items():
        for prefix in _PREFIXES:
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def _as_tuple(names: str | tuple | list | None) -> tuple[str, ...]:
    return () if not names else (names,) if isinstance(names, str) else tuple(names)


def _apply_filter_fn(model: nn.Module, state_dict: dict) -> dict:
    fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if fn is None:
        return state_dict
    try:
        return fn(state_dict, model)
    except TypeError:
        return fn(state_dict)


def _adapt_first_conv(model: nn.Module, state_dict: dict, first_conv: str | tuple | None) -> dict:
    from timm.models import adapt_input_conv

    for name in _as_tuple(first_conv):
        key = f"{name}.weight"
        weight = state_dict.get(key)
        conv = model.get_submodule(name)
        if weight is not None and weight.ndim == 4 and weight.shape[1] != conv.in_channels:
            state_dict[key] = adapt_input_conv(conv.in_channels, weight, base_chans=weight.shape[1])
    return state_dict


def _load_matching(model: nn.Module, state_dict: dict, classifier: tuple[str, ...], source: str) -> None:
    target = model.state_dict()

    def is_head(key: str) -> bool:
        return any(key == c or key.startswith(c + ".") for c in classifier)

    for k in [k for k in state_dict if is_head(k) and (k not in target or state_dict[k].shape != target[k].shape)]:
        del state_dict[k]
    wrong_shape = [k for k, v in state_dict.items() if k in target and v.shape != target[k].shape]
    if wrong_shape:
        raise RuntimeError(f"{source}: {len(wrong_shape)} tensors have another shape than in "
                           f"{type(model).__name__}, e.g. {wrong_shape[:3]}; is it the same architecture?")
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not is_head(k)]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"{source}: does not fit {type(model).__name__}: {len(missing)} missing keys "
                           f"{missing[:3]}, {len(result.unexpected_keys)} unexpected keys "
                           f"{result.unexpected_keys[:3]}; is it the same architecture?")


class BackboneClassifier(nn.Module):
    """A timm backbone giving pooled features, then dropout and a linear head; supports freeze-then-unfreeze."""

    def __init__(self, backbone: nn.Module, num_classes: int = 7, drop_rate: float = 0.2):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(backbone.num_features, num_classes))
        self.backbone_frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def freeze_backbone(self, frozen: bool = True) -> BackboneClassifier:
        """Stop (``True``) or resume (``False``) training the backbone: its grads and its BatchNorm statistics.

        Under DDP apply it before wrapping the model (DDP only syncs parameters that required grad when it was
        built): re-wrap, or build the optimizer again, when unfreezing.
        """
        self.backbone_frozen = frozen
        self.backbone.requires_grad_(not frozen)
        return self.train(self.training)

    def train(self, mode: bool = True) -> BackboneClassifier:
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self


def _effnet_classifier(num_classes: int, in_chans: int, drop_rate: float, pretrained: bool | str | Path,
                       **kwargs) -> BackboneClassifier:
    backbone = timm_create("efficientnet_b0", pretrained, num_classes=0, in_chans=in_chans, **kwargs)
    return BackboneClassifier(backbone, num_classes, drop_rate)


@register_model(in_chans=3, img_size=96, mean=IMAGENET_MEAN, std=IMAGENET_STD)
def hybrid_effnet(num_classes: int = 7, in_chans: int = 3, img_size: int = 96, drop_rate: float = 0.3,
                  pretrained: bool | str | Path = False, **kwargs) -> nn.Module:
    """Hybrid EfficientNet: timm efficientnet_b0 backbone at 96 px, global pool, dropout 0.3, linear head."""
    return _effnet_classifier(num_classes, in_chans, drop_rate, pretrained, **kwargs)


@register_model(in_chans=3, img_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
def efficientnet_b0_transfer(num_classes: int = 7, in_chans: int = 3, img_size: int = 224, drop_rate: float = 0.2,
                             pretrained: bool | str | Path = False, **kwargs) -> nn.Module:
    """EfficientNet-B0 transfer: timm efficientnet_b0 at 224 px, dropout 0.2, linear head; freeze-then-unfreeze."""
    return _effnet_classifier(num_classes, in_chans, drop_rate, pretrained, **kwargs)
