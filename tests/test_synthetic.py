"""The synthetic generator: FER class balance, determinism by seed, Kaggle CSV form, learnable structure."""

import numpy as np
import pytest
import torch

from fer_ray import engine
from fer_ray.config import TrainConfig
from fer_ray.data import CLASSES
from fer_ray.data.augment import Augment, Preprocess
from fer_ray.data.ingest import load_dataset
from fer_ray.data.synthetic import FER_TRAIN_COUNTS, generate, write_csv, write_folders
from fer_ray.models import create_model


@pytest.fixture(scope="module")
def data():
    return generate(2100, seed=0)


def test_class_balance_follows_fer2013(data):
    got = np.bincount(data.labels, minlength=7) / len(data)
    want = FER_TRAIN_COUNTS / FER_TRAIN_COUNTS.sum()
    assert np.abs(got - want).max() < 0.002
    assert got.argmin() == CLASSES.index("disgust")


def test_every_class_in_every_split(data):
    for usage in range(3):
        assert (np.bincount(data.labels[data.usage == usage], minlength=7) > 0).all()


def test_deterministic_by_seed():
    a, b, c = generate(200, seed=5), generate(200, seed=5), generate(200, seed=6)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)
    assert a.images.dtype == np.uint8 and a.images.shape == (200, 48, 48)


def test_learnable_but_not_trivial():
    """A small CNN trained for 4 epochs lands clearly above the majority class and clearly below 100 %.

    The demo's basic_cnn trial at 48 px (AdamW 1e-3) on 4,000 images, batch 32: 400 steps, about half the images the
    demo's 6,000 x 5 epochs see. Measured 0.66 held-out accuracy with this seed and with the next one (generator seed
    2, torch seed 1), against a 0.25 majority class; 3,000 images x 3 epochs stays near the majority class.
    """
    torch.manual_seed(0)
    data = generate(4000, seed=1)
    tr, te = data.usage == 0, data.usage != 0
    x, y = torch.from_numpy(data.images[tr]), torch.from_numpy(data.labels[tr])
    cfg = TrainConfig(model="basic_cnn", epochs=4, batch_size=32, lr=1e-3, optimizer="adamw")
    model = create_model("basic_cnn", img_size=48)
    pre, aug = Preprocess.for_model(model.fer_cfg), Augment(cfg.augment)
    opt = engine.build_optimizer(cfg, model.parameters())
    for epoch in range(cfg.epochs):
        engine.train_one_epoch(model, x, y, opt, pre, aug, cfg, epoch)
    acc = engine.evaluate(model, torch.from_numpy(data.images[te]), torch.from_numpy(data.labels[te]), pre,
                          cfg)["val_acc"]
    majority = np.bincount(data.labels[te]).max() / te.sum()
    assert majority + 0.2 < acc < 0.95, (acc, majority)


def test_csv_and_folders_round_trip_through_the_real_loaders(tmp_path):
    data = generate(120, seed=3)
    csv = write_csv(tmp_path / "fer2013.csv", data)
    assert csv.read_text().splitlines()[0] == "emotion,pixels,Usage"
    assert not list(tmp_path.glob("*.tmp"))
    loaded = load_dataset(csv)
    assert np.array_equal(loaded.images, data.images) and np.array_equal(loaded.labels, data.labels)
    assert np.array_equal(loaded.usage, data.usage)
    folders = load_dataset(write_folders(tmp_path / "folders", data))
    order = np.argsort([int(i.rsplit("_", 1)[1].split(".")[0]) for i in folders.ids])
    assert np.array_equal(folders.images[order], data.images)
    assert np.array_equal(folders.usage[order], data.usage)
