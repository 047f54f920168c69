"""Model zoo: importing this package registers every family module with the registry (``_registry``) and exposes
the factory (``_factory``: ``create_model``, ``model_cfg``, ``is_model``, ``check_model_names``)."""

from fer_ray.models import airbench, baselines, cnn, resnet, timm_models  # noqa: F401  (registers models)
from fer_ray.models._factory import check_model_names, create_model, is_model, model_cfg
from fer_ray.models._registry import ModelCfg, list_models, register_model

__all__ = ["ModelCfg", "check_model_names", "create_model", "is_model", "list_models", "model_cfg", "register_model"]
