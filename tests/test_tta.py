"""TTA: view parsing, and the batched multi-view forward equals the per-view loop."""

import pytest
import torch

from fer_ray.models import create_model, list_models, model_cfg
from fer_ray.tta import inference_model, parse_view, tta_logits, tta_logits_loop

VIEWS = ["identity", "hflip", "rot10", "rot-10", "shift2,-2", "scale1.1", "hflip+rot5", "hflip+shift-2,0"]


def test_batched_tta_equals_per_view_loop():
    torch.manual_seed(0)
    model = create_model("basic_cnn", img_size=40).eval()
    images = torch.randint(0, 256, (37, 48, 48), dtype=torch.uint8)
    batched = tta_logits(model, images, VIEWS, batch_size=64)
    looped = tta_logits_loop(model, images, VIEWS, batch_size=16)
    assert batched.shape == (len(VIEWS), 37, 7)
    assert torch.allclose(batched, looped, atol=1e-4)


def test_views_do_what_they_say():
    x = torch.rand(2, 1, 48, 48)
    assert torch.equal(parse_view("identity")(x), x)
    assert torch.equal(parse_view("hflip")(x), x.flip(-1))
    assert torch.allclose(parse_view("rot0")(x), x, atol=1e-5)
    shifted = parse_view("shift3,0")(x)
    assert torch.allclose(shifted[..., 10:40], x[..., 7:37], atol=1e-5)


def test_unknown_view_is_named():
    with pytest.raises(ValueError, match="unknown TTA view 'hflip\\+spin'"):
        parse_view("hflip+spin")


def test_ten_crop_policy_expands_and_crops():
    from fer_ray.tta import expand_views

    views = expand_views(["identity", "tencrop40"])
    assert len(views) == 11 and views[1] == "crop40tl" and views[-1] == "crop40c+hflip"
    x = torch.arange(48 * 48, dtype=torch.float32).view(1, 1, 48, 48)
    assert torch.equal(parse_view("crop48c")(x), x)  # a full-size crop is the identity
    tl, br = parse_view("crop24tl")(x), parse_view("crop24br")(x)
    assert tl.shape == x.shape and tl.max() < x[..., :24, :24].max() + 1 and br.min() > x[..., 24:, 24:].min() - 1
    assert torch.allclose(parse_view("crop24tl+hflip")(x), tl.flip(-1))
    model = create_model("basic_cnn", img_size=40).eval()
    images = torch.randint(0, 256, (5, 48, 48), dtype=torch.uint8)
    assert torch.allclose(tta_logits(model, images, views), tta_logits_loop(model, images, views), atol=1e-4)
    with pytest.raises(ValueError, match="crop size 60"):
        parse_view("crop60c")(x)


@pytest.mark.parametrize("name", list_models())
def test_inference_model_matches_the_model(name):
    """Every registered model: the channels-last, conv+BN-folded inference copy gives the same logits (trained BN
    statistics, not the identity defaults) and leaves the original untouched."""
    torch.manual_seed(0)
    model = create_model(name, img_size=min(model_cfg(name).img_size, 64))
    cfg = model.fer_cfg
    x = torch.randn(4, cfg["in_chans"], cfg["img_size"], cfg["img_size"])
    model.train()
    with torch.no_grad():
        model(x * 2 + 1)  # move BatchNorm running statistics away from (0, 1)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        fast = inference_model(model)
        assert not fast.training and fast.fer_cfg == cfg
        assert inference_model(fast) is fast  # already laid out: scored as it is, not copied again
        assert torch.allclose(fast(x.contiguous(memory_format=torch.channels_last)), model(x), atol=1e-4, rtol=1e-3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
