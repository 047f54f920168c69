"""Model zoo tests: every registered model is built, run forward/backward and costed; timm names and weights."""

from __future__ import annotations

import inspect
from functools import cache

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fer_ray.flops import count_gmacs, count_params, model_profile
from fer_ray.models import create_model, list_models, model_cfg
from fer_ray.models._registry import _MODELS

MODELS = list_models()
SMALL = 64  # size the 96/224 px models are trained backward at, to keep the suite fast on CPU


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@cache
def built(name: str, img_size: int | None = None) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, img_size=img_size)


def batch(model: nn.Module, n: int = 2, img_size: int | None = None) -> torch.Tensor:
    cfg = model.fer_cfg
    s = img_size or cfg["img_size"]
    return torch.randn(n, cfg["in_chans"], s, s)


def test_registry_has_the_model_zoo():
    expected = {"advanced_emotion_net", "advanced_emotion_net_improved", "resnet18_fer", "resnet_fer", "basic_cnn",
                "basic_cnn_bn", "baseline_cnn_v1", "baseline_cnn_v2", "deep_cnn_v1", "deep_cnn_v2", "attention_cnn",
                "large_cnn_224", "mlp_224", "hybrid_effnet", "efficientnet_b0_transfer"}
    assert expected <= set(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_signature_is_uniform(name):
    fn, cfg = _MODELS[name]
    params = inspect.signature(fn).parameters
    assert params["num_classes"].default == 7
    assert params["in_chans"].default == cfg.in_chans
    assert params["img_size"].default == cfg.img_size
    assert isinstance(params["drop_rate"].default, float)
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    assert cfg.description and len(cfg.mean) == len(cfg.std) == cfg.in_chans


@pytest.mark.parametrize("name", MODELS)
def test_forward_at_default_size(name):
    model = built(name).eval()
    n = 1 if model.fer_cfg["img_size"] > 96 else 2
    with torch.no_grad():
        assert model(batch(model, n)).shape == (n, 7)
    assert count_params(model) > 0


@pytest.mark.parametrize("name", MODELS)
def test_backward_reaches_every_parameter_and_cost(name):
    size = min(model_cfg(name).img_size, SMALL)
    model = built(name, size).train()
    model.zero_grad()
    F.cross_entropy(model(batch(model)), torch.tensor([0, 6])).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not no_grad
    assert count_gmacs(model) > 0 and model.training


@pytest.mark.parametrize("name", MODELS)
def test_runs_at_32px(name):
    model = create_model(name, img_size=32).eval()
    with torch.no_grad():
        assert model(batch(model, 1)).shape == (1, 7)


def test_gray_model_accepts_three_channels():
    model = create_model("advanced_emotion_net", in_chans=3, num_classes=5).eval()
    assert model.fer_cfg["in_chans"] == 3 and len(model.fer_cfg["mean"]) == 3
    assert model(torch.randn(2, 3, 48, 48)).shape == (2, 5)


def test_none_kwargs_are_dropped_and_unknown_kwargs_refused():
    def dropouts(model):
        return [m.p for m in model.modules() if isinstance(m, nn.Dropout)]

    assert dropouts(create_model("basic_cnn", drop_rate=None)) == [0.5]
    assert dropouts(create_model("basic_cnn", drop_rate=0.1)) == [0.1]
    with pytest.raises(TypeError):
        create_model("basic_cnn", no_such_option=1)


@pytest.mark.parametrize("name", ["no_such_net", "timm/no_such_net"])
def test_unknown_model_raises_key_error_naming_it(name):
    with pytest.raises(KeyError, match="no_such_net"):
        create_model(name)


def test_attention_cnn_returns_spatial_maps():
    model = built("attention_cnn").eval()
    logits, maps = model(batch(model), return_attention=True)
    assert logits.shape == (2, 7)
    assert [tuple(m.shape) for m in maps] == [(2, 1, 24, 24), (2, 1, 12, 12), (2, 1, 6, 6)]
    assert all(((m > 0) & (m < 1)).all() for m in maps)


def test_freeze_backbone_leaves_only_the_head_trainable():
    model = create_model("hybrid_effnet", img_size=SMALL)
    model.freeze_backbone(True)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.head.parameters()}
    model.train()
    assert model.head.training and not model.backbone.training
    assert not any(m.training for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    model.freeze_backbone(False)
    assert all(p.requires_grad for p in model.backbone.parameters()) and model.backbone.training


def test_timm_cnn_by_name_gray_48px():
    model = create_model("timm/resnet18", img_size=48).eval()
    assert model.fer_cfg["in_chans"] == 1 and model.fer_cfg["img_size"] == 48 and len(model.fer_cfg["mean"]) == 1
    assert model(torch.randn(2, 1, 48, 48)).shape == (2, 7)


def test_timm_vit_by_name_at_reduced_size():
    """vit_tiny_patch16_224 in a reduced config: built for 64 px input (4×4 patches), 3 channels."""
    model = create_model("timm/vit_tiny_patch16_224", img_size=64, drop_rate=0.1).eval()
    assert model.fer_cfg["in_chans"] == 3 and model.pos_embed.shape[1] == 4 * 4 + 1
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    assert count_gmacs(model) > 0


def test_gmacs_count_attention_and_restore_mode():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return F.scaled_dot_product_attention(x, x, x) * self.scale

    model = Attention().train()
    assert count_gmacs(model, in_chans=2, img_size=8) == pytest.approx(2 * 8 * 8 * (8 + 8) / 1e9)
    assert model.training


def test_model_profile():
    prof = model_profile("basic_cnn", img_size=64)
    assert prof["arch"] == "basic_cnn" and prof["img_size"] == 64 and prof["in_chans"] == 1
    assert prof["params"] > 0 and prof["gmacs"] > 0


def _save(state_dict: dict, path):
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    else:
        torch.save({"state_dict": state_dict, "epoch": 3}, path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file_loads_into_gray_timm_model(tmp_path, suffix):
    import timm

    source = timm.create_model("resnet18", pretrained=False).state_dict()  # RGB stem, 1000 classes
    path = tmp_path / f"resnet18{suffix}"
    _save(source, path)
    model = create_model("timm/resnet18", img_size=48, pretrained=str(path))
    loaded = model.state_dict()
    assert torch.equal(loaded["layer3.1.conv2.weight"], source["layer3.1.conv2.weight"])
    assert torch.allclose(loaded["conv1.weight"], source["conv1.weight"].sum(1, keepdim=True))
    assert loaded["fc.weight"].shape == (7, 512)


def test_local_weights_file_of_another_architecture_is_refused(tmp_path):
    import timm

    path = tmp_path / "resnet18.safetensors"
    _save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    with pytest.raises(RuntimeError, match="same architecture"):
        create_model("timm/resnet26", pretrained=str(path))
    with pytest.raises(FileNotFoundError):
        create_model("timm/resnet18", pretrained=str(tmp_path / "absent.pt"))


def test_local_weights_file_loads_into_hybrid_effnet(tmp_path):
    import timm

    source = timm.create_model("efficientnet_b0", pretrained=False).state_dict()
    path = tmp_path / "efficientnet_b0.safetensors"
    _save(source, path)
    model = create_model("hybrid_effnet", img_size=SMALL, pretrained=str(path))
    assert torch.equal(model.backbone.state_dict()["conv_stem.weight"], source["conv_stem.weight"])


def test_hub_weights_offline_raise_one_clear_error(monkeypatch):
    import timm

    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("Name or service not known")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match="local weights file"):
        create_model("timm/resnet18", pretrained=True)
