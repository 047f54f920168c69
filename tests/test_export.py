"""``fer-ray export``: bundles of one member and of every combiner kind (with temperatures), run with ONNX Runtime
(and TorchScript) against fer_ray's own numbers for the same 256+ images: the logit store (``tta_logits`` scored
in-process) and ``reproduce_ensemble`` (the store + each ensemble's fitted numbers); every export also checks
itself against the eager path. The tiny experiment is built without Ray: members at 48, 20, 24 and 52 px (1 and 3
channels, ImageNet normalisation, a non-divisible adaptive pool), TTA views of each kind, ensembles fitted on val."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fer_ray.bundle import BundleError, load_bundle
from fer_ray.checkpoint import save_checkpoint
from fer_ray.cli import main
from fer_ray.config import SweepConfig, TrainConfig
from fer_ray.data import synthetic
from fer_ray.data.dataset import CLASSES
from fer_ray.ensemble import EnsembleSpec, reproduce_ensemble, run_ensemble
from fer_ray.export import build_view, export_bundle
from fer_ray.flops import count_gmacs, count_params
from fer_ray.inference import fill_store
from fer_ray.metrics import softmax
from fer_ray.models import create_model
from fer_ray.store import read_logits
from fer_ray.sweep import write_setup
from fer_ray.tta import parse_view

MEMBERS = [("basic_cnn", 48, 1), ("baseline_cnn_v1", 20, 1), ("mlp_224", 24, 3), ("mlp_224", 52, 1)]
"""(arch, input size, channels), cheap ones: no resize, shrinking (antialiased) and enlarging resizes, 3-channel and
1-channel ImageNet normalisation, and an ``AdaptiveAvgPool2d`` whose output does not divide its input (5 → 12),
which the ONNX exporter refuses."""
VIEWS = ["identity", "hflip+rot-10", "crop40c"]
"""An exact step (flip, a gather), a warp (rotation, a grid_sample) and a crop; ``test_views_match_tta`` checks every
kind alone."""
COMBINERS = {"mean_t": "mean_logits", "probs_t": "mean_probs", "nll_t": "nll_weights", "greedy_t": "greedy",
             "stack_t": "stacking"}


def make_experiment(root: Path, members=MEMBERS, views=VIEWS, n: int = 520) -> Path:
    """A fer_ray experiment at ``root`` without Ray: synthetic data (train/val/public_test), one checkpoint per
    member (random weights, the last layer scaled up so the outputs are confident and far from uniform: equality
    is then a sharp test), TTA logits of ``views`` scored in-process into the store."""
    data = synthetic.generate(n, seed=0)
    splits = stratified_splits(data.labels)
    cfg = SweepConfig.from_dict({"name": root.name, "data": {"synthetic_n": n, "cache_dir": str(root / "cache")},
                                 "train": {"epochs": 1, "batch_size": 32, "num_workers": 0}, "asha": {"max_t": 1},
                                 "tta_views": views},
                                "sweep")
    write_setup(cfg, root, data, splits)
    rows = []
    for i, (arch, size, chans) in enumerate(members):
        tc = TrainConfig(model=arch, img_size=size, epochs=1, batch_size=32, num_workers=0, seed=i)
        torch.manual_seed(i)
        model = create_model(arch, img_size=size, in_chans=chans)
        with torch.no_grad():
            [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].weight.mul_(10.0)
        config = dict(tc.to_dict(), in_chans=chans)
        ckpt = save_checkpoint(root / "ck" / f"m{i}", 1, model.eval(), config, {"val_acc": 0.5})
        rows.append({"trial_id": f"m{i}", "arch": arch, "img_size": size, "in_chans": chans,
                     "params": count_params(model), "gmacs": count_gmacs(model), "best_val_acc": 0.5 - i / 100,
                     "best_epoch": 1, "epochs_run": 1, "stopped_early": False, "checkpoint": str(ckpt),
                     "config": json.dumps(config, sort_keys=True)})
    pd.DataFrame(rows).to_parquet(root / "trials.parquet", index=False)
    roles = json.loads((root / "split_roles.json").read_text())
    fill_store(root, data, splits, views, roles, progress=False, on_ray=False)
    return root


def stratified_splits(labels: np.ndarray) -> dict[str, np.ndarray]:
    """train / val / public_test with every class in val at least twice (stacking's cross-validation needs it)."""
    rng, out = np.random.default_rng(0), {"train": [], "val": [], "public_test": []}
    for c in range(len(CLASSES)):
        ids = rng.permutation(np.flatnonzero(labels == c))
        k = max(2, len(ids) // 4)
        out["val"] += ids[:k].tolist()
        out["public_test"] += ids[k:2 * k].tolist()
        out["train"] += ids[2 * k:].tolist()
    return {s: np.sort(np.array(v, dtype=np.int64)) for s, v in out.items()}


def ensemble_spec(name: str, combiner: str, members: list[str], temperature: bool = True) -> EnsembleSpec:
    raw = {"name": name, "members": members, "combiner": combiner, "temperature": temperature}
    if "oof_folds" in {f.name for f in dataclasses.fields(EnsembleSpec)}:
        raw["oof_folds"] = 0  # the out-of-fold estimate is not what these tests check
    return EnsembleSpec.from_dict(raw, "test")


@pytest.fixture(scope="module")
def exp(tmp_path_factory) -> Path:
    root = make_experiment(tmp_path_factory.mktemp("export") / "tiny")
    ids = [f"m{i}" for i in range(len(MEMBERS))]
    for name, combiner in COMBINERS.items():
        run_ensemble(root, ensemble_spec(name, combiner, ids))
    return root


def stored(exp: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The images of val + public_test and fer_ray's own logits for them: the store's for a member (views
    averaged), ``reproduce_ensemble`` (store + fitted numbers) for an ensemble."""
    data = synthetic.generate(520, seed=0)
    roles = json.loads((exp / "split_roles.json").read_text())
    images, logits = [], []
    for split in [s for s, r in roles.items() if r != "fit"]:
        ls = read_logits(exp, name, split) if name not in COMBINERS else None
        rows = np.array([int(i.rsplit(":", 1)[1]) for i in (ls or read_logits(exp, "m0", split)).ids])
        images.append(data.images[rows])
        logits.append(ls.logits.mean(0) if ls else reproduce_ensemble(exp, name, split))
    return np.concatenate(images), np.concatenate(logits)


def test_views_match_tta():
    x = torch.from_numpy(synthetic.generate(16, seed=3).images).unsqueeze(1).float() / 255
    for view in [*VIEWS, "hflip", "rot10", "rot-7.5", "shift2,-1", "shift-3,2", "scale1.1", "scale0.9", "crop36tl",
                 "crop44br+hflip", "hflip+scale1.2+rot5"]:
        diff = (build_view(view)(x) - parse_view(view)(x)).abs().max().item()
        assert diff < 2e-5, (view, diff)
    with pytest.raises(BundleError, match="view 'rot' cannot be exported"):
        build_view("rot")


@pytest.fixture(scope="module")
def bundles(exp, tmp_path_factory) -> dict[str, Path]:
    """One ONNX bundle per member/ensemble name, exported on first use."""
    root, made = tmp_path_factory.mktemp("bundles"), {}

    def get(name: str) -> Path:
        if name not in made:
            export_bundle(exp, root / name, **({"ensemble": name} if name in COMBINERS else {"member": name}))
            made[name] = root / name
        return made[name]

    return get


@pytest.mark.parametrize("name", ["m1", *COMBINERS])
def test_onnx_bundle_equals_fer_ray(exp, bundles, name):
    card = json.loads((bundles(name) / "model_card.json").read_text())
    assert card["check"]["max_abs_diff_probs_vs_fer_ray"] <= 1e-4 and card["kind"] == ("model" if name == "m1"
                                                                                     else "ensemble")
    if name != "m1":
        assert card["combiner"]["name"] == COMBINERS[name] and card["combiner"]["temperature"] > 0
    images, logits = stored(exp, name)
    assert len(images) >= 256
    bundle = load_bundle(bundles(name))
    probs, out = bundle.predict(images, batch_size=100)  # batches of 100, 100, ...: the batch axis is dynamic
    np.testing.assert_allclose(probs, softmax(logits), atol=1e-4, rtol=0)
    np.testing.assert_allclose(out, logits, atol=1e-3, rtol=1e-4)
    assert (probs.argmax(1) == logits.argmax(1)).mean() > 0.99


def test_model_card_and_readme(exp, bundles):
    on_disk = json.loads((bundles("nll_t") / "model_card.json").read_text())
    assert on_disk["name"] == "nll_t" and on_disk["classes"] == list(CLASSES)
    assert on_disk["input"]["shape"] == ["batch", 48, 48] and on_disk["input"]["dtype"] == "uint8"
    assert {m["arch"] for m in on_disk["members"]} <= {a for a, _, _ in MEMBERS}
    assert on_disk["cost"]["gmacs_per_image"] == pytest.approx(sum(m["gmacs_per_view"] for m in on_disk["members"])
                                                               * len(VIEWS))
    info = json.loads((exp / "ensembles" / "nll_t.json").read_text())
    assert on_disk["metrics"]["val"]["role"] == "select" and on_disk["metrics"]["public_test"]["role"] == "report"
    assert on_disk["metrics"]["public_test"]["accuracy"] == pytest.approx(info["metrics"]["public_test"]["accuracy"])
    assert on_disk["data"]["fingerprint"] == json.loads((exp / "data.json").read_text())["fingerprint"]
    assert {"fer_ray", "torch", "onnx", "onnxruntime"} <= set(on_disk["versions"])
    readme = (bundles("nll_t") / "README.md").read_text()
    assert "| public_test | report |" in readme and "uint8 [batch, 48, 48]" in readme


def test_torchscript_bundle(exp, bundles, tmp_path):
    shutil.copytree(bundles("stack_t"), tmp_path / "b")
    export_bundle(exp, tmp_path / "b", ensemble="stack_t", fmt="torchscript")  # replaces the ONNX bundle
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["README.md", "model.pt", "model_card.json"]
    images, logits = stored(exp, "stack_t")
    probs, _ = load_bundle(tmp_path / "b").predict(images)
    np.testing.assert_allclose(probs, softmax(logits), atol=1e-4, rtol=0)


def test_export_refuses_with_one_line(exp, tmp_path, monkeypatch, capsys):
    from fer_ray import export as ex

    assert main(["export", str(exp), "--out", str(tmp_path / "x")]) == 2
    assert "exactly one of --ensemble" in capsys.readouterr().err
    assert main(["export", str(exp), "--ensemble", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "ensemble 'nope'" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(["export", str(exp), "--member", "m0", "--out", str(tmp_path / "busy")]) == 2
    assert "not a fer_ray bundle" in capsys.readouterr().err

    class FFT(torch.nn.Module):  # an op the ONNX exporter has no symbolic for
        def forward(self, x):
            return x + torch.fft.fft2(x).real * 0

    real = ex.exportable
    monkeypatch.setattr(ex, "exportable", lambda m: torch.nn.Sequential(FFT(), real(m)).requires_grad_(False)
                        if m.fer_cfg["arch"] == "mlp_224" else real(m))
    with pytest.raises(BundleError, match=r"member m2 \(mlp_224 @ 24px\) cannot be exported to onnx: "):
        export_bundle(exp, tmp_path / "bad", ensemble="mean_t")
    assert not (tmp_path / "bad" / "model_card.json").exists()


def test_bad_bundles_are_one_line_errors(bundles, tmp_path, capsys):
    with pytest.raises(BundleError, match="no such bundle folder"):
        load_bundle(tmp_path / "missing")
    shutil.copytree(bundles("m1"), tmp_path / "b")
    graph = tmp_path / "b" / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:-10])
    with pytest.raises(BundleError, match="sha256 differs"):
        load_bundle(tmp_path / "b")
    (tmp_path / "b" / "model_card.json").write_text("{not json")
    with pytest.raises(BundleError, match="unreadable model card"):
        load_bundle(tmp_path / "b")
    assert main(["predict", str(tmp_path / "b"), str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unreadable model card" in err and "\n" not in err


def _onnx_run(module: torch.nn.Module, example: torch.Tensor, x: np.ndarray, path: Path) -> np.ndarray:
    torch.onnx.export(module, (example,), path, dynamo=False, opset_version=17, input_names=["x"],
                      dynamic_axes={"x": {0: "b"}})
    import onnxruntime as ort

    return ort.InferenceSession(str(path)).run(None, {"x": x})[0]


@pytest.mark.parametrize(("size", "chans", "mode"), [(48, 1, "resize"), (20, 1, "resize"), (52, 3, "resize"),
                                                     (40, 1, "center_crop"), (96, 3, "resize")])
def test_the_graph_preprocesses_with_preprocess(size, chans, mode, tmp_path):
    """Training, scoring and the exported graph share one ``Preprocess``: its matrix resize equals
    ``F.interpolate`` (bilinear, antialiased when shrinking), it exports to ONNX as it is, and ``MemberNet`` holds
    it."""
    from fer_ray.data.augment import Preprocess
    from fer_ray.export import MemberNet

    cfg = {"img_size": size, "in_chans": chans, "mean": [0.5] * chans, "std": [0.25] * chans, "input": mode}
    pre = Preprocess.for_model(cfg)
    faces = torch.from_numpy(synthetic.generate(6, seed=1).images)
    x = faces.unsqueeze(1).float() / 255
    if mode == "center_crop":
        top = (48 - size) // 2
        want = x[..., top:top + size, top:top + size]
    else:
        want = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                               antialias=size < 48) if size != 48 else x
    want = (want.expand(-1, chans, -1, -1) - 0.5) / 0.25
    assert torch.allclose(pre(faces), want, atol=4e-6) and torch.allclose(pre(x), want, atol=4e-6)
    if mode == "resize":  # another input size gets its own matrices
        big = torch.rand(2, 1, 60, 60)
        ref = torch.nn.functional.interpolate(big, size=(size, size), mode="bilinear", align_corners=False,
                                              antialias=size < 60)
        assert torch.allclose(pre(big), (ref.expand(-1, chans, -1, -1) - 0.5) / 0.25, atol=4e-6)
    out = _onnx_run(pre, x[:2], x.numpy(), tmp_path / "pre.onnx")
    np.testing.assert_allclose(out, pre(x).numpy(), atol=1e-5, rtol=0)
    model = create_model("basic_cnn", img_size=size, in_chans=chans)
    model.fer_cfg |= {"input": mode}
    net = MemberNet(model)
    assert isinstance(net.preprocess, Preprocess) and net.preprocess.center_crop == (mode == "center_crop")


def test_views_export_as_tta_runs_them(tmp_path):
    """``ViewStack`` (gathers and ``grid_sample``s) in ONNX Runtime, at another batch size than traced, gives the
    eager views."""
    from fer_ray.tta import ViewStack

    views = ["identity", "hflip", "shift2,-1", "rot10", "crop40tr+hflip", "scale0.9+shift-1,0"]
    x = torch.from_numpy(synthetic.generate(5, seed=2).images).unsqueeze(1).float() / 255
    stack = ViewStack([build_view(v) for v in views])
    out = _onnx_run(stack, x[:2], x.numpy(), tmp_path / "views.onnx")
    assert out.shape == (len(views) * 5, 1, 48, 48)
    np.testing.assert_allclose(out, stack(x).numpy(), atol=1e-6, rtol=0)
