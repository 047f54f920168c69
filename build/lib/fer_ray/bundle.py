"""The exported bundle: one folder with a single inference graph and the model card that describes it.

This module owns the bundle's layout and its reading: ``fer-ray export`` (``fer_ray.export``) writes it,
``fer-ray predict`` and ``fer-ray serve`` load it with ``load_bundle``. A bundle lives in a local folder or at any
location ``fer_ray.storage`` reads (``s3://bucket/prefix?endpoint_override=...``, ``gs://...``): it is read
through ``fer_ray.storage.Storage`` either way, and the graph goes from the bytes read, checked against the card's
sha256, straight into the runtime, so a Ray Serve replica on a worker node needs no shared disk and no local copy.
Layout::

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
problem (a missing folder or URI, an unreachable bucket, a modified graph) is a one-line ``BundleError`` naming the
file or location.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fer_ray.config import ConfigError
from fer_ray.data.dataset import CLASSES, IMG_SIZE, DataError
from fer_ray.storage import Storage, StorageError, join_uri, normalize, split_uri

BUNDLE_FORMAT = "fer_ray.bundle/1"
CARD = "model_card.json"
README = "README.md"
GRAPH_FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}
"""The graph file of each export format."""
INPUT_NAME = "faces"
OUTPUT_NAMES = ("probs", "logits")

Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class BundleError(ConfigError):
    """A bundle (folder or URI) that is missing, incomplete, modified or unreadable (one line, naming the file)."""


@dataclass
class Bundle:
    """A loaded bundle: where it was read from, its model card and the function that runs its graph on one batch."""

    location: str
    """The bundle's folder (an absolute path) or URI."""
    card: dict
    run: Runner
    device: str = "cpu"

    @property
    def classes(self) -> list[str]:
        return list(self.card["classes"])

    @property
    def name(self) -> str:
        return str(self.card.get("name", posixpath.basename(split_uri(self.location)[0].rstrip("/"))))

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


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def error_line(e: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters) of an exception, for one-line errors."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def open_storage(location: str | Path) -> Storage:
    """The bundle's location as a ``Storage`` (a local folder, or a URI ``fer_ray.storage`` reads); a URI pyarrow
    cannot open is a ``BundleError`` naming it. A bucket that cannot be reached fails at once, not after
    ``fer_ray.storage``'s outage retries: export, predict and serve are one-off commands (Serve restarts a replica
    that failed to load)."""
    try:
        return Storage(location, retry=False)
    except StorageError as e:  # names the location already
        raise BundleError(str(e)) from None
    except (OSError, ValueError) as e:
        raise BundleError(f"{location}: cannot open the bundle's location ({error_line(e)})") from None


def missing_bucket(store: Storage) -> str | None:
    """The bucket of a ``store`` on an object store when it does not exist (``None`` when it does, or locally)."""
    import pyarrow.fs as pafs

    bucket = store.root.split("/", 1)[0]
    if store.is_local or not bucket or store.fs.get_file_info(bucket).type != pafs.FileType.NotFound:
        return None
    return bucket


def _read_card_bytes(store: Storage) -> bytes:
    """``model_card.json``'s bytes; a missing folder, URI or card, or an unreachable bucket, is one line."""
    make = f"make one with `fer-ray export RESULTS --ensemble NAME --out {store.uri}`"
    if store.is_local and not Path(store.root).is_dir():
        raise BundleError(f"{store.uri}: no such bundle folder ({make})")
    where = store.uri_of(CARD)
    try:
        return store.read_bytes(CARD)
    except StorageError:  # no card: say whether anything is there at all
        pass
    except OSError as e:  # a local file that cannot be read, or a bucket that cannot be reached
        what = f"{where}: unreadable model card" if store.is_local else \
            f"{store.uri}: cannot read the bundle's location"
        raise BundleError(f"{what} ({error_line(e)})") from None
    try:
        empty, bucket = store.is_empty(), missing_bucket(store)
    except OSError as e:
        raise BundleError(f"{store.uri}: cannot read the bundle's location ({error_line(e)})") from None
    if bucket:
        raise BundleError(f"{store.uri}: no bundle at this location: there is no bucket {bucket!r}")
    if empty:
        raise BundleError(f"{store.uri}: no bundle at this location ({make})")
    raise BundleError(f"{where}: missing; {store.uri} is not a fer_ray bundle (`fer-ray export` writes one)")


def check_card(card: object, where: str) -> dict:
    """``card`` (the parsed ``model_card.json`` at ``where``) checked for its format, classes and graph entry."""
    if not isinstance(card, dict) or card.get("format") != BUNDLE_FORMAT:
        got = card.get("format") if isinstance(card, dict) else type(card).__name__
        raise BundleError(f"{where}: format {got!r}, expected {BUNDLE_FORMAT!r}; export the bundle again")
    graph = card.get("graph") or {}
    if graph.get("format") not in GRAPH_FILES or not graph.get("file") or not graph.get("sha256"):
        raise BundleError(f"{where}: its 'graph' entry needs format (one of {', '.join(GRAPH_FILES)}), file and "
                          "sha256; export the bundle again")
    if list(card.get("classes", [])) != list(CLASSES):
        raise BundleError(f"{where}: classes {card.get('classes')} are not fer_ray's {list(CLASSES)}")
    return card


def _card_of(store: Storage) -> dict:
    where = store.uri_of(CARD)
    try:
        card = json.loads(_read_card_bytes(store))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{where}: unreadable model card ({type(e).__name__}: {e}); export the bundle again"
                          ) from None
    return check_card(card, where)


def read_card(location: str | Path) -> dict:
    """The model card of the bundle at ``location`` (a folder or URI), checked for its format, classes and graph
    entry."""
    return _card_of(open_storage(location))


def load_bundle(location: str | Path, threads: int | None = None, device: str = "cpu") -> Bundle:
    """Open the bundle at ``location``: read the card and the graph, check the graph's sha256, load it from the
    bytes read (nothing is written locally).

    Args:
        location: The bundle folder (``fer-ray export --out``) or its URI (``s3://bucket/prefix?...``: anything
            ``fer_ray.storage`` reads, with the credentials of this environment).
        threads: Intra-op threads of the runtime (``None``: the runtime's default, all cores).
        device: ``cpu`` or ``cuda`` (ONNX Runtime's CUDA provider when installed, else CPU with a note).

    Raises:
        BundleError: A missing folder, URI or file, an unreachable bucket, an unknown format, a graph whose sha256
            differs from the card, or a graph the runtime cannot load.
    """
    store = open_storage(location)
    card = _card_of(store)
    rel = card["graph"]["file"]
    where = store.uri_of(rel)
    try:
        data = store.read_bytes(rel)
    except StorageError:
        raise BundleError(f"{where}: missing (the model card names it); export the bundle again") from None
    except OSError as e:
        raise BundleError(f"{where}: unreadable graph ({error_line(e)})") from None
    if sha256_bytes(data) != card["graph"]["sha256"]:
        raise BundleError(f"{where}: sha256 differs from {CARD}; the graph was modified or truncated, refusing it")
    return open_graph(data, card, threads, device, location=store.uri)


def open_graph(graph: Path | bytes, card: dict, threads: int | None = None, device: str = "cpu",
               location: str | Path | None = None) -> Bundle:
    """The ``Bundle`` running the graph (a file, or its bytes) as ``card`` describes it (no sha256 check: the
    exporter's own check before the card is written; ``load_bundle`` for everything else). ``location``: the
    bundle's folder or URI (default, and required for bytes: the graph file's folder)."""
    fmt = card["graph"]["format"]
    location = normalize(location if location is not None else Path(graph).parent)
    where = str(graph) if isinstance(graph, Path) else join_uri(location, card["graph"]["file"])
    try:
        run, device = (_onnx_runner if fmt == "onnx" else _torchscript_runner)(graph, threads, device, where)
    except Exception as e:  # noqa: BLE001 - the runtimes raise many types for a bad graph
        raise BundleError(f"{where}: the {fmt} runtime cannot load it ({error_line(e)})") from None
    return Bundle(location, card, run, device)


def _onnx_runner(graph: Path | bytes, threads: int | None, device: str, where: str) -> tuple[Runner, str]:
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
            print(f"[bundle] {where}: onnxruntime has no CUDA provider here (install onnxruntime-gpu); running on CPU",
                  flush=True)
            device = "cpu"
    session = ort.InferenceSession(str(graph) if isinstance(graph, Path) else graph, opts, providers=providers)

    def run(faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, logits = session.run(list(OUTPUT_NAMES), {INPUT_NAME: faces})
        return probs, logits

    return run, device


def _torchscript_runner(graph: Path | bytes, threads: int | None, device: str, where: str) -> tuple[Runner, str]:
    import warnings

    import torch

    if threads:
        torch.set_num_threads(int(threads))
    if device == "cuda" and not torch.cuda.is_available():
        device = "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in favour of torch.export
        module = torch.jit.load(str(graph) if isinstance(graph, Path) else io.BytesIO(graph),
                                map_location=device).eval()

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
