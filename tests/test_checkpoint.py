"""Checkpoints: self-describing round trip, sha256 manifest refusal of tampered files, pruning, resume lookup."""

import pytest
import torch

from fer_ray.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from fer_ray.models import create_model


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("advanced_emotion_net", img_size=40, drop_rate=0.3)


def test_round_trip_rebuilds_model_by_name(tmp_path, model):
    path = save_checkpoint(tmp_path, 1, model, {"model": "advanced_emotion_net", "drop_rate": 0.3}, {"val_acc": 0.5})
    ckpt = load_checkpoint(path)
    assert ckpt["arch"] == "advanced_emotion_net" and ckpt["fer_cfg"]["img_size"] == 40
    rebuilt = model_from_checkpoint(path)
    x = torch.randn(2, 1, 40, 40)
    model.eval()
    assert torch.allclose(rebuilt(x), model(x))
    assert not list(tmp_path.glob("*.tmp")), "no temp file left behind"


def test_tampered_checkpoint_is_refused(tmp_path, model):
    path = save_checkpoint(tmp_path, 1, model, {}, {})
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        load_checkpoint(path)


def test_unlisted_checkpoint_is_refused(tmp_path, model):
    path = save_checkpoint(tmp_path, 1, model, {}, {})
    other = tmp_path / "epoch_099.pt"
    other.write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match="not listed"):
        load_checkpoint(other)


def test_prune_keeps_best_and_latest(tmp_path, model):
    for epoch in range(1, 5):
        save_checkpoint(tmp_path, epoch, model, {}, {}, keep={2, epoch})
    assert sorted(p.name for p in tmp_path.glob("epoch_*.pt")) == ["epoch_002.pt", "epoch_004.pt"]
    assert latest_checkpoint(tmp_path).name == "epoch_004.pt"
    assert latest_checkpoint(tmp_path / "none") is None
