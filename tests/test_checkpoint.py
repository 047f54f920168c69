"""Checkpoints: self-describing round trip, sha256 manifest refusal of tampered files, reading by URI."""

import pytest
import torch

from fer_ray.checkpoint import (
    CheckpointError,
    checkpoint_sha256,
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


def test_read_by_uri_and_manifest_sha(tmp_path, model):
    """A checkpoint is read by location: a ``file://`` URI reads the same payload; the manifest holds its sha256.
    (Pruning to best + latest is Ray's CheckpointConfig, checked on a real sweep in test_pipeline.)"""
    import hashlib

    path = save_checkpoint(tmp_path, 3, model, {}, {"val_acc": 0.5})
    via_uri = load_checkpoint(f"file://{path}")
    assert via_uri["epoch"] == 3 and via_uri["metrics"]["val_acc"] == 0.5
    assert checkpoint_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "epoch_004.pt")
