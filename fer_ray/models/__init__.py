"""Model zoo: importing this package registers every family module with the registry."""

from fer_ray.models import baselines, cnn, resnet, timm_models  # noqa: F401  (registers models)
from fer_ray.models._registry import ModelCfg, create_model, is_model, list_models, model_cfg, register_model

__all__ = ["ModelCfg", "create_model", "is_model", "list_models", "model_cfg", "register_model"]
