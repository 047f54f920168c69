"""``fer-ray serve``: the Ray Serve deployment answers real HTTP requests on 127.0.0.1 (an image as the body,
multipart files, JSON faces; one at a time and 24 at once from threads) with the probabilities ``predict`` gives
for the same images, refuses malformed requests with a 400, and shuts down; a second app beside it, whose replica
reads its bundle from an S3 bucket (moto's server on 127.0.0.1), answers as the folder's does."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from fer_ray.bundle import load_bundle
from fer_ray.data import synthetic
from fer_ray.nodes import free_port
from fer_ray.predict import PROB_COLUMNS, predict

pytestmark = pytest.mark.ray


def post(url: str, body: bytes, ctype: str) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def png(face: np.ndarray, scale: int = 1) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.kron(face, np.ones((scale, scale), np.uint8))).save(buf, "PNG")
    return buf.getvalue()


def multipart(files: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
             f"Content-Type: image/png\r\n\r\n".encode() + blob + b"\r\n" for name, blob in files.items()]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def server(tmp_path_factory, ray_session):
    from test_export import make_experiment

    from fer_ray import serve as fer_serve
    from fer_ray.export import export_bundle

    root = tmp_path_factory.mktemp("serve")
    exp = make_experiment(root / "exp", members=[("basic_cnn", 48, 1)], views=["identity", "hflip"], n=160)
    export_bundle(exp, root / "bundle", member="m0")
    # One CPU per replica: test_serve_from_a_bucket_uri deploys a second app beside this one on the 2-CPU Ray.
    url = fer_serve.start(root / "bundle", port=free_port(), max_batch_size=8, batch_wait_ms=10, cpus_per_replica=1)
    assert url.startswith("http://127.0.0.1:")
    yield url, root / "bundle", root
    fer_serve.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "/", timeout=5)


def test_http_answers_equal_predict(server):
    url, bundle_dir, root = server
    faces = synthetic.generate(24, seed=9).images
    for i, f in enumerate(faces):
        (root / f"{i:02d}.png").write_bytes(png(f, scale=2))
    want = predict(load_bundle(bundle_dir), [root / f"{i:02d}.png" for i in range(24)], faces="whole",
                   progress=False)[PROB_COLUMNS].to_numpy(float)

    def ask(i: int) -> np.ndarray:
        code, body = post(url + "/predict", (root / f"{i:02d}.png").read_bytes(), "image/png")
        assert code == 200 and body["results"][0]["source"] == "body"
        return np.array(list(body["results"][0]["probs"].values()))

    np.testing.assert_allclose(ask(0), want[0], atol=1e-6)  # one request
    with ThreadPoolExecutor(8) as pool:  # 24 at once: dynamic batching puts them in shared batches
        got = np.stack(list(pool.map(ask, range(24))))
    np.testing.assert_allclose(got, want, atol=1e-6)

    body, ctype = multipart({f"{i:02d}.png": (root / f"{i:02d}.png").read_bytes() for i in range(5)})
    code, out = post(url + "/predict", body, ctype)
    assert code == 200 and [r["source"] for r in out["results"]] == [f"{i:02d}.png" for i in range(5)]
    np.testing.assert_allclose([list(r["probs"].values()) for r in out["results"]], want[:5], atol=1e-6)
    code, out = post(url + "/predict", json.dumps({"faces": faces[:3].tolist()}).encode(), "application/json")
    assert code == 200 and out["classes"][3] == "happy"
    direct = load_bundle(bundle_dir).predict(faces[:3])[0]
    np.testing.assert_allclose([list(r["probs"].values()) for r in out["results"]], direct, atol=1e-6)
    assert [r["label"] for r in out["results"]] == [out["classes"][k] for k in direct.argmax(1)]


def test_bad_requests_are_400s(server):
    url, _, _ = server
    assert post(url + "/predict", b"", "image/png")[0] == 400
    code, out = post(url + "/predict", b"not an image", "image/png")
    assert code == 200 and out["results"][0]["error"].startswith("cannot decode image")
    code, out = post(url + "/predict", json.dumps({"faces": [[1, 2, 3]]}).encode(), "application/json")
    assert code == 400 and "48x48" in out["error"]
    assert post(url + "/predict?faces=sideways", png(np.zeros((48, 48), np.uint8)), "image/png")[0] == 400
    assert post(url + "/nothing", b"x", "image/png")[0] == 404
    with urllib.request.urlopen(url + "/", timeout=30) as r:
        info = json.loads(r.read())
    assert info["model"] == "m0" and info["batching"] is True


def test_serve_from_a_bucket_uri(server, s3_server):
    """The bundle exported into a bucket, served by URI as a second app: the replica loads it from the bucket itself
    (the storage credentials travel in its runtime_env, checked directly: the suite's session Ray has them too) and
    answers a real POST as the folder's app does; a URI with no bundle stops with one line before anything is
    deployed."""
    from fer_ray import serve as fer_serve
    from fer_ray.bundle import BundleError
    from fer_ray.export import export_bundle
    from fer_ray.storage import join_uri

    url, _, root = server
    port = int(url.rsplit(":", 1)[1])
    forwarded = fer_serve._replica_options(s3_server, 1, 1.0)["runtime_env"]["env_vars"]
    assert forwarded["AWS_ACCESS_KEY_ID"] == "testing" and "runtime_env" not in fer_serve._replica_options(
        str(root), 1, 1.0)
    missing = join_uri(s3_server, "serve", "nothing")
    with pytest.raises(BundleError, match="no bundle at this location") as e:
        fer_serve.start(missing, port=port, name="fer_ray_missing", route_prefix="/missing")
    assert missing in str(e.value) and "\n" not in str(e.value)
    uri = join_uri(s3_server, "serve", "m0")
    export_bundle(root / "exp", uri, member="m0")
    s3_url = fer_serve.start(uri, port=port, name="fer_ray_s3", route_prefix="/s3", cpus_per_replica=1)
    try:
        assert s3_url == url + "/s3"
        with urllib.request.urlopen(s3_url + "/", timeout=30) as r:
            assert json.loads(r.read())["bundle"] == uri  # what the replica loaded
        image = png(synthetic.generate(1, seed=11).images[0], scale=2)
        code, from_bucket = post(s3_url + "/predict", image, "image/png")
        code_folder, from_folder = post(url + "/predict", image, "image/png")
        assert code == code_folder == 200
        np.testing.assert_allclose(list(from_bucket["results"][0]["probs"].values()),
                                   list(from_folder["results"][0]["probs"].values()), atol=1e-6)
        assert from_bucket["results"][0]["label"] == from_folder["results"][0]["label"]
        assert "fer_ray_missing" not in serve_apps()
    finally:
        fer_serve.stop("fer_ray_s3")


def serve_apps() -> set[str]:
    from ray import serve

    return set(serve.status().applications)
