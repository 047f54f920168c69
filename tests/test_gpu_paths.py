"""GPU code paths checked before a GPU runs them, through the same functions the GPU uses (``fer_ray.loop``,
``fer_ray.engine``), on the CPU: ``torch.autocast("cpu", ...)`` and ``torch.amp.GradScaler("cpu")``.

Regression tests for three bugs found by reading: (a) AMP ``auto`` chose bf16 on sm_70/75 because
``torch.cuda.is_bf16_supported()`` answers True there through emulation; (b) the GradScaler's state was not in the
checkpoint, so an fp16 run resumed from a checkpoint diverged from the uninterrupted one; (c) a run resumed exactly at
the unfreeze epoch of the two-phase recipe loaded the head-only optimizer state into the full-model optimizer
(``ValueError``).
"""

import numpy as np
import pytest
import torch

from fer_ray import engine
from fer_ray.config import TrainConfig
from fer_ray.data.synthetic import generate
from fer_ray.loop import TrainingRun

# fp16 runs at 16 px: on a CPU, fp16 autocast's convolution backward takes a slow path (1.5 s a step of basic_cnn at
# 32 px and batch 16 where fp32 and bf16 take 0.02 s, measured 2026-12-07), and its cost grows with the pixels.
FP16_PX = 16


@pytest.mark.parametrize("cap,expected", [((6, 1), None), ((7, 0), torch.float16), ((7, 5), torch.float16),
                                          ((8, 0), torch.bfloat16), ((8, 6), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_amp_auto_follows_compute_capability_not_is_bf16_supported(monkeypatch, cap, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: cap)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what sm_70/75 answer (emulated)
    assert engine.autocast_dtype(TrainConfig(amp="auto"), torch.device("cuda", 0)) is expected
    scaler = engine.grad_scaler(torch.device("cpu"), engine.amp_rule("auto", cap))
    assert (scaler is not None) == (expected is torch.float16), "fp16 (and only fp16) trains with a GradScaler"


def test_amp_on_the_cpu():
    cpu = torch.device("cpu")
    assert engine.autocast_dtype(TrainConfig(amp="auto"), cpu) is None  # auto: fp32 on the CPU
    assert engine.autocast_dtype(TrainConfig(amp="bf16"), cpu) is torch.bfloat16
    assert engine.autocast_dtype(TrainConfig(amp="fp16"), cpu) is torch.float16
    assert engine.autocast_dtype(TrainConfig(amp="off"), cpu) is None


@pytest.mark.parametrize("native", [True, False])
def test_amp_native_takes_bf16_only_where_the_cpu_has_it(monkeypatch, caplog, native):
    """``native``: bf16 on a CPU with avx512_bf16/AMX, fp32 on one without (emulated bf16 is many times slower);
    ``auto``'s rule on a GPU. An explicit ``bf16`` is kept on any CPU, with one warning where it is emulated."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cpu = torch.device("cpu")
    assert engine.autocast_dtype(TrainConfig(amp="native"), cpu) is (torch.bfloat16 if native else None)
    for cap in [(6, 1), (7, 5), (8, 0)]:
        assert engine.amp_rule("native", cap, cpu_bf16=native) is engine.amp_rule("auto", cap)
    engine._warn_emulated_bf16.cache_clear()
    with caplog.at_level("WARNING", logger="fer_ray.engine"):
        for _ in range(3):
            assert engine.autocast_dtype(TrainConfig(amp="bf16"), cpu) is torch.bfloat16
    assert len([r for r in caplog.records if "emulated" in r.message]) == (0 if native else 1)


def _arrays(n: int = 96, seed: int = 0) -> dict:
    data = generate(n, seed=seed)
    idx = np.random.default_rng(seed).permutation(n)
    return {"images": data.images, "labels": data.labels, "splits": {"train": idx[:64], "val": idx[64:]}}


def _weights(run: TrainingRun) -> dict:
    return {k: v.clone() for k, v in run.module.state_dict().items()}


def _resumed_equals_straight(cfg: TrainConfig, stop_after: int) -> tuple[TrainingRun, TrainingRun, dict]:
    """Run ``cfg`` straight through, and again stopped after ``stop_after`` epochs, checkpointed, rebuilt, resumed."""
    arrays = _arrays()
    straight = TrainingRun(cfg, arrays, torch.device("cpu"))
    straight.fit()
    first = TrainingRun(cfg, arrays, torch.device("cpu"))
    for _ in range(stop_after):
        first.train_epoch()
    payload = first.state_dict()
    resumed = TrainingRun(cfg, arrays, torch.device("cpu"))
    resumed.load_state_dict(payload)
    resumed.fit()
    return straight, resumed, payload


def test_amp_training_steps_on_cpu():
    """bf16 autocast and fp16 + GradScaler run the engine's training step: finite losses."""
    for amp in ("bf16", "fp16"):
        cfg = TrainConfig(model="basic_cnn", img_size=FP16_PX if amp == "fp16" else 32, epochs=1, batch_size=16,
                          amp=amp, num_workers=0)
        run = TrainingRun(cfg, _arrays(), torch.device("cpu"))
        assert run.amp_dtype is {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        assert (run.scaler is not None) == (amp == "fp16")
        history = run.fit()
        assert np.isfinite(history[0]["train_loss"]) and np.isfinite(history[0]["val_loss"])


def test_fp16_resume_restores_the_grad_scaler():
    cfg = TrainConfig(model="basic_cnn", img_size=FP16_PX, epochs=2, batch_size=16, amp="fp16", num_workers=0)
    straight, resumed, payload = _resumed_equals_straight(cfg, stop_after=1)
    # Epoch 1 moved the scaler away from a fresh one's state (its scale, or the count of good steps towards the next
    # doubling), so a resume that rebuilt it fresh would scale differently from the uninterrupted run later on.
    fresh = torch.amp.GradScaler("cpu").state_dict()
    assert payload["scaler"] is not None and payload["scaler"] != fresh
    assert resumed.scaler.state_dict() == straight.scaler.state_dict()
    for key, value in _weights(straight).items():
        assert torch.equal(value, _weights(resumed)[key]), key


def test_resume_at_the_unfreeze_epoch():
    """Two-phase recipe (head only for ``freeze_epochs``, then everything): stopped exactly at the switch, the resumed
    run loads the head-only optimizer into the head-only phase and switches as the uninterrupted run does."""
    cfg = TrainConfig(model="hybrid_effnet", img_size=32, epochs=3, freeze_epochs=1, batch_size=16, num_workers=0,
                      optimizer="adamw")
    straight, resumed, payload = _resumed_equals_straight(cfg, stop_after=1)
    assert payload["frozen"] is True and len(payload["optimizer"]["param_groups"][0]["params"]) == 2  # head w, b
    assert not resumed.frozen and resumed.epoch == 3
    for key, value in _weights(straight).items():
        assert torch.equal(value, _weights(resumed)[key]), key
    assert [h["val_loss"] for h in straight.history] == [h["val_loss"] for h in resumed.history]
