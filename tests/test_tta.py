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


def _kornia_reference(name: str, x: torch.Tensor) -> torch.Tensor:
    """The views as TTA computed them before the geometry table: kornia ``warp_affine`` (border padding) for
    rotations, shifts and scalings, crop + ``F.interpolate`` for crops, ``torch.flip`` for flips."""
    import kornia.geometry.transform as KT

    from fer_ray.views import parse_view_spec

    for op, args in parse_view_spec(name):
        b, _, h, w = x.shape
        if op == "hflip":
            x = x.flip(-1)
        elif op == "crop":
            size, pos = args
            top = {"tl": 0, "tr": 0, "bl": h - size, "br": h - size, "c": (h - size) // 2}[pos]
            left = {"tl": 0, "tr": w - size, "bl": 0, "br": w - size, "c": (w - size) // 2}[pos]
            x = torch.nn.functional.interpolate(x[..., top:top + size, left:left + size], size=(h, w),
                                                mode="bilinear", align_corners=False)
        else:
            angle, shift, scale = {"rotate": (args[0], (0, 0), 1.0), "shift": (0.0, args, 1.0),
                                   "scale": (0.0, (0, 0), args[0])}[op]
            center = torch.tensor([[(w - 1) / 2, (h - 1) / 2]]).expand(b, 2)
            mat = KT.get_rotation_matrix2d(center, torch.full((b,), angle), torch.full((b, 2), scale))
            mat[:, 0, 2] += shift[0]
            mat[:, 1, 2] += shift[1]
            x = KT.warp_affine(x, mat, (h, w), padding_mode="border")
    return x


@pytest.mark.parametrize("size", [48, 40])
def test_every_kind_of_view_matches_its_earlier_implementation(size):
    """The geometry table executed by ``ViewStep`` (gather or ``grid_sample``) gives what kornia and
    ``F.interpolate`` gave (float noise only), on the faces' size and on another one."""
    from fer_ray.data import synthetic

    x = torch.from_numpy(synthetic.generate(16, seed=3).images).unsqueeze(1).float() / 255
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear") if size != 48 else x
    for view in [*VIEWS, "rot-7.5", "shift-3,2", "scale0.9", "crop40c", "crop36tl", "crop40tr", "crop40bl",
                 "crop40br+hflip", "hflip+scale1.2+rot5", "crop24tl"]:
        diff = (parse_view(view)(x) - _kornia_reference(view, x)).abs().max().item()
        assert diff < 2e-5, (view, size, diff)


def test_whole_pixel_views_are_exact_gathers():
    x = torch.rand(3, 1, 48, 48)
    assert [step.gather for step in parse_view("hflip+shift2,-1+crop48c")] == [True, True, True]
    assert not parse_view("rot10")[0].gather and not parse_view("crop40c")[0].gather
    rows, cols = (torch.arange(48) + 1).clamp(0, 47), (torch.arange(48) - 2).clamp(0, 47)  # border padding
    assert torch.equal(parse_view("shift2,-1")(x), x[..., rows, :][..., cols])  # content moves 2 right, 1 up
    assert torch.equal(parse_view("hflip+hflip")(x), x)


def test_the_view_table_is_what_tta_and_export_run():
    """One table (``fer_ray.views.GEOMETRY``) lists every step; the TTA modules are built from it alone."""
    from fer_ray.tta import ViewStack, ViewStep
    from fer_ray.views import GEOMETRY, parse_view_spec

    assert set(GEOMETRY) == {op for v in ["hflip", "rot1", "shift1,1", "scale1.1", "crop40c"]
                             for op, _ in parse_view_spec(v)}
    stack = ViewStack(["identity", "hflip+rot10"])
    assert all(isinstance(m, ViewStep) for m in stack.modules() if not isinstance(m, torch.nn.Sequential | ViewStack
                                                                                   | torch.nn.ModuleList))
    x = torch.rand(2, 1, 48, 48)
    assert torch.equal(stack(x), torch.cat([x, parse_view("hflip+rot10")(x)]))
