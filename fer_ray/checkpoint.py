"""Self-describing checkpoints: one folder per checkpoint holding ``epoch_NNN.pt`` and its sha256 manifest.

A checkpoint file is one ``torch.save`` payload holding ``arch``, ``model_args`` (what ``create_model`` needs),
``fer_cfg`` (input size, channels, normalisation), the trial ``config``, ``epoch``, ``metrics``, the model
``state_dict``, the optimizer/scheduler/GradScaler states for resuming and, from training, ``profile`` (input size,
channels, parameters and GMACs, counted once when the run built the model: ``checkpoint_profile``). Training writes
it into a local temp folder that Ray Train (or Ray Tune, for in-process trials) persists to the experiment's storage
(``ray.train.report(checkpoint=Checkpoint.from_directory(d))``); from then on it is read by location: a local path
or any URI ``fer_ray.storage`` opens (``s3://...``), or a ``ray.train.Checkpoint``. It is loaded with
``weights_only=True`` only after its sha256 matches ``manifest.json`` beside it, so a tampered file is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
from pathlib import Path

import torch
from torch import nn

from fer_ray.atomic import atomic_write_bytes, atomic_write_text  # noqa: F401  (re-exported)
from fer_ray.models import create_model
from fer_ray.storage import Storage, StorageError, parent_and_name

MANIFEST = "manifest.json"
EPOCH_RE = re.compile(r"epoch_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or fails its sha256 check."""


def checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch:03d}.pt"


def make_payload(model: nn.Module, epoch: int, config: dict, metrics: dict, optimizer_state: dict | None = None,
                 scheduler_state: dict | None = None, scaler_state: dict | None = None, **extra) -> dict:
    """The self-describing checkpoint of ``model`` (a DDP wrapper is unwrapped) after ``epoch`` epochs."""
    module = model.module if hasattr(model, "module") else model
    cfg = module.fer_cfg
    return {
        "format": 1, "arch": cfg["arch"], "epoch": epoch, "metrics": metrics, "config": config, "fer_cfg": cfg,
        "model_args": {"num_classes": config.get("num_classes", 7), "in_chans": cfg["in_chans"],
                       "img_size": cfg["img_size"], "drop_rate": config.get("drop_rate"),
                       **config.get("model_kwargs", {})},
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "optimizer": optimizer_state, "scheduler": scheduler_state, "scaler": scaler_state, **extra,
    }


def write_checkpoint(directory: str | Path, payload: dict) -> Path:
    """Write ``payload`` as ``<directory>/epoch_NNN.pt`` (atomically) and record its sha256 in the manifest."""
    directory = Path(directory)
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    path = directory / checkpoint_name(payload["epoch"])
    atomic_write_bytes(path, lambda f: f.write(data))
    manifest_path = directory / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest[path.name] = hashlib.sha256(data).hexdigest()
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1, sort_keys=True))
    return path


def save_checkpoint(directory: str | Path, epoch: int, model: nn.Module, config: dict, metrics: dict,
                    optimizer_state: dict | None = None, scheduler_state: dict | None = None) -> Path:
    """``write_checkpoint(directory, make_payload(...))``: a verified checkpoint of ``model`` in a local folder."""
    return write_checkpoint(directory, make_payload(model, epoch, config, metrics, optimizer_state, scheduler_state))


def _load(folder: Storage, name: str, verify: bool) -> dict:
    where = folder.uri_of(name)
    try:
        data = folder.read_bytes(name)
    except StorageError:
        raise CheckpointError(f"{where}: checkpoint not found") from None
    if verify:
        expected = manifest_sha256(folder, name)
        if expected is None:
            raise CheckpointError(f"{where}: not listed in {MANIFEST} beside it; refusing an unverified file")
        if hashlib.sha256(data).hexdigest() != expected:
            raise CheckpointError(f"{where}: sha256 does not match {MANIFEST}; the file was modified, refusing it")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises many types for corrupt files)
        raise CheckpointError(f"{where}: unreadable checkpoint ({type(e).__name__}: {e})") from None


def manifest_sha256(folder: Storage, name: str) -> str | None:
    """The sha256 recorded for ``name`` in ``folder``'s manifest, or ``None``."""
    try:
        return folder.read_json(MANIFEST).get(name)
    except StorageError:
        return None


def load_checkpoint(location: str | Path, verify: bool = True) -> dict:
    """Load the checkpoint file at ``location`` (path or URI) with ``weights_only=True`` after its sha256 check."""
    folder, name = parent_and_name(str(location))
    return _load(Storage(folder), name, verify)


def checkpoint_sha256(location: str | Path) -> str:
    """The manifest's sha256 of the checkpoint at ``location`` (what ``load_checkpoint`` verifies the bytes against)."""
    folder, name = parent_and_name(str(location))
    sha = manifest_sha256(Storage(folder), name)
    if sha is None:
        raise CheckpointError(f"{location}: not listed in {MANIFEST} beside it")
    return sha


def ray_checkpoint_file(checkpoint) -> tuple[Storage, str]:
    """``(folder, file name)`` of the one ``epoch_NNN.pt`` inside a ``ray.train.Checkpoint`` (read in place)."""
    folder = Storage(checkpoint.path, filesystem=checkpoint.filesystem)
    names = [n for n in folder.files() if EPOCH_RE.fullmatch(n)]
    if len(names) > 1:
        # Tune may persist a trial's checkpoint into a folder that already holds one (a trial that population-based
        # training restored from another's checkpoint numbers its next ones from the donor's): the upload's
        # manifest, written last, names the file that belongs to this checkpoint.
        try:
            listed = set(folder.read_json(MANIFEST))
        except StorageError:
            listed = set()
        names = [n for n in names if n in listed]
    if len(names) != 1:
        raise CheckpointError(f"{checkpoint.path}: expected one epoch_NNN.pt in the checkpoint, found {names}")
    return folder, names[0]


def load_ray_checkpoint(checkpoint) -> dict:
    """Load (and verify) the payload inside a ``ray.train.Checkpoint``, reading it from its storage in place."""
    folder, name = ray_checkpoint_file(checkpoint)
    return _load(folder, name, verify=True)


RAY_CHECKPOINT_RE = re.compile(r"checkpoint_(\d+)$")


def resumable_ray_checkpoint(checkpoint) -> tuple[dict | None, str, list[str]]:
    """``(payload, location, refused)`` of the checkpoint a resumed run continues from: the one Ray handed it or,
    when that one is incomplete (the driver or node died while Tune persisted it: an empty folder, a file without
    its manifest entry), the newest complete checkpoint Ray persisted before it in the same trial folder
    (``checkpoint_NNNNNN`` with a lower number); ``(None, "", refused)`` when none is complete (the run starts over).
    ``refused``: one line per checkpoint passed over, saying why."""
    refused = []
    try:
        return load_ray_checkpoint(checkpoint), str(checkpoint.path), refused
    except CheckpointError as e:
        refused.append(str(e))
    trial = Storage(posixpath.dirname(str(checkpoint.path).rstrip("/")), filesystem=checkpoint.filesystem)
    handed = RAY_CHECKPOINT_RE.fullmatch(posixpath.basename(str(checkpoint.path).rstrip("/")))
    if handed is None:
        return None, "", refused
    earlier = sorted((int(m.group(1)), d) for d in trial.dirs() if (m := RAY_CHECKPOINT_RE.fullmatch(d))
                     and int(m.group(1)) < int(handed.group(1)))
    for _, name in reversed(earlier):
        folder = Storage(trial.path(name), filesystem=checkpoint.filesystem)
        try:
            names = [n for n in folder.files() if EPOCH_RE.fullmatch(n)]
            if len(names) != 1:
                raise CheckpointError(f"{folder.uri}: expected one epoch_NNN.pt in the checkpoint, found {names}")
            return _load(folder, names[0], verify=True), folder.uri, refused
        except CheckpointError as e:
            refused.append(str(e))
    return None, "", refused


def checkpoint_profile(ckpt: dict) -> dict:
    """``{"img_size", "in_chans", "params", "gmacs"}`` of a checkpoint's model: the ``profile`` training recorded
    (``fer_ray.loop.TrainingRun``) or, in a checkpoint written without one, counted on the model rebuilt from the
    checkpoint (no weights loaded; GMACs NaN without fvcore)."""
    if ckpt.get("profile"):
        return dict(ckpt["profile"])
    from fer_ray.flops import profile_model

    model = create_model(ckpt["arch"], **ckpt["model_args"])
    return profile_model(model)


def model_from_checkpoint(ckpt: dict | str | Path, weights: str = "raw") -> nn.Module:
    """Rebuild the model by name from a checkpoint (dict or location) and load its weights, ``raw`` or the ``ema``
    average saved beside them (``fer_ray.loop.EMA``); eval mode."""
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    key = {"raw": "state_dict", "ema": "ema_state_dict"}[weights]
    if not ckpt.get(key):
        raise CheckpointError(f"checkpoint of {ckpt['arch']} (epoch {ckpt['epoch']}) holds no {weights} weights")
    model = create_model(ckpt["arch"], **ckpt["model_args"])
    if ckpt["fer_cfg"].get("input"):  # how a face became its input in training (``TrainConfig.input``)
        model.fer_cfg["input"] = ckpt["fer_cfg"]["input"]
    model.load_state_dict(ckpt[key])
    return model.eval()
