"""EMA weights are one training hook (``fer_ray.loop.EMA``): updated every step, evaluated every epoch beside the
raw weights, checkpointed, restored exactly on resume, and loadable as their own model."""

import torch

from fer_ray.checkpoint import model_from_checkpoint
from fer_ray.config import TrainConfig
from fer_ray.loop import EMA, TrainingRun
from fer_ray.testing import run_arrays


def test_ema_is_evaluated_checkpointed_and_resumed_exactly():
    cfg = TrainConfig(model="basic_cnn", img_size=32, epochs=3, batch_size=16, num_workers=0, ema={"decay": 0.9})
    arrays, cpu = run_arrays(), torch.device("cpu")
    straight = TrainingRun(cfg, arrays, cpu)
    hook = EMA(cfg.ema.decay)
    history = straight.fit([hook])
    assert all("val_acc_ema" in h and "val_loss_ema" in h for h in history)
    assert history[-1]["val_loss_ema"] != history[-1]["val_loss"], "the average differs from the raw weights"
    payload = straight.state_dict()
    ema_model = model_from_checkpoint(payload, weights="ema")
    assert all(torch.equal(v, hook.ema.module.state_dict()[k]) for k, v in ema_model.state_dict().items())

    first = TrainingRun(cfg, arrays, cpu)
    first_hook = EMA(cfg.ema.decay)
    first.hooks = [first_hook]
    first_hook.before_train(first)
    first.train_epoch()
    first_hook.after_epoch(first, {})
    resumed = TrainingRun(cfg, arrays, cpu)
    resumed.load_state_dict(first.state_dict())
    resumed_hook = EMA(cfg.ema.decay)
    resumed.fit([resumed_hook])
    for k, v in hook.ema.module.state_dict().items():
        assert torch.equal(v, resumed_hook.ema.module.state_dict()[k]), k
    assert [h["val_acc_ema"] for h in resumed.history] == [h["val_acc_ema"] for h in history]


def test_ema_is_off_by_default_and_checked():
    import pytest

    from fer_ray.config import ConfigError

    assert TrainConfig().ema.decay == 0.0
    with pytest.raises(ConfigError, match=r"train.ema.decay: must be in \[0, 1\)"):
        TrainConfig.from_dict({"ema": {"decay": 1.5}}, "train")
