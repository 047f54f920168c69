"""Self-describing checkpoints: save atomically with a sha256 manifest, verify, load and rebuild the model.

A checkpoint is one ``torch.save`` file holding ``arch``, ``model_args`` (what ``create_model`` needs),
``fer_cfg`` (input size, channels, normalisation), the trial ``config``, ``epoch``, ``metrics``, the model
``state_dict`` and the optimizer/scheduler states for resuming. It is loaded with ``weights_only=True``, and
its sha256 must match ``manifest.json`` beside it (written at save time), so a tampered file is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from torch import nn

from fer_ray.atomic import atomic_write_bytes, atomic_write_text  # noqa: F401  (re-exported)
from fer_ray.models import create_model

MANIFEST = "manifest.json"
_EPOCH_RE = re.compile(r"epoch_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or fails its sha256 check."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_manifest(directory: Path) -> dict[str, str]:
    p = directory / MANIFEST
    return json.loads(p.read_text()) if p.is_file() else {}


def save_checkpoint(directory: str | Path, epoch: int, model: nn.Module, config: dict, metrics: dict,
                    optimizer_state: dict | None = None, scheduler_state: dict | None = None,
                    keep: set[int] | None = None) -> Path:
    """Write ``epoch_<n>.pt`` atomically and record its sha256; prune epochs not in ``keep`` (if given)."""
    directory = Path(directory)
    module = model.module if hasattr(model, "module") else model
    cfg = module.fer_cfg
    payload = {
        "format": 1, "arch": cfg["arch"], "epoch": epoch, "metrics": metrics, "config": config, "fer_cfg": cfg,
        "model_args": {"num_classes": config.get("num_classes", 7), "in_chans": cfg["in_chans"],
                       "img_size": cfg["img_size"], "drop_rate": config.get("drop_rate"),
                       **config.get("model_kwargs", {})},
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "optimizer": optimizer_state, "scheduler": scheduler_state,
    }
    path = directory / f"epoch_{epoch:03d}.pt"
    atomic_write_bytes(path, lambda f: torch.save(payload, f))
    manifest = _read_manifest(directory)
    manifest[path.name] = sha256_file(path)
    if keep is not None:
        for name in list(manifest):
            m = _EPOCH_RE.match(name)
            if m and int(m.group(1)) not in keep and name != path.name:
                (directory / name).unlink(missing_ok=True)
                del manifest[name]
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return path


def load_checkpoint(path: str | Path, verify: bool = True) -> dict:
    """Load a checkpoint with ``weights_only=True`` after checking its sha256 against the manifest."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if verify:
        expected = _read_manifest(path.parent).get(path.name)
        if expected is None:
            raise CheckpointError(f"{path}: not listed in {path.parent / MANIFEST}; refusing an unverified file")
        if sha256_file(path) != expected:
            raise CheckpointError(f"{path}: sha256 does not match {MANIFEST}; the file was modified, refusing it")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises many types for corrupt files)
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The highest-epoch checkpoint listed in ``directory``'s manifest, or ``None``."""
    directory = Path(directory)
    epochs = [(int(m.group(1)), n) for n in _read_manifest(directory) if (m := _EPOCH_RE.match(n))]
    return directory / max(epochs)[1] if epochs else None


def model_from_checkpoint(ckpt: dict | str | Path) -> nn.Module:
    """Rebuild the model by name from a checkpoint (dict or path) and load its weights; eval mode."""
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    model = create_model(ckpt["arch"], **ckpt["model_args"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()
