"""The pure-torch engine: rank sharding, a training epoch that learns, evaluation."""

import torch

from fer_ray import engine
from fer_ray.config import TrainConfig
from fer_ray.data.augment import Augment, Preprocess
from fer_ray.models import create_model


def test_shards_are_disjoint_and_equal_sized():
    shards = [torch.cat(list(engine.shard_batches(103, 8, shuffle=True, seed=3, rank=r, world_size=2)))
              for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 48
    assert not set(shards[0].tolist()) & set(shards[1].tolist())


def test_eval_batches_cover_everything_in_order():
    idx = torch.cat(list(engine.shard_batches(10, 4, shuffle=False, drop_last=False)))
    assert idx.tolist() == list(range(10))


def test_training_reduces_loss_on_an_easy_problem():
    torch.manual_seed(0)
    n = 256
    labels = torch.randint(0, 7, (n,))
    images = (labels.view(-1, 1, 1) * 36).to(torch.uint8).expand(n, 48, 48).contiguous()  # brightness = class
    cfg = TrainConfig(model="basic_cnn", epochs=3, batch_size=32, lr=3e-3, augment={"strength": 0, "hflip": 0})
    model = create_model("basic_cnn", img_size=32)
    pre, aug = Preprocess.for_model(model.fer_cfg), Augment(cfg.augment)
    opt = engine.build_optimizer(cfg, model.parameters())
    first = engine.train_one_epoch(model, images, labels, opt, pre, aug, cfg, 0)
    for epoch in range(1, 4):
        last = engine.train_one_epoch(model, images, labels, opt, pre, aug, cfg, epoch)
    assert last["train_loss"] < first["train_loss"]
    assert engine.evaluate(model, images, labels, pre, cfg)["val_acc"] > 0.5


def test_amp_is_fp32_on_cpu():
    assert engine.autocast_dtype(TrainConfig(), torch.device("cpu")) is None
