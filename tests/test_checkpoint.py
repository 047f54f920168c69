"""Checkpoints: self-describing round trip, sha256 manifest refusal of tampered files, reading by URI, and the
checkpoint a resumed run continues from when the one Ray hands it was left incomplete."""

import pytest
import torch

from fer_ray.checkpoint import (
    CheckpointError,
    checkpoint_sha256,
    load_checkpoint,
    model_from_checkpoint,
    resumable_ray_checkpoint,
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


def test_resume_passes_over_an_incomplete_checkpoint_to_the_newest_complete_earlier_one(tmp_path, model):
    """A driver killed while Tune persisted a checkpoint leaves its folder empty (or its file without a manifest
    entry) and may point the resumed trial at it: the run continues from the newest complete checkpoint Ray
    persisted before it, or starts over when there is none, saying so; never an error that ends the trial."""
    from ray.train import Checkpoint

    trial = tmp_path / "tune" / "trial_a"
    for i, epoch in enumerate([1, 2]):
        save_checkpoint(trial / f"checkpoint_00000{i}", epoch, model, {}, {"val_acc": 0.1 * epoch})
    (trial / "checkpoint_000003").mkdir()  # a later one, never consulted: Ray did not hand it
    save_checkpoint(trial / "checkpoint_000003", 4, model, {}, {})
    (trial / "checkpoint_000002").mkdir()  # the one the kill left empty
    payload, location, refused = resumable_ray_checkpoint(Checkpoint(str(trial / "checkpoint_000002")))
    assert payload["epoch"] == 2 and location.endswith("checkpoint_000001")
    assert len(refused) == 1 and "checkpoint_000002" in refused[0] and "found []" in refused[0]

    # A file whose manifest entry never arrived is incomplete too; so is every folder before it here.
    unlisted = trial / "checkpoint_000001" / "manifest.json"
    unlisted.unlink()
    payload, location, refused = resumable_ray_checkpoint(Checkpoint(str(trial / "checkpoint_000002")))
    assert payload["epoch"] == 1 and location.endswith("checkpoint_000000") and len(refused) == 2
    assert "not listed in manifest.json" in refused[1]

    payload, location, refused = resumable_ray_checkpoint(Checkpoint(str(trial / "checkpoint_000000")))
    assert payload["epoch"] == 1 and location.endswith("checkpoint_000000") and refused == []
    (trial / "checkpoint_000000" / "epoch_001.pt").unlink()
    payload, location, refused = resumable_ray_checkpoint(Checkpoint(str(trial / "checkpoint_000000")))
    assert payload is None and location == "" and len(refused) == 1  # nothing earlier: the run starts over
