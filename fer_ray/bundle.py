"""The exported bundle: one folder with a single inference graph and the model card that describes it.

This module owns the bundle's layout and its reading: ``fer-ray export`` (``fer_ray.export``) writes it,
``fer-ray predict`` and ``fer-ray serve`` load it with ``load_bundle``. Layout::

    model.onnx | model.pt   the graph (ONNX, or TorchScript): uint8 faces [B, 48, 48] in (grayscale, 0-255, one
                            face per 48x48 crop, as FER-2013 stores them); out "probs" [B, 7] (class probabilities
                            after the fitted temperature: what users want) and "logits" [B, 7] (the ensemble's
                            output before the softmax, temperature applied; for probability-averaging combiners the
                            log of the averaged probabilities), classes in ``CLASSES`` order
    model_card.json         classes, input/output spec, members (arch, params, GMACs), TTA views, the combiner's
                            fitted numbers, cost, metrics per split with its role, data fingerprint, versions, and
                            the sha256 of the graph file
    README.md               the card rendered for people (``render_readme``)

``load_bundle`` checks the card and the graph file's sha256 and returns a ``Bundle`` whose ``predict`` runs it in
batches: ONNX Runtime for ONNX graphs (CUDA when asked for and available), torch for TorchScript ones. Every
problem is a one-line ``BundleError``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fer_ray.config import ConfigError
from fer_ray.data.dataset import CLASSES, IMG_SIZE, DataError

BUNDLE_FORMAT = "fer_ray.bundle/1"
CARD = "model_card.json"
README = "README.md"
GRAPH_FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}
"""The graph file of each export format."""
INPUT_NAME = "faces"
OUTPUT_NAMES = ("probs", "logits")

Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class BundleError(ConfigError):
    """A bundle folder that is missing, incomplete, modified or unreadable (one line, naming the file)."""


@dataclass
class Bundle:
    """A loaded bundle: its folder, its model card and the function that runs its graph on one batch."""

    root: Path
    card: dict
    run: Runner
    device: str = "cpu"

    @property
    def classes(self) -> list[str]:
        return list(self.card["classes"])

    @property
    def name(self) -> str:
        return str(self.card.get("name", self.root.name))

    def predict(self, faces: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """``(probs, logits)``, float32 ``[N, 7]`` each, of uint8 faces ``[N, 48, 48]`` (``[N, 1, 48, 48]`` too)."""
        faces = np.asarray(faces)
        if faces.ndim == 4 and faces.shape[1] == 1:
            faces = faces[:, 0]
        if faces.dtype != np.uint8 or faces.ndim != 3 or faces.shape[1:] != (IMG_SIZE, IMG_SIZE):
            raise DataError(f"{self.name}: faces must be uint8 [N, 48, 48] grayscale crops, got {faces.dtype} "
                            f"{list(faces.shape)}")
        n = len(self.classes)
        if not len(faces):
            return np.zeros((0, n), np.float32), np.zeros((0, n), np.float32)
        outs = [self.run(np.ascontiguousarray(faces[lo:lo + batch_size])) for lo in range(0, len(faces), batch_size)]
        return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_card(root: str | Path) -> dict:
    """The model card of the bundle at ``root``, checked for its format, classes and graph entry."""
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"{root}: no such bundle folder (make one with `fer-ray export RESULTS --ensemble NAME "
                          f"--out {root}`)")
    path = root / CARD
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path}: missing; {root} is not a fer_ray bundle (`fer-ray export` writes one)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: unreadable model card ({type(e).__name__}: {e}); export the bundle again"
                          ) from None
    if not isinstance(card, dict) or card.get("format") != BUNDLE_FORMAT:
        got = card.get("format") if isinstance(card, dict) else type(card).__name__
        raise BundleError(f"{path}: format {got!r}, expected {BUNDLE_FORMAT!r}; export the bundle again")
    graph = card.get("graph") or {}
    if graph.get("format") not in GRAPH_FILES or not graph.get("file") or not graph.get("sha256"):
        raise BundleError(f"{path}: its 'graph' entry needs format (one of {', '.join(GRAPH_FILES)}), file and "
                          "sha256; export the bundle again")
    if list(card.get("classes", [])) != list(CLASSES):
        raise BundleError(f"{path}: classes {card.get('classes')} are not fer_ray's {list(CLASSES)}")
    return card


def load_bundle(root: str | Path, threads: int | None = None, device: str = "cpu") -> Bundle:
    """Open the bundle at ``root``: check the card and the graph's sha256, then load the graph.

    Args:
        root: The bundle folder (``fer-ray export --out``).
        threads: Intra-op threads of the runtime (``None``: the runtime's default, all cores).
        device: ``cpu`` or ``cuda`` (ONNX Runtime's CUDA provider when installed, else CPU with a note).

    Raises:
        BundleError: Missing folder or files, an unknown format, a graph whose sha256 differs from the card, or a
            graph the runtime cannot load.
    """
    root = Path(root)
    card = read_card(root)
    path = root / card["graph"]["file"]
    if not path.is_file():
        raise BundleError(f"{path}: missing (the model card names it); export the bundle again")
    if sha256_file(path) != card["graph"]["sha256"]:
        raise BundleError(f"{path}: sha256 differs from {CARD}; the graph was modified or truncated, refusing it")
    return open_graph(path, card, threads, device)


def open_graph(path: Path, card: dict, threads: int | None = None, device: str = "cpu") -> Bundle:
    """The ``Bundle`` running the graph file at ``path`` as ``card`` describes it (no sha256 check: the exporter's
    own check before the card is written; ``load_bundle`` for everything else)."""
    fmt = card["graph"]["format"]
    try:
        run, device = (_onnx_runner if fmt == "onnx" else _torchscript_runner)(path, threads, device)
    except Exception as e:  # noqa: BLE001 - the runtimes raise many types for a bad graph
        text = str(e).strip()
        raise BundleError(f"{path}: the {fmt} runtime cannot load it ({type(e).__name__}: "
                          f"{text.splitlines()[0][:300] if text else ''})") from None
    return Bundle(path.parent, card, run, device)


def _onnx_runner(path: Path, threads: int | None, device: str) -> tuple[Runner, str]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        else:
            print(f"[bundle] {path}: onnxruntime has no CUDA provider here (install onnxruntime-gpu); running on CPU",
                  flush=True)
            device = "cpu"
    session = ort.InferenceSession(str(path), opts, providers=providers)

    def run(faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, logits = session.run(list(OUTPUT_NAMES), {INPUT_NAME: faces})
        return probs, logits

    return run, device


def _torchscript_runner(path: Path, threads: int | None, device: str) -> tuple[Runner, str]:
    import warnings

    import torch

    if threads:
        torch.set_num_threads(int(threads))
    if device == "cuda" and not torch.cuda.is_available():
        device = "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in favour of torch.export
        module = torch.jit.load(str(path), map_location=device).eval()

    def run(faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            probs, logits = module(torch.from_numpy(faces).to(device))
        return probs.float().cpu().numpy(), logits.float().cpu().numpy()

    return run, device


def _fmt(value: object, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else ("—" if value is None else str(value))


def render_readme(card: dict) -> str:
    """The bundle's README.md: what the graph computes, its members, cost and scores, and how to run it."""
    members = card["members"]
    lines = [f"# {card['name']} ({card['kind']}, fer_ray bundle)", "",
             card.get("description", ""), "",
             f"- **Input** `{INPUT_NAME}`: {card['input']['description']}",
             f"- **Outputs**: `probs` {card['outputs']['probs']}; `logits` {card['outputs']['logits']}",
             f"- **Classes** (column order): {', '.join(card['classes'])}",
             f"- **Graph**: `{card['graph']['file']}` ({card['graph']['format']}"
             + (f", opset {card['graph']['opset']}" if card["graph"].get("opset") else "")
             + f"), sha256 `{card['graph']['sha256'][:16]}…`",
             f"- **Cost**: {_fmt(card['cost']['gmacs_per_image'])} GMACs per face ({card['cost']['forward_passes']}"
             f" forward passes: {len(members)} member(s) × {len(card['views'])} view(s)), "
             f"{card['cost']['params'] / 1e6:.2f}M parameters",
             f"- **Combiner**: {card['combiner']['name']}"
             + (f", temperature {_fmt(card['combiner']['temperature'])}" if card['combiner'].get('temperature') else "")
             + f"; TTA views: {', '.join(card['views'])}", "",
             "## Members", "", "| member | arch | input | params | GMACs per view | weight | temperature |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {m['id']} | {m['arch']} | {m['in_chans']}×{m['img_size']}² | {m['params'] / 1e6:.2f}M | "
              f"{_fmt(m['gmacs_per_view'])} | {_fmt(m.get('weight'))} | {_fmt(m.get('temperature'))} |"
              for m in members]
    lines += ["", f"## Scores (selected on `{card.get('selected_on')}`; only `report` splits are held out)", "",
              "| split | role | images | accuracy | macro-F1 | NLL | ECE |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {s} | {m.get('role')} | {m.get('n', '—')} | {_fmt(m.get('accuracy'))} | {_fmt(m.get('macro_f1'))} | "
              f"{_fmt(m.get('nll'))} | {_fmt(m.get('ece'))} |" for s, m in card.get("metrics", {}).items()]
    fp = (card.get("data") or {}).get("fingerprint") or {}
    versions = ", ".join(f"{k} {v}" for k, v in card.get("versions", {}).items())
    lines += ["", f"Data fingerprint: data `{fp.get('data', '—')}`, splits `{fp.get('splits', '—')}`. "
              f"Exported {card.get('created', '')} from `{card['source']['experiment']}` with {versions}.", "",
              "## Run it", "", "```bash",
              "fer-ray predict . photos/ --out preds.csv    # faces found with OpenCV's Haar cascade",
              "fer-ray serve . --port 8000                     # POST /predict with an image", "```", "",
              "```python", "import numpy as np, onnxruntime as ort",
              f"session = ort.InferenceSession('{GRAPH_FILES['onnx']}')",
              "faces = np.zeros((4, 48, 48), np.uint8)               # your 48x48 grayscale face crops",
              "probs, logits = session.run(['probs', 'logits'], {'faces': faces})", "```", ""]
    return "\n".join(lines)
