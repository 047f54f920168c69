"""Benchmark 13: ``fer-ray serve`` under load from a bounded loopback client: 8 concurrent clients (threads with
keep-alive HTTP connections to 127.0.0.1) send 2,000 ``POST /predict`` requests, one 48x48 PNG face each, to one
replica; requests/s, p50/p99 latency and failed requests, with dynamic batching (``@serve.batch``, up to 32 faces
or 5 ms) and without it (each request scored on its own), in the same run: the same bundle deployed twice side by
side (``/batching``, ``/no_batching``; 2 runtime threads each), loaded one after the other.

The bundle is bench 12's (``bench_predict.build_bundle``: basic_cnn@48 + basic_cnn@32 + baseline_cnn_v1@40, 2
views). On the 2-core machine the client, Ray Serve's HTTP proxy and the replica share the cores: the figures are
what one small box serves, not a replica's ceiling."""

from __future__ import annotations

import http.client
import io
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from bench_predict import MEMBERS, build_bundle
from common import emit, parser
from PIL import Image

from fer_ray import serve as fer_serve
from fer_ray.data.synthetic import generate
from fer_ray.nodes import free_port


def load(port: int, path: str, bodies: list[bytes], requests: int, clients: int, timeout_s: float = 600.0) -> dict:
    """``requests`` POSTs (bodies round-robin) from ``clients`` threads, each on its own keep-alive connection;
    bounded in count and time. Returns requests/s, latency percentiles (ms) and failures."""
    latencies: list[float] = []
    failures: list[str] = []
    lock, counter = threading.Lock(), iter(range(requests))
    deadline = time.perf_counter() + timeout_s

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.perf_counter() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, bodies[i % len(bodies)], {"Content-Type": "image/png"})
                resp = conn.getresponse()
                body = resp.read()
                ok = resp.status == 200 and "probs" in json.loads(body)["results"][0]
            except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
                ok, body = False, repr(e).encode()
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            with lock:
                (latencies if ok else failures).append(time.perf_counter() - t0 if ok else body[:200].decode())
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {"requests": len(latencies) + len(failures), "failed": len(failures), "wall_s": wall,
            "requests_per_s": len(latencies) / wall, "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None, "first_failure": failures[:1]}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--clients", type=int, default=8)
    args = p.parse_args()
    requests, clients = (8, 2) if args.smoke else (args.requests, args.clients)
    tmp = Path(tempfile.mkdtemp(prefix="fer_bench_serve_"))
    bodies = []
    for face in generate(64, seed=3).images:
        buf = io.BytesIO()
        Image.fromarray(face).save(buf, "PNG")
        bodies.append(buf.getvalue())
    out = {}
    try:
        # Smoke: a one-member bundle; the three-member one is built, exported and checked by bench_predict's smoke,
        # and what is measured here (batching vs not) does not depend on what the bundle holds.
        bundle_dir = build_bundle(tmp, members=MEMBERS[:1], n=70) if args.smoke else build_bundle(tmp)
        port = free_port()
        for mode in ("batching", "no_batching"):  # two apps side by side, loaded one after the other
            fer_serve.start(bundle_dir, port=port, num_cpus=2, batching=mode == "batching", max_batch_size=32,
                            batch_wait_ms=5.0, threads=2, cpus_per_replica=1, name=mode, route_prefix=f"/{mode}")
        for mode in ("batching", "no_batching"):
            load(port, f"/{mode}/predict", bodies, min(requests, 50), clients)  # warm-up: connections, first batches
            out[mode] = load(port, f"/{mode}/predict", bodies, requests, clients)
    finally:
        fer_serve.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    b, nb = out["batching"], out["no_batching"]
    emit("serve", {"requests": requests, "clients": clients, "replicas": 1, "batching": b, "no_batching": nb,
                   "speedup_rps": b["requests_per_s"] / nb["requests_per_s"],
                   "failed": b["failed"] + nb["failed"], "target": "0 failed requests"}, args)
    if b["failed"] + nb["failed"]:
        raise SystemExit(f"{b['failed'] + nb['failed']} failed requests: {b['first_failure'] or nb['first_failure']}")


if __name__ == "__main__":
    main()
