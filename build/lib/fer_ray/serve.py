"""``fer-ray serve``: a bundle (``fer_ray.bundle``) behind HTTP as a Ray Serve deployment.

This module owns the deployment (``FERService``), the request and response formats and starting/stopping it
(``start``, ``serve_forever``). ``POST /predict`` takes:

* an image file as the raw body (``Content-Type: image/png``, ``image/jpeg``, ``application/octet-stream``, ...);
* ``multipart/form-data`` with one or more image files (a batch);
* JSON ``{"faces": [[48 rows of 48 uint8]], ...]}`` (face crops as arrays) or ``{"images": ["<base64>", ...]}``.

Each image is one face by default, decoded as ``fer-ray predict --faces whole`` decodes it (so both give the same
probabilities); ``?faces=detect`` finds the faces with OpenCV's Haar cascade instead. The answer is JSON:
``{"model": NAME, "classes": [...], "results": [{"source", "face", "box", "label", "confidence", "probs":
{class: p}} | {"source", "error"}]}``; a malformed request is a 400 with ``{"error": ...}``. ``GET /`` returns the
bundle's name, classes and metrics.

Requests are scored through ``@serve.batch`` (dynamic batching: faces from concurrent requests share one forward
pass, up to ``max_batch_size`` faces or ``batch_wait_ms``), or one request at a time with ``batching=False``. Ray is
started with ``fer_ray.cluster.init_ray``; replicas ask for a GPU when the cluster has one (ONNX Runtime's CUDA
provider, or torch for TorchScript bundles). The HTTP proxy listens on the head node only, on ``127.0.0.1``
unless ``host`` says otherwise. Every replica loads the bundle itself from its location: a bucket URI
(``s3://bucket/prefix?...``, read through ``fer_ray.storage`` with the driver's storage credentials, which travel in
the replicas' runtime_env), so replicas on worker nodes need no shared disk; or a folder, which on a multi-node
cluster must then be readable at the same path on every node.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from pathlib import Path

import numpy as np
from ray import serve

from fer_ray.bundle import Bundle, load_bundle
from fer_ray.data.dataset import CLASSES, IMG_SIZE, DataError
from fer_ray.predict import FACE_MODES, Face, FaceDetector, image_faces
from fer_ray.storage import is_uri

APP_NAME = "fer_ray"
MAX_ONGOING = 64
"""Requests a replica holds at once (Ray Serve's default, 5, would cap a dynamic batch at 5 requests)."""


async def read_faces(request, detector: FaceDetector | None) -> list[Face]:
    """The faces of one ``POST /predict`` request (see the module docstring); ``DataError`` for a malformed one."""
    mode = request.query_params.get("faces", "whole")
    if mode not in FACE_MODES:
        raise DataError(f"?faces= must be one of {', '.join(FACE_MODES)}, got {mode!r}")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        form = await request.form()
        faces = []
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                faces += image_faces(await value.read(), mode, detector, value.filename or key)
        if not faces:
            raise DataError("multipart request without a file part; send images as files (-F file=@face.png)")
        return faces
    if ctype == "application/json":
        return _json_faces(await request.json(), mode, detector)
    body = await request.body()
    if not body:
        raise DataError("empty request body; POST an image file, multipart files or JSON {\"faces\": ...}")
    return image_faces(body, mode, detector, "body")


def _json_faces(payload: object, mode: str, detector: FaceDetector | None) -> list[Face]:
    if isinstance(payload, dict) and "faces" in payload:
        arr = np.asarray(payload["faces"])
        arr = arr[None] if arr.ndim == 2 else arr
        if arr.ndim != 3 or arr.shape[1:] != (IMG_SIZE, IMG_SIZE) or not np.issubdtype(arr.dtype, np.integer) or (
                arr.size and (arr.min() < 0 or arr.max() > 255)):
            raise DataError(f"\"faces\" must be 48x48 arrays of integers 0-255 (one or a list), got shape "
                            f"{list(arr.shape)} of {arr.dtype}")
        return [Face(f"faces[{i}]", None, 0, (0, 0, IMG_SIZE, IMG_SIZE), a.astype(np.uint8)) for i, a in enumerate(arr)]
    if isinstance(payload, dict) and isinstance(payload.get("images"), list):
        faces = []
        for i, text in enumerate(payload["images"]):
            try:
                blob = base64.b64decode(str(text), validate=True)
            except (binascii.Error, ValueError):
                faces.append(Face(f"images[{i}]", error="not base64"))
                continue
            faces += image_faces(blob, mode, detector, f"images[{i}]")
        return faces
    raise DataError("JSON body must be {\"faces\": [48x48 uint8 arrays]} or {\"images\": [base64 image files]}")


def result_json(face: Face, probs: np.ndarray | None) -> dict:
    """One entry of the answer's ``results``."""
    if probs is None:
        return {"source": face.source, "frame": face.frame, "error": face.error}
    p = [float(v) for v in probs]
    k = int(np.argmax(p))
    return {"source": face.source, "face": face.face, "box": list(face.box) if face.box else None,
            "label": CLASSES[k], "confidence": p[k], "probs": dict(zip(CLASSES, p))}


@serve.deployment(name="FERService", max_ongoing_requests=MAX_ONGOING)
class FERService:
    """One replica: the bundle loaded once, faces scored with or without dynamic batching."""

    def __init__(self, bundle: str, threads: int | None, max_batch_size: int, batch_wait_s: float,
                 batching: bool) -> None:
        import ray

        device = "cuda" if ray.get_gpu_ids() else "cpu"
        self.bundle: Bundle = load_bundle(bundle, threads=threads, device=device)
        self.batching = batching
        self.detector: FaceDetector | None = None
        self.score_batch.set_max_batch_size(max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(batch_wait_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def score_batch(self, faces: list[np.ndarray]) -> list[np.ndarray]:
        """Dynamic batching: faces of concurrent requests in one forward pass."""
        probs, _ = self.bundle.predict(np.stack(faces), batch_size=len(faces))
        return list(probs)

    async def score(self, faces: list[np.ndarray]) -> list[np.ndarray]:
        if not faces:
            return []
        if self.batching:
            return list(await asyncio.gather(*(self.score_batch(f) for f in faces)))
        return list(self.bundle.predict(np.stack(faces))[0])

    async def __call__(self, request) -> object:
        from starlette.responses import JSONResponse

        path, root = request.url.path, request.scope.get("root_path", "")
        path = (path[len(root):] if root and path.startswith(root) else path).rstrip("/")
        if request.method == "GET" and path in ("", "/health"):
            card = self.bundle.card
            return {"model": self.bundle.name, "bundle": self.bundle.location, "kind": card.get("kind"),
                    "classes": self.bundle.classes,
                    "views": card.get("views"), "metrics": card.get("metrics"), "device": self.bundle.device,
                    "batching": self.batching, "predict": "POST /predict"}
        if path != "/predict" or request.method != "POST":
            return JSONResponse({"error": f"{request.method} {path or '/'}: use POST /predict (GET / describes "
                                          "the model)"}, status_code=404)
        try:
            if request.query_params.get("faces") == "detect" and self.detector is None:
                self.detector = FaceDetector()
            faces = await read_faces(request, self.detector)
        except (DataError, ValueError) as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        scored = [f for f in faces if f.pixels is not None]
        probs = dict(zip(map(id, scored), await self.score([f.pixels for f in scored])))
        return {"model": self.bundle.name, "classes": self.bundle.classes,
                "results": [result_json(f, probs.get(id(f))) for f in faces]}


def _replica_resources(replicas: int, cpus: float | None = None) -> dict[str, float]:
    """A GPU per replica when the cluster has GPUs, and ``cpus`` (default: an equal share of one node's CPUs, at
    least 1)."""
    import ray

    node_cpus = max([n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")] or [1])
    cpus = float(cpus) if cpus else max(1.0, float(int(node_cpus // max(1, replicas))))
    gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    return {"num_cpus": cpus, "num_gpus": gpus}


def _replica_options(location: str, replicas: int, cpus: float | None) -> dict:
    """The replicas' ``ray_actor_options``: their resources and, for a bundle at a URI, this environment's storage
    credentials (``fer_ray.cluster.storage_env``: a joined cluster's job may not carry them, and Ray forwards no
    driver environment), so each replica reads the bundle from the bucket itself."""
    from fer_ray.cluster import storage_env

    options: dict = _replica_resources(replicas, cpus)
    env = storage_env() if is_uri(location) else {}
    if env:
        options["runtime_env"] = {"env_vars": env}
    return options


def start(bundle: str | Path, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
          num_cpus: int | None = None, max_batch_size: int = 32, batch_wait_ms: float = 5.0, batching: bool = True,
          threads: int | None = None, cpus_per_replica: float | None = None, name: str = APP_NAME,
          route_prefix: str = "/") -> str:
    """Deploy the bundle at ``bundle`` (a folder or URI) on Ray Serve (Ray started or joined with ``init_ray``);
    returns the app's base URL.

    The bundle is opened here first, so a bad one (a missing folder or URI, an unreachable bucket, a modified graph)
    stops with one line before Ray starts; each replica then loads it from the same location. ``num_cpus``: CPUs of a
    local Ray this starts. ``threads``: runtime threads per replica (default: the replica's CPUs). Calling it again
    with the same ``name`` redeploys in place; another ``name`` and ``route_prefix`` serve a second bundle (or the
    same one, configured otherwise) beside the first.
    """
    import ray

    from fer_ray.cluster import init_ray
    from fer_ray.config import ConfigError

    if replicas < 1 or max_batch_size < 1 or batch_wait_ms < 0 or not 0 <= port < 65536:
        raise ConfigError(f"serve: --replicas and --max-batch-size must be >= 1, --batch-wait-ms >= 0 and --port a "
                          f"port number; got {replicas}, {max_batch_size}, {batch_wait_ms}, {port}")
    location = load_bundle(bundle).location  # an absolute path, or the URI
    init_ray(num_cpus=num_cpus)
    res = _replica_options(location, replicas, cpus_per_replica)
    serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port})
    app = FERService.options(num_replicas=replicas, ray_actor_options=res).bind(
        location, threads or max(1, int(res["num_cpus"])), max_batch_size, batch_wait_ms / 1000.0, batching)
    serve.run(app, name=name, route_prefix=route_prefix)
    batch = f"up to {max_batch_size} faces / {batch_wait_ms:g} ms" if batching else "off"
    gpu = " + 1 GPU" if res["num_gpus"] else ""
    print(f"[serve] {location}: {replicas} replica(s) × {res['num_cpus']:g} CPU{gpu}, dynamic batching {batch}; "
          f"Ray {ray.__version__}", flush=True)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def stop(name: str | None = None) -> None:
    """Remove app ``name`` only (on a shared cluster), or, by default, every app and Ray Serve's controller and
    proxy; Ray itself keeps running."""
    if name:
        serve.delete(name)
    else:
        serve.shutdown()


def serve_forever(bundle: str | Path, **kw) -> None:
    """``fer-ray serve``: ``start``, then wait until Ctrl-C or SIGTERM; then remove the app, and when this process
    started its own local Ray, Ray Serve and that Ray too (on a cluster, other Serve apps and Ray keep running)."""
    import signal

    import ray

    from fer_ray import cluster

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        url = start(bundle, **kw)
        for sig in (signal.SIGTERM, signal.SIGINT):  # after Ray's start-up, which installs handlers of its own;
            signal.signal(sig, interrupt)  # SIGINT also when started in the background, where it is ignored
        print(f"[serve] POST {url}/predict  (an image as the body, multipart files, or JSON {{\"faces\": ...}}); "
              f"GET {url}/ describes the model; Ctrl-C stops", flush=True)
        while True:  # short sleeps: a signal taken by one of Ray's threads is acted on within half a second
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("[serve] stopping", flush=True)
    finally:
        if ray.is_initialized():
            stop(None if cluster.STARTED_LOCAL_RAY else kw.get("name", APP_NAME))
            if cluster.STARTED_LOCAL_RAY:
                ray.shutdown()
