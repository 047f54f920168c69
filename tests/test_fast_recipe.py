"""The speed-recipe levers (issue 24) each do what they say, on generated tensors with fixed work: Nesterov SGD with
decoupled weight decay and a BatchNorm-bias lr group, Lookahead, per-step linear and one-cycle schedules, alternating
flips, progressive resizing (evaluation at the model's size), the whitened stem, ``airbench_fer`` and
``compile``'s fallback. Nothing here asserts on speed."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from fer_ray import engine
from fer_ray.config import AugmentConfig, ConfigError, TrainConfig, WhitenConfig
from fer_ray.data.augment import Augment, Preprocess, alternating_flip, flip_phase
from fer_ray.loop import TrainingRun
from fer_ray.models import create_model, list_models
from fer_ray.whiten import patch_covariance, stem_conv, whiten_stem

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def arrays(n_train: int = 64, n_val: int = 32, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    n = n_train + n_val
    return {"images": rng.integers(0, 256, (n, 48, 48), dtype=np.uint8), "labels": rng.integers(0, 7, n),
            "splits": {"train": np.arange(n_train), "val": np.arange(n_train, n)}}


def tiny(**kw) -> TrainConfig:
    base = {"model": "airbench_fer", "model_kwargs": {"width": 0.125}, "epochs": 2, "batch_size": 16,
            "augment": {"strength": 0.0, "hflip": 0.0}, "num_workers": 0}
    return TrainConfig.from_dict(base | kw, "train")


class BNNet(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Linear(4, 3))


# --- optimizer: parameter groups, decoupled weight decay, Lookahead ---------------------------------------------

def test_bn_biases_get_their_own_lr_and_the_default_keeps_one_group():
    model = create_model("airbench_fer", width=0.125)
    assert len(engine.param_groups(TrainConfig(), model)) == 1  # old checkpoints' optimizer state still loads
    cfg = TrainConfig(optimizer="adamw", lr=1e-3, bn_bias_lr_mult=8.0)
    opt = engine.build_optimizer(cfg, engine.param_groups(cfg, model))
    rest, biases = opt.param_groups
    bn_biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert {id(p) for p in biases["params"]} == bn_biases
    assert not bn_biases & {id(p) for p in rest["params"]}
    assert rest["lr"] == pytest.approx(1e-3) and biases["lr"] == pytest.approx(8e-3)
    assert rest["weight_decay"] == biases["weight_decay"] == cfg.weight_decay


@pytest.mark.parametrize("lr,batch,momentum", [(0.5, 256, 0.85), (2.0, 1024, 0.9), (0.1, 64, 0.5)])
def test_sgd_nesterov_decoupled_lr_and_weight_decay(lr, batch, momentum):
    cfg = TrainConfig(optimizer="sgd_nesterov", lr=lr, batch_size=batch, momentum=momentum, weight_decay=0.05,
                      bn_bias_lr_mult=64.0)
    opt = engine.build_optimizer(cfg, engine.param_groups(cfg, BNNet()))
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"]
    for group, mult in zip(opt.param_groups, (1.0, 64.0)):
        assert group["lr"] == pytest.approx(lr * (1 - momentum) * mult)
        # shrink per step through momentum: lr·wd/(1−m) = weight_decay·batch/1024, whatever lr, momentum, multiplier
        assert group["lr"] * group["weight_decay"] / (1 - momentum) == pytest.approx(0.05 * batch / 1024)


@pytest.mark.parametrize("batch", [64, 256])
def test_sgd_nesterov_decay_per_image_is_independent_of_lr_and_batch(batch):
    """With no gradient but the decay (and no momentum, so no transient), 4,096 images shrink a weight by
    (1 − wd·B/1024)^(4096/B) ≈ exp(−4·wd) whatever the lr and batch size."""
    for lr in (0.05, 3.0):
        p = nn.Parameter(torch.ones(3))
        cfg = TrainConfig(optimizer="sgd_nesterov", lr=lr, batch_size=batch, momentum=0.0, weight_decay=0.01)
        opt = engine.build_optimizer(cfg, [p])
        for _ in range(4096 // batch):
            p.grad = torch.zeros_like(p)
            opt.step()
        assert p.detach().tolist() == pytest.approx([(1 - 0.01 * batch / 1024) ** (4096 / batch)] * 3, rel=1e-4)
        assert p[0].item() == pytest.approx(np.exp(-0.04), rel=2e-4)


def test_lookahead_pulls_fast_weights_back_every_k_steps_and_resumes():
    cfg = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=0.0, lookahead={"k": 3, "alpha": 0.5})

    def run(steps: int, opt_state=None, start=None):
        p = nn.Parameter(torch.tensor([1.0, -2.0]) if start is None else start.clone())
        opt = engine.build_optimizer(cfg, [p])
        if opt_state:
            opt.load_state_dict(opt_state)
        for _ in range(steps):
            opt.zero_grad()
            ((p - 3.0) ** 2).sum().backward()
            opt.step()
        return p.detach(), opt

    def expected(steps: int) -> torch.Tensor:  # timm's rule: the slow weights start at the first sync point
        p, slow = torch.tensor([1.0, -2.0]), None
        for step in range(1, steps + 1):
            p = p - 0.1 * 2 * (p - 3.0)
            if step % 3 == 0:
                slow = p.clone() if slow is None else slow + 0.5 * (p - slow)
                p = slow.clone()
        return p

    p, opt = run(6)
    assert type(opt).__name__ == "Lookahead"
    assert torch.allclose(p, expected(6)) and torch.allclose(run(8)[0], expected(8))
    plain = 3.0 + (torch.tensor([1.0, -2.0]) - 3.0) * 0.8 ** 6  # six SGD steps without Lookahead
    assert not torch.allclose(p, plain)
    straight, _ = run(7)
    p4, opt4 = run(4)
    resumed, _ = run(3, opt4.state_dict(), p4)  # slow weights and step count come back from the state dict
    assert torch.equal(resumed, straight)


# --- schedules ------------------------------------------------------------------------------------------------

def lrs(cfg: TrainConfig, steps: int) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = engine.build_scheduler(cfg, opt, steps)
    out = []
    for _ in range(steps * cfg.epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_linear_schedule_values_at_given_steps():
    cfg = TrainConfig(scheduler="linear", warmup_fraction=0.25, epochs=2, lr=0.4)  # 20 steps, 5 of warm-up
    got = lrs(cfg, 10)
    assert got[0] == pytest.approx(0.4 / 5) and got[2] == pytest.approx(0.4 * 3 / 5)
    assert got[4] == pytest.approx(0.4) and got[5] == pytest.approx(0.4)
    assert got[10] == pytest.approx(0.4 * 10 / 15) and got[19] == pytest.approx(0.4 / 15)
    assert lrs(TrainConfig(scheduler="linear", epochs=1, lr=1.0), 4) == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_onecycle_schedule_values_at_given_steps():
    cfg = TrainConfig(scheduler="onecycle", warmup_fraction=0.3, epochs=1, lr=0.5)
    got = lrs(cfg, 100)
    assert got[0] == pytest.approx(0.5 / 25)
    assert max(got) == pytest.approx(0.5) and int(np.argmax(got)) == 29  # torch: the peak at pct·T − 1
    assert got[-1] == pytest.approx(0.5 / 25 / 1e4)
    assert all(a <= b for a, b in zip(got[:29], got[1:30])) and all(a >= b for a, b in zip(got[29:], got[30:]))


def test_step_schedulers_need_steps_and_are_checked():
    with pytest.raises(ValueError, match="steps per epoch"):
        engine.build_scheduler(TrainConfig(scheduler="linear"), torch.optim.SGD([nn.Parameter(torch.zeros(1))], 0.1))
    for raw, msg in [({"scheduler": "onecycle"}, "warmup_fraction: scheduler onecycle needs"),
                     ({"warmup_fraction": 0.2}, "warmup_fraction: is for scheduler linear or onecycle"),
                     ({"scheduler": "linear", "warmup_epochs": 1}, "warmup_epochs: scheduler linear warms up"),
                     ({"bn_bias_lr_mult": 0.0}, "bn_bias_lr_mult: must be > 0"),
                     ({"lookahead": {"alpha": 1.5}}, r"lookahead.alpha: must be in \(0, 1\]"),
                     ({"whiten": {"eps": 0.0}}, "whiten.eps: must be > 0"),
                     ({"optimizer": "sgd_momentum"}, "optimizer: must be one of")]:
        with pytest.raises(ConfigError, match=msg):
            TrainConfig.from_dict(raw, "train")


def test_the_run_steps_a_per_step_schedule_after_every_optimizer_step():
    cfg = tiny(scheduler="linear", warmup_fraction=0.25, optimizer="sgd_nesterov", lr=0.1, lookahead={"k": 2})
    run = TrainingRun(cfg, arrays(), torch.device("cpu"))
    assert engine.steps_per_epoch(64, cfg) == 4
    history = run.fit([])
    assert run.scheduler.last_epoch == 8  # 2 epochs × 4 steps
    assert history[0]["lr"] == pytest.approx(0.1 * (1 - 0.9) * engine.step_factor(cfg, 4, 8))
    assert history[-1]["lr"] == 0.0


# --- augmentation: alternating flips; progressive resizing -----------------------------------------------------

def test_alternating_flip_phases_are_fixed_balanced_and_alternate():
    idx = torch.arange(2000)
    phase = flip_phase(idx, seed=0)
    assert set(phase.unique().tolist()) == {0, 1} and 0.45 < phase.float().mean() < 0.55
    assert torch.equal(phase, flip_phase(idx, seed=0)) and not torch.equal(phase, flip_phase(idx, seed=1))
    x = torch.arange(6.0).view(1, 1, 1, 6).expand(2000, 1, 3, 6)
    flipped = [(alternating_flip(x, idx, epoch, 0)[:, 0, 0, 0] == 5).long() for epoch in range(4)]
    assert torch.equal(flipped[0], 1 - flipped[1]) and torch.equal(flipped[0], flipped[2])
    assert torch.equal(flipped[1], flipped[3]) and torch.equal(flipped[0], phase)


def test_augment_applies_alternating_flips_instead_of_random_ones():
    aug = Augment(AugmentConfig(strength=0.0, alternate_flip=True))
    assert not any("Flip" in type(op).__name__ for op in aug.ops)
    x = torch.rand(64, 1, 48, 48)
    idx = torch.arange(100, 164)
    assert torch.equal(aug(x, idx=idx, epoch=3, seed=7), alternating_flip(x, idx, 3, 7))
    with pytest.raises(ValueError, match="positions"):
        aug(x)
    with pytest.raises(ConfigError, match="alternate_flip: replaces the random flip"):
        AugmentConfig.from_dict({"alternate_flip": True, "hflip": 1.0}, "augment")


def test_progressive_resizing_trains_at_each_stage_and_evaluates_at_the_model_size():
    cfg = tiny(epochs=3, resize_stages=[[0, 32], [1, 40], [2, 48]], augment={"strength": 0.0, "alternate_flip": True})
    assert [cfg.resize_at(e) for e in range(3)] == [32, 40, 48]
    run = TrainingRun(cfg, arrays(), torch.device("cpu"))
    seen: list[tuple[bool, int]] = []
    run.module.register_forward_pre_hook(lambda m, inp: seen.append((m.training, inp[0].shape[-1])))
    run.fit([])
    train_sizes = [s for training, s in seen if training]
    assert train_sizes == [32] * 4 + [40] * 4 + [48] * 4
    assert {s for training, s in seen if not training} == {48}


def test_resize_stages_must_end_at_the_model_size():
    with pytest.raises(ConfigError, match="resize_stages: the last stage's size"):
        TrainConfig.from_dict({"img_size": 48, "resize_stages": [[0, 32], [2, 40]]}, "train")
    with pytest.raises(ConfigError, match="resize_stages: epochs must increase"):
        TrainConfig.from_dict({"resize_stages": [[2, 32], [2, 48]]}, "train")
    with pytest.raises(ValueError, match="must be the model's input size"):
        TrainingRun(tiny(resize_stages=[[0, 32]]), arrays(), torch.device("cpu"))  # airbench_fer: 48 px


# --- whitened stem -------------------------------------------------------------------------------------------

def correlated_images(n: int = 200) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(n, 1, 52, 52, generator=g), 5, stride=1)  # neighbours correlate
    return (smooth * 255).round().to(torch.uint8)[:, 0]


def test_whitened_stem_decorrelates_its_patches():
    images = correlated_images()
    model = create_model("airbench_fer", width=0.125)
    pre = Preprocess.for_model(model.fer_cfg)
    eig = whiten_stem(model, images, pre, WhitenConfig(enabled=True, eps=1e-6, images=200), seed=0)
    w = model.whiten.weight.detach().double().reshape(8, 4)
    assert w.shape[0] == 2 * 1 * 2 ** 2 and torch.equal(w[0::2], -w[1::2])  # ± pairs of the d = C·k² = 4 directions
    cov = patch_covariance(pre(images), (2, 2))
    out = w[0::2] @ cov @ w[0::2].T  # covariance of the whitened responses: ≈ identity
    assert torch.allclose(out, torch.diag(eig / (eig + 1e-6)), atol=1e-3)
    assert (eig[:-1] >= eig[1:]).all() and not model.whiten.weight.requires_grad and model.whiten.bias.requires_grad
    again = create_model("airbench_fer", width=0.125)
    whiten_stem(again, images, pre, WhitenConfig(enabled=True, eps=1e-6, images=200, frozen=False), seed=0)
    assert torch.equal(again.whiten.weight, model.whiten.weight) and again.whiten.weight.requires_grad


def test_a_wider_stem_keeps_its_own_filters_beyond_the_whitened_ones():
    model = create_model("resnet18_fer")
    conv = stem_conv(model)
    before = conv.weight.detach().clone()
    whiten_stem(model, correlated_images(40), Preprocess.for_model(model.fer_cfg), WhitenConfig(images=40))
    assert conv.out_channels == 64 and torch.equal(conv.weight[18:], before[18:])
    assert not torch.equal(conv.weight[:18], before[:18])
    with pytest.raises(ValueError, match="basic_cnn has none"):
        whiten_stem(create_model("basic_cnn"), correlated_images(4), Preprocess.for_model({"img_size": 48,
                    "in_chans": 1, "mean": (0.5,), "std": (0.25,)}), WhitenConfig())


def test_a_frozen_whitened_stem_stays_out_of_the_optimizer_in_a_run():
    run = TrainingRun(tiny(whiten={"enabled": True, "images": 48}, epochs=1), arrays(), torch.device("cpu"))
    stem = run.module.whiten.weight
    assert all(p is not stem for g in run.optimizer.param_groups for p in g["params"])
    before = stem.detach().clone()
    run.fit([])
    assert torch.equal(stem, before)


# --- the net and compile -------------------------------------------------------------------------------------

def test_airbench_fer_is_registered_with_a_stem_and_a_width_knob():
    assert "airbench_fer" in list_models()
    half = create_model("airbench_fer", width=0.5, img_size=40)
    assert isinstance(stem_conv(half), nn.Conv2d) and stem_conv(half).kernel_size == (2, 2)
    assert half.head.in_features == 128 and half(torch.randn(2, 1, 40, 40)).shape == (2, 7)


def test_compile_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no inductor here\nsecond line")

    monkeypatch.setattr(torch, "compile", broken)
    model = nn.Linear(3, 2)
    with caplog.at_level(logging.WARNING, logger="fer_ray.engine"):
        assert engine.compile_model(model, torch.device("cpu")) is model
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "no inductor here" in lines[0] and "second line" not in lines[0]


def test_compile_flag_builds_a_compiled_model(monkeypatch):
    """The flag wires ``torch.compile`` into the run (its graph is not executed here: inductor's first compile on a
    shared 2-core box takes minutes); the fallback is tested above."""
    calls = []

    def fake_compile(model, **kwargs):
        calls.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    run = TrainingRun(tiny(compile=True, epochs=1), arrays(), torch.device("cpu"))
    assert calls[-1] is run.module and run.model is run.module
