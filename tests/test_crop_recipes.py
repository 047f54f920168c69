"""The 40-px crop recipes of the published from-scratch FER nets (``TrainConfig.input: center_crop``): training
sees random crops, evaluation the center crop, and the ``tenshift<d>`` TTA policy is exactly torchvision's TenCrop."""

import torch
import torchvision.transforms.functional as TF

from fer_ray.config import TrainConfig
from fer_ray.data.augment import Augment, Preprocess
from fer_ray.loop import build_model
from fer_ray.tta import parse_view
from fer_ray.views import expand_views


def test_tenshift_views_on_a_center_crop_model_are_torchvisions_ten_crop():
    torch.manual_seed(0)
    faces = torch.rand(3, 1, 48, 48)
    model = build_model(TrainConfig(model="vggnet_fer", img_size=40, input="center_crop"))
    assert model.fer_cfg["input"] == "center_crop"
    pre = Preprocess.for_model(model.fer_cfg)
    views = expand_views(["tenshift4"])
    assert len(views) == 10 and views[0] == "identity" and views[5] == "hflip"
    ours = [((pre(parse_view(v)(faces)) * pre.std) + pre.mean)[:, :1] for v in views]
    tl, tr, bl, br, c, *flipped = TF.ten_crop(faces, 40)
    want = [c, tl, tr, bl, br]  # shift +4,+4 brings the top-left corner to the center crop, and so on
    want += [TF.hflip(x) for x in want]
    for view, got, ref in zip(views, ours, want, strict=True):
        assert torch.allclose(got, ref, atol=1e-5), view
    key = lambda t: tuple(t.flatten()[:8].tolist())  # noqa: E731  (TenCrop's flipped five, in its own order)
    assert {key(x) for x in flipped} == {key(x) for x in want[5:]}


def test_center_crop_models_train_on_random_crops_and_evaluate_the_center():
    model = build_model(TrainConfig(model="vggnet_fer", img_size=40, input="center_crop"))
    aug = Augment(TrainConfig().augment, crop=40)
    faces = torch.rand(4, 1, 48, 48)
    assert aug(faces).shape == (4, 1, 40, 40)
    pre = Preprocess.for_model(model.fer_cfg)
    x = pre(faces)
    assert x.shape == (4, 1, 40, 40)
    assert torch.allclose(x * pre.std + pre.mean, faces[..., 4:44, 4:44], atol=1e-6)
    assert model(x).shape == (4, 7)
    resize = Preprocess.for_model(build_model(TrainConfig(model="vggnet_fer", img_size=40)).fer_cfg)
    assert not torch.allclose(resize(faces), x), "the default input mode resizes"


def test_the_input_mode_survives_the_checkpoint_and_the_export(tmp_path):
    """A center-crop model rebuilt from its checkpoint (what TTA, evaluate and export load) still center-crops, and
    its exported ONNX graph gives the eager numbers."""
    import numpy as np
    import onnxruntime as ort

    from fer_ray.checkpoint import make_payload, model_from_checkpoint, write_checkpoint
    from fer_ray.export import MemberNet
    from fer_ray.tta import tta_logits

    cfg = TrainConfig(model="basic_cnn", img_size=40, input="center_crop")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    path = write_checkpoint(tmp_path, make_payload(model, 1, dict(cfg.to_dict(), in_chans=1), {}))
    rebuilt = model_from_checkpoint(str(path))
    assert rebuilt.fer_cfg["input"] == "center_crop"
    faces = torch.randint(0, 256, (8, 48, 48), dtype=torch.uint8)
    eager = tta_logits(rebuilt, faces, ["identity"])[0]
    assert torch.allclose(eager, model(faces[:, None, 4:44, 4:44].float().div(255).sub(0.5).div(0.25)), atol=1e-4)
    net = MemberNet(rebuilt).eval()
    torch.onnx.export(net, (faces[:, None].float() / 255,), tmp_path / "m.onnx", dynamo=False, opset_version=17,
                      input_names=["x"], dynamic_axes={"x": {0: "b"}})
    out = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"x": faces[:, None].float().numpy() / 255})[0]
    assert np.abs(out - eager.numpy()).max() < 1e-4
