"""``fer-ray export``: a fitted ensemble (or one member) as one self-contained inference graph plus its model card.

This module owns ``EnsembleGraph``, the torch module that reproduces what fer_ray computes for an ensemble from
uint8 faces ``[B, 48, 48]``, assembled from the very modules the logit store is scored and combined with, all made
of ONNX-exportable ops:

* the TTA views: ``fer_ray.tta.ViewStack`` (each step an exact gather or one ``grid_sample``, from the geometry
  table of ``fer_ray.views``), as ``tta_logits`` runs them;
* each member (``MemberNet``): its ``fer_ray.data.augment.Preprocess`` (resize as two matrix products, or center
  crop; channels; normalisation) and its ``fer_ray.tta.inference_model`` copy (conv+BN folded); an
  ``AdaptiveAvgPool2d`` whose output does not divide its input (``baseline_cnn_v1`` or ``basic_cnn`` at 40 px),
  which the ONNX exporter refuses, becomes the equal two-sided matrix product (``exportable``);
* the fitted combiner: ``fer_ray.combiners.FittedCombiner``, the chain ``fer_ray.ensemble.apply_fitted`` runs (views
  averaged in logit space, member temperatures, the combiner's ``apply``, final temperature).

``export_bundle`` verifies every checkpoint against the sha256 the ensemble was fitted with, exports the graph
(ONNX through ``torch.onnx.export``'s TorchScript-based exporter, ``dynamo=False``, dynamic batch axis, checked
with ``onnx.checker``; or TorchScript), runs the exported file against the torch graph and against fer_ray's own
eager path (``reference_outputs``: ``tta_logits`` per member, then ``apply_fitted``) on synthetic faces, and only
then writes the bundle (``fer_ray.bundle``) through ``fer_ray.storage``: to a folder or a bucket URI, the model card
last. A member or view that cannot be exported stops with one line naming it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fer_ray import bundle
from fer_ray.bundle import BundleError, error_line
from fer_ray.checkpoint import checkpoint_sha256, load_checkpoint, model_from_checkpoint
from fer_ray.combiners import FittedCombiner
from fer_ray.data.augment import Preprocess
from fer_ray.data.dataset import CLASSES, IMG_SIZE
from fer_ray.ensemble import apply_fitted, stale_reason
from fer_ray.experiment import Experiment, as_experiment
from fer_ray.metrics import classification_metrics, softmax
from fer_ray.storage import Storage, join_uri
from fer_ray.store import load_store
from fer_ray.tta import ViewStack, inference_model, parse_view, tta_logits

FORMATS = tuple(bundle.GRAPH_FILES)
OPSET = 17
"""ONNX opset of exported graphs (``GridSample`` needs 16 or later)."""
CHECK_IMAGES = 48
"""Synthetic faces every export is checked on (exported file vs torch graph vs fer_ray's eager path)."""
CHECK_TOL = 1e-4
"""Largest difference of any probability allowed by that check."""


# -- views and members ------------------------------------------------------------------------------------------
def build_view(name: str) -> nn.Sequential:
    """The module of one view name (``fer_ray.tta.parse_view``, as TTA scoring runs it); a name that is unknown or
    cannot apply to 48x48 faces raises ``BundleError``."""
    try:
        return parse_view(name)
    except ValueError as e:
        raise BundleError(f"view {name!r} cannot be exported: {e}") from None


def pool_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``[n_out, n_in]`` matrix of ``adaptive_avg_pool`` along one axis (bin i: ``floor(i·in/out)`` to
    ``ceil((i+1)·in/out)``)."""
    m = torch.zeros(n_out, n_in)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


class MatrixPool(nn.Module):
    """``AdaptiveAvgPool2d`` at a fixed input size as ``P_h @ x @ P_w.T`` (ONNX has no non-divisible adaptive pool)."""

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("rows", pool_matrix(in_hw[0], out_hw[0]))
        self.register_buffer("cols", pool_matrix(in_hw[1], out_hw[1]).t().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(self.rows, x), self.cols)


def exportable(model: nn.Module) -> nn.Module:
    """``model`` with every ``AdaptiveAvgPool2d`` whose output size does not divide its input (at the model's input
    size) replaced by the equal ``MatrixPool``; other modules are left alone. Changes ``model`` in place."""
    cfg = model.fer_cfg
    seen: dict[str, tuple[int, int]] = {}
    pools = {n: m for n, m in model.named_modules() if isinstance(m, nn.AdaptiveAvgPool2d)}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: seen.__setitem__(n, tuple(inp[0].shape[-2:])))
             for n, m in pools.items()]
    with torch.no_grad():
        model.eval()(torch.zeros(1, cfg["in_chans"], cfg["img_size"], cfg["img_size"]))
    for h in hooks:
        h.remove()
    for name, pool in pools.items():
        out = pool.output_size if isinstance(pool.output_size, tuple) else (pool.output_size,) * 2
        in_hw = seen.get(name)
        if in_hw is None or None in out or all(i % o == 0 for i, o in zip(in_hw, out)):
            continue
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], MatrixPool(in_hw, out))
    return model


class MemberNet(nn.Module):
    """One member: float faces ``[N, 1, 48, 48]`` in [0, 1] → its ``Preprocess`` (resize or center crop, channels,
    normalisation) → its ``inference_model`` copy → logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.preprocess = Preprocess.for_model(model.fer_cfg)
        self.model = inference_model(exportable(model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.preprocess(x))


# -- the graph ---------------------------------------------------------------------------------------------------
class EnsembleGraph(nn.Module):
    """uint8 faces ``[B, 48, 48]`` → ``(probs, logits)`` ``[B, 7]``: views, members, the fitted combiner."""

    def __init__(self, models: list[nn.Module], views: list[str], fitted: dict) -> None:
        super().__init__()
        self.view_names, self.combiner_name = list(views), fitted["combiner"]
        self.views = ViewStack([build_view(v) for v in views])
        self.members = nn.ModuleList([MemberNet(m) for m in models])
        self.combiner = FittedCombiner(fitted, len(models))

    def member_logits(self, faces: torch.Tensor) -> torch.Tensor:
        """``[M, V, B, C]``: each member's logits of each view."""
        views = self.views(Preprocess.to_float(faces))
        n, c = len(self.view_names), len(CLASSES)
        return torch.stack([m(views).reshape(n, -1, c) for m in self.members])

    def forward(self, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.combiner(self.member_logits(faces))
        return torch.softmax(out, -1), out


# -- what to export ----------------------------------------------------------------------------------------------
@dataclass
class ExportPlan:
    """What one bundle holds: members (``member_table`` rows as dicts), views, fitted numbers, metrics."""

    kind: str
    name: str
    members: list[dict]
    views: list[str]
    fitted: dict
    metrics: dict = field(default_factory=dict)
    selected_on: str | None = None
    out_of_fold: dict | None = None
    """An ensemble's out-of-fold estimate on the selection split, when ``fer_ray.ensemble`` recorded one."""


def _members(exp: Experiment, ids: list[str]) -> list[dict]:
    from fer_ray.report import member_table

    table = member_table(exp)
    missing = [m for m in ids if m not in table.index]
    if missing:
        raise BundleError(f"{exp.uri}: no member {missing[0]!r} (members: {', '.join(map(str, table.index))})")
    return [dict(table.loc[m].to_dict(), id=m) for m in ids]


def plan_ensemble(exp: Experiment, name: str) -> ExportPlan:
    """The plan of ensemble ``name``: its members, views and fitted numbers, refused when stale."""
    info = exp.ensemble(name)
    members = _members(exp, info["members"])
    for m in members:
        want = (info.get("member_checkpoints") or {}).get(m["id"])
        if want and checkpoint_sha256(m["checkpoint"]) != want:
            raise BundleError(f"ensemble {name!r}: member {m['id']}'s checkpoint {m['checkpoint']} is not the one "
                              "it was fitted with: rebuild it with `fer-ray ensemble`")
    reason = stale_reason(info, load_store(exp, [info.get("selected_on") or exp.select_split()]))
    if reason:
        raise BundleError(f"ensemble {name!r} is stale ({reason}): rebuild it with `fer-ray ensemble`")
    return ExportPlan("ensemble", name, members, list(info["views"]), dict(info["fitted"], combiner=info["combiner"]),
                      _card_metrics(exp, info.get("metrics", {})), info.get("selected_on"), info.get("oof"))


def plan_member(exp: Experiment, member: str) -> ExportPlan:
    """The plan of one member: its stored TTA views averaged, softmax; metrics recomputed from the store."""
    row = _members(exp, [member])[0]
    store = load_store(exp).get(member, {})
    if not store:
        raise BundleError(f"member {member!r} has no stored logits (run `fer-ray tta` first)")
    views = list(next(iter(store.values())).views)
    metrics = {s: classification_metrics(ls.logits.mean(0), ls.labels) for s, ls in store.items()}
    fitted = {"combiner": "mean_logits", "weights": [1.0], "member_temperatures": None, "temperature": None}
    return ExportPlan("model", member, [row], views, fitted, _card_metrics(exp, metrics), exp.select_split())


def _card_metrics(exp: Experiment, metrics: dict[str, dict]) -> dict[str, dict]:
    """Accuracy, macro-F1, NLL, ECE per scored split, with its role and image count, in the roles' order."""
    roles, info = exp.roles(), exp.data_info()
    sizes = {**{s: v.get("n") for s, v in info.get("splits", {}).items()},
             **{s: v.get("n") for s, v in info.get("external", {}).items()}}
    keep = ("accuracy", "macro_f1", "nll", "ece")
    return {s: {"role": roles.get(s), "n": sizes.get(s), **{k: float(metrics[s][k]) for k in keep if k in metrics[s]}}
            for s in roles if s in metrics}


def weights_of(member: dict) -> str:
    """Which weights of its checkpoint a member uses: ``raw``, or ``ema`` (checkpoint-library members)."""
    return member["weights"] if isinstance(member.get("weights"), str) else "raw"


def load_models(plan: ExportPlan) -> list[nn.Module]:
    """Each member's model from its verified checkpoint (raw or EMA weights, as the member was scored)."""
    models = []
    for m in plan.members:
        ckpt = load_checkpoint(m["checkpoint"])
        w = weights_of(m)
        models.append(model_from_checkpoint(ckpt, w) if w != "raw" else model_from_checkpoint(ckpt))
    return models


def reference_outputs(models: list[nn.Module], views: list[str], fitted: dict, images: np.ndarray,
                      batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """fer_ray's own eager path, as the logit store and ``apply_fitted`` compute it: ``(probs, logits)``."""
    faces = torch.from_numpy(np.ascontiguousarray(images))
    logits = apply_fitted(np.stack([tta_logits(m, faces, views, batch_size).numpy() for m in models]), fitted)
    return softmax(logits).astype(np.float32), logits.astype(np.float32)


# -- exporting ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _stdout_silenced() -> Iterator[None]:
    """Route file descriptor 1 to /dev/null: torch 2.14's TorchScript-based ONNX exporter always turns its C++ log
    on (``setup_onnx_logging`` tests a function object for truth) and prints the whole IR graph on any failure."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _quiet_export(graph: nn.Module, fmt: str, opset: int) -> bytes:
    """The graph file's bytes (ONNX checked with ``onnx.checker``); exporter errors propagate."""
    example = torch.zeros(2, IMG_SIZE, IMG_SIZE, dtype=torch.uint8)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad(), _stdout_silenced():
        warnings.simplefilter("ignore")
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(graph, (example,), check_trace=False), buf)
            return buf.getvalue()
        torch.onnx.export(graph, (example,), buf, dynamo=False, opset_version=opset, input_names=[bundle.INPUT_NAME],
                          output_names=list(bundle.OUTPUT_NAMES), do_constant_folding=True,
                          dynamic_axes={n: {0: "batch"} for n in (bundle.INPUT_NAME, *bundle.OUTPUT_NAMES)})
    import onnx

    onnx.checker.check_model(onnx.load_from_string(buf.getvalue()), full_check=True)
    return buf.getvalue()


def export_graph(graph: EnsembleGraph, plan: ExportPlan, models: list[nn.Module], fmt: str, opset: int) -> bytes:
    """Export ``graph``; on failure, find the member (alone, identity view) or view (alone, first member) that
    cannot be exported and stop with one line naming it."""
    try:
        return _quiet_export(graph, fmt, opset)
    except Exception as e:  # noqa: BLE001 - the exporters raise many types
        whole = e
    one = {"combiner": "mean_logits", "weights": [1.0]}
    for m, model in zip(plan.members, models):
        try:
            _quiet_export(EnsembleGraph([model], ["identity"], one), fmt, opset)
        except Exception as e:  # noqa: BLE001
            raise BundleError(f"member {m['id']} ({m['arch']} @ {m['img_size']}px) cannot be exported to {fmt}: "
                              f"{error_line(e)}") from None
    for view in plan.views:
        try:
            _quiet_export(EnsembleGraph(models[:1], [view], one), fmt, opset)
        except Exception as e:  # noqa: BLE001
            raise BundleError(f"view {view!r} cannot be exported to {fmt}: {error_line(e)}") from None
    raise BundleError(f"{plan.kind} {plan.name!r} cannot be exported to {fmt}: {error_line(whole)}")


def check_faces(n: int = CHECK_IMAGES, seed: int = 0) -> np.ndarray:
    """Synthetic faces the export is checked on (``fer_ray.data.synthetic``: face-like, not noise)."""
    from fer_ray.data.synthetic import generate

    return generate(n, seed=seed).images


def check_export(data: bytes, card: dict, graph: EnsembleGraph, models: list[nn.Module], plan: ExportPlan,
                 where: str) -> dict:
    """Run the exported graph file (its bytes, about to be written to ``where``), the torch graph and fer_ray's eager
    path on ``check_faces``; a probability that differs by more than ``CHECK_TOL`` stops the export. Returns the
    differences for the card."""
    faces = check_faces()
    probs, logits = bundle.open_graph(data, card, location=where).predict(faces)
    with torch.no_grad():
        g_probs, g_logits = (t.numpy() for t in graph(torch.from_numpy(faces)))
    r_probs, r_logits = reference_outputs(models, plan.views, plan.fitted, faces)
    out = {"images": len(faces), "tolerance": CHECK_TOL,
           "max_abs_diff_probs_vs_torch_graph": float(np.abs(probs - g_probs).max()),
           "max_abs_diff_probs_vs_fer_ray": float(np.abs(probs - r_probs).max()),
           "max_abs_diff_logits_vs_fer_ray": float(np.abs(logits - r_logits).max())}
    worst = max(out["max_abs_diff_probs_vs_torch_graph"], out["max_abs_diff_probs_vs_fer_ray"])
    if not worst <= CHECK_TOL:
        raise BundleError(f"{join_uri(where, card['graph']['file'])}: the exported graph's probabilities differ "
                          f"from fer_ray's by {worst:.3g} (> {CHECK_TOL}) on {len(faces)} synthetic faces; not "
                          "writing a bundle that disagrees")
    return out


def _versions() -> dict[str, str]:
    import fer_ray

    out = {"fer_ray": fer_ray.__version__, "torch": torch.__version__, "python": platform.python_version()}
    for name in ("onnx", "onnxruntime"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def model_card(exp: Experiment, plan: ExportPlan, fmt: str, opset: int) -> dict:
    """The bundle's ``model_card.json`` (the graph's sha256 and the check are added when written)."""
    f = plan.fitted
    members = [{"id": m["id"], "arch": m["arch"], "img_size": int(m["img_size"]), "in_chans": int(m["in_chans"]),
                "params": int(m["params"]), "gmacs_per_view": float(m["gmacs"]), "weights": weights_of(m),
                "checkpoint_sha256": checkpoint_sha256(m["checkpoint"]), "weight": float(f["weights"][i]),
                "temperature": float(f["member_temperatures"][i]) if f.get("member_temperatures") else None}
               for i, m in enumerate(plan.members)]
    info = exp.data_info()
    what = (f"a {f['combiner']}{' + temperature' if f.get('temperature') else ''} ensemble of {len(members)} "
            "member(s)" if plan.kind == "ensemble" else "one model")
    return {"format": bundle.BUNDLE_FORMAT, "name": plan.name, "kind": plan.kind,
            "description": f"{plan.name}: {what} of fer_ray experiment {exp.name}, exported as one graph (TTA views, "
                           "each member's preprocessing and the fitted combiner inside).",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "source": {"experiment": exp.uri, plan.kind: plan.name},
            "graph": {"file": bundle.GRAPH_FILES[fmt], "format": fmt, **({"opset": opset} if fmt == "onnx" else {}),
                      "exporter": "torch.onnx.export (TorchScript-based, dynamo=False)" if fmt == "onnx" else
                      "torch.jit.trace"},
            "classes": list(CLASSES),
            "input": {"name": bundle.INPUT_NAME, "dtype": "uint8", "shape": ["batch", IMG_SIZE, IMG_SIZE],
                      "description": "uint8 [batch, 48, 48]: grayscale face crops, 0-255, as FER-2013 stores them "
                                     "(`fer-ray predict` finds and crops faces in photos and video)"},
            "outputs": {"probs": "float32 [batch, 7]: class probabilities after the fitted temperature",
                        "logits": "float32 [batch, 7]: the ensemble's output before the softmax (temperature "
                                  "applied; for probability-averaging combiners, log of the averaged probabilities)"},
            "members": members, "views": plan.views,
            "combiner": {"name": f["combiner"], "weights": [float(w) for w in f["weights"]],
                         "member_temperatures": f.get("member_temperatures"), "temperature": f.get("temperature"),
                         **({"stacking": f["stacking"]} if f.get("stacking") else {})},
            "cost": {"gmacs_per_image": float(sum(m["gmacs_per_view"] for m in members) * len(plan.views)),
                     "params": int(sum(m["params"] for m in members)),
                     "forward_passes": len(members) * len(plan.views)},
            "metrics": plan.metrics, "selected_on": plan.selected_on,
            **({"out_of_fold_on_selection_split": plan.out_of_fold} if plan.out_of_fold else {}),
            "data": {"source": info.get("source"), "fingerprint": info.get("fingerprint")},
            "versions": _versions()}


def check_out(out: str | Path) -> Storage:
    """The bundle's location ``out`` (a folder or URI), which may be new, empty, or an earlier bundle (replaced);
    anything else, a missing bucket or an unreachable one, is refused before any work. Nothing is created here."""
    store = bundle.open_storage(out)
    try:
        bucket = bundle.missing_bucket(store)
        if bucket:
            raise BundleError(f"--out {store.uri}: no bucket {bucket!r} there (create it first)")
        if store.is_file(""):
            raise BundleError(f"--out {store.uri}: is a file; give a folder or URI for the bundle")
        if not store.is_empty() and not store.is_file(bundle.CARD):
            raise BundleError(f"--out {store.uri}: not empty and not a fer_ray bundle (no {bundle.CARD}); choose a "
                              "new or empty folder")
    except OSError as e:
        raise BundleError(f"--out {store.uri}: cannot read the location ({error_line(e)})") from None
    return store


def export_bundle(results: Experiment | str, out: str | Path, ensemble: str | None = None, member: str | None = None,
                  fmt: str = "onnx", opset: int = OPSET) -> dict:
    """Export ensemble ``ensemble`` (or member ``member``) of an experiment as a bundle at ``out`` (folder or URI).

    Args:
        results: The experiment (a path or URI).
        out: The bundle folder or URI (``s3://bucket/prefix?...``: anything ``fer_ray.storage`` writes): new,
            empty, or an earlier bundle, which is replaced. The graph is written first and the model card last, so
            a reader never finds a card whose graph is not there yet.
        ensemble: A built ensemble's name (``ensembles/<name>.json``); or
        member: a member id (a trial, a library checkpoint or a distilled student), its stored TTA views averaged.
        fmt: ``onnx`` (run with ONNX Runtime) or ``torchscript`` (run with torch).
        opset: ONNX opset (>= 16).

    Returns:
        The written model card.

    Raises:
        BundleError: Nothing or both of ``ensemble``/``member``, a stale ensemble, a member or view that cannot be
            exported, an export that disagrees with fer_ray (> ``CHECK_TOL``), an unusable ``out``.
        CheckpointError: A member checkpoint that is missing or fails its sha256 check.
    """
    if (ensemble is None) == (member is None):
        raise BundleError("export: give exactly one of --ensemble NAME or --member ID")
    if fmt not in FORMATS:
        raise BundleError(f"--format: one of {', '.join(FORMATS)}, got {fmt!r}")
    exp = as_experiment(results)
    store = check_out(out)
    plan = plan_ensemble(exp, ensemble) if ensemble is not None else plan_member(exp, member)
    models = load_models(plan)
    graph = EnsembleGraph(models, plan.views, plan.fitted).eval()
    data = export_graph(graph, plan, models, fmt, opset)
    card = model_card(exp, plan, fmt, opset)
    card["graph"].update(sha256=bundle.sha256_bytes(data), bytes=len(data))
    card["check"] = check_export(data, card, graph, models, plan, store.uri)  # before anything is written
    try:
        store.write_bytes(card["graph"]["file"], data)
        for other in set(bundle.GRAPH_FILES.values()) - {card["graph"]["file"]}:
            store.delete(other)  # an earlier bundle's graph in the other format
        store.write_text(bundle.README, bundle.render_readme(card))
        store.write_text(bundle.CARD, json.dumps(card, indent=1))  # last: the card makes the bundle
    except OSError as e:
        raise BundleError(f"--out {store.uri}: writing the bundle failed ({error_line(e)})") from None
    return card
