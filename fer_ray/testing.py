"""Helpers the tests and benchmarks share: a real S3-compatible server (moto's server mode) on loopback, a TCP
proxy in front of it that can take the bucket away (``flaky_proxy``: refused connections, slow responses), and a
real autoscaling Ray cluster on this one machine (Ray's own autoscaler driving its fake multi-node provider), and
the small synthetic ``arrays`` a ``fer_ray.loop.TrainingRun`` takes (``run_arrays``), and the machine's speed that a
suite's wall time is read against (``machine_reference``).

``s3_server`` needs the ``dev`` extra (``moto[server]``). Nothing in the pipeline imports this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from fer_ray.nodes import end_session, free_port, free_ports


def run_arrays(n: int = 96, n_train: int = 64, seed: int = 0) -> dict:
    """``n`` synthetic faces as a ``TrainingRun``'s ``arrays``: a seeded shuffle, the first ``n_train`` for
    training, the rest for validation."""
    import numpy as np

    from fer_ray.data.synthetic import generate

    data = generate(n, seed=seed)
    idx = np.random.default_rng(seed).permutation(n)
    return {"images": data.images, "labels": data.labels, "splits": {"train": idx[:n_train], "val": idx[n_train:]}}


def machine_reference(steps: int = 8) -> dict:
    """This machine's speed, to read a suite's wall time against (its speed varies 2x from day to day): the median
    of ``steps`` fp32 SGD steps of ``basic_cnn`` at 48 px and batch 64 on one thread, and a pure-Python loop of a
    million multiply-adds. ``make test`` prints it after the tests, when nothing else runs (``tests/conftest.py``)."""
    import statistics

    import torch
    import torch.nn.functional as F

    from fer_ray.models import create_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = create_model("basic_cnn", img_size=48)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x, y = torch.randn(64, 1, 48, 48), torch.randint(0, 7, (64,))
        times = []
        for _ in range(steps + 2):  # the first two warm up
            t0 = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sum(i * i for i in range(1_000_000))
        python_s = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return {"torch_step_ms": 1e3 * statistics.median(times[2:]), "python_loop_ms": 1e3 * python_s,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def reap(proc: subprocess.Popen) -> None:
    """Kill ``proc`` (a driver the test started) if it still runs, and wait for it: a test never leaves a child
    behind for the tests that follow, and stops only what it started."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}
"""Fake credentials for the loopback server (and no slow EC2 metadata lookups)."""


@contextlib.contextmanager
def s3_server(bucket: str = "fer-test", prefix: str = "runs") -> Iterator[str]:
    """Start moto's S3 server (``moto_server``) on 127.0.0.1 and a free port in a process of its own, put fake
    credentials in ``os.environ`` (so Ray started afterwards, and subprocesses, get them), create ``bucket``; yield
    ``s3://bucket/prefix?region=...&endpoint_override=127.0.0.1:PORT&scheme=http``. On exit, end the server's process
    session (by its id) and restore the environment.

    Its own process, as a real bucket is: the test's own work (pandas, torch, report plots) and the server do not
    share a GIL. Not a speed-up: the S3 end-to-end took 123.7 s alone with a server thread, 126.8 s with this
    (docs/development.md)."""
    import pyarrow.fs as pafs

    port = free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    try:
        deadline = time.monotonic() + 120  # a liveness guard: it listens within a few seconds
        while not _listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"moto's S3 server did not start:\n{log.read()[-2000:].decode(errors='replace')}")
            time.sleep(0.1)
        query = f"region=us-east-1&endpoint_override=127.0.0.1:{port}&scheme=http"
        fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}?{query}&allow_bucket_creation=true")
        fs.create_dir(bucket)
        yield f"s3://{bucket}/{prefix}?{query}"
    finally:
        end_session(proc.pid, grace_s=5.0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# -- a bucket outage: a loopback TCP proxy in front of the S3 server ----------------------------------------------
class FlakyProxy:
    """A TCP proxy on ``127.0.0.1:port`` to ``target`` (``host:port``), one thread per connection. ``refuse()``
    closes the listening socket and every open connection (clients then get "Connection refused", as from a
    server that is down) until ``accept()`` listens on the same port again; ``delay(s)`` holds the first chunk of
    every response (the first bytes from the server after the client sent something) for ``s`` seconds
    (``delayed`` counts them)."""

    def __init__(self, target: str):
        host, port = target.rsplit(":", 1)
        self.target, self.port = (host, int(port)), free_port()
        self.delay_s, self.refusals, self.delayed = 0.0, 0, 0
        self._lock, self._conns = threading.Lock(), set()
        self._listener: socket.socket | None = None
        self._closed = threading.Event()
        self.accept()
        threading.Thread(target=self._serve, daemon=True, name="flaky-proxy").start()

    def accept(self) -> None:
        with self._lock:
            if self._listener is None:
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", self.port))
                s.listen(64)
                self._listener = s

    def refuse(self) -> None:
        with self._lock:
            listener, self._listener, conns = self._listener, None, list(self._conns)
            self.refusals += 1
        for s in [listener, *conns]:
            if s is not None:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def delay(self, seconds: float) -> None:
        self.delay_s = float(seconds)

    def close(self) -> None:
        self._closed.set()
        self.refuse()

    def _serve(self) -> None:
        while not self._closed.is_set():
            listener = self._listener
            if listener is None:
                time.sleep(0.05)
                continue
            try:
                if not select.select([listener], [], [], 0.1)[0]:
                    continue
                client, _ = listener.accept()
            except (OSError, ValueError):  # refused meanwhile
                continue
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        with self._lock:
            self._conns |= {client, server}
        awaiting = False  # the client sent a request whose response has not started yet
        try:
            while True:
                for s in select.select([client, server], [], [])[0]:
                    data = s.recv(65536)
                    if not data:
                        return
                    if s is client:
                        awaiting = True
                        server.sendall(data)
                    else:
                        if awaiting and self.delay_s:
                            self.delayed += 1
                            time.sleep(self.delay_s)
                        awaiting = False
                        client.sendall(data)
        except (OSError, ValueError):  # closed by refuse()
            pass
        finally:
            with self._lock:
                self._conns -= {client, server}
            client.close()
            server.close()

    def uri(self, uri: str) -> str:
        """``uri`` (an ``s3_server`` URI) with its ``endpoint_override`` pointing at this proxy."""
        return re.sub(r"endpoint_override=[^&]+", f"endpoint_override=127.0.0.1:{self.port}", uri)


@contextlib.contextmanager
def flaky_proxy(uri: str) -> Iterator[FlakyProxy]:
    """A ``FlakyProxy`` in front of the S3 server of ``uri`` (an ``s3_server`` URI); ``proxy.uri(uri)`` is the same
    location through the proxy. Closed (every connection ended) on exit."""
    target = re.search(r"endpoint_override=([^&]+)", uri).group(1)
    proxy = FlakyProxy(target)
    try:
        yield proxy
    finally:
        proxy.close()


# -- an autoscaling Ray cluster on one machine ---------------------------------------------------------------------
HEAD_TYPE = "ray.head.default"
"""The node type the fake provider gives the head (``FAKE_HEAD_NODE_TYPE``)."""


def node_types(cpu_max: int = 2, cpus: int = 2, object_store_mb: int = 200) -> dict:
    """Worker node types mirroring ``cluster.yaml`` at this machine's scale: ``cpu`` (``cpus`` CPUs, 0..``cpu_max``)
    and two GPU types with logical GPUs and ``accelerator_type:<X>`` resources: ``gpu_a10g`` (1 A10G, 0..2) and
    ``gpu_4x_l4`` (4 L4, 0..1; ``cluster.yaml``'s second type is 4 A10G, here another accelerator so that placement
    across GPU types is tested). The GPU types get one CPU, so nothing that asks for more (a DDP trial's worker
    group, a TTA task) can land there: the CPU type is what scales for CPU work, as on the real cluster."""
    store = object_store_mb * 1024**2

    def kind(resources: dict, most: int) -> dict:
        return {"resources": resources | {"object_store_memory": store}, "node_config": {}, "min_workers": 0,
                "max_workers": most}

    return {"cpu": kind({"CPU": cpus}, cpu_max),
            "gpu_a10g": kind({"CPU": 1, "GPU": 1, "accelerator_type:A10G": 1}, 2),
            "gpu_4x_l4": kind({"CPU": 1, "GPU": 4, "accelerator_type:L4": 4}, 1)}


def autoscaling_config(gcs_port: int, types: dict, idle_timeout_minutes: float = 0.25,
                       upscaling_speed: float = 1.0) -> dict:
    """A cluster config for Ray's fake multi-node provider (``ray/autoscaler/_private/fake_multi_node``): the real
    autoscaler, nodes started as local processes that join the head's GCS at ``127.0.0.1:<gcs_port>``."""
    lists = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
             "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files", "rsync_exclude",
             "rsync_filter")
    return {"cluster_name": "fer-ray-fake", "max_workers": sum(t["max_workers"] for t in types.values()),
            "upscaling_speed": upscaling_speed, "idle_timeout_minutes": idle_timeout_minutes,
            "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{gcs_port}", "use_node_id_as_ip": True,
                         "disable_node_updaters": True, "disable_launch_config_check": True},
            "auth": {}, "docker": {}, "head_node_type": HEAD_TYPE,
            "available_node_types": {HEAD_TYPE: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
                                     **types},
            "file_mounts": {}, "file_mounts_sync_continuously": False, **{k: [] for k in lists}}


@dataclasses.dataclass
class LocalCluster:
    """A running ``autoscaling_cluster``: where to reach it and the environment its clients need."""

    gcs_address: str
    dashboard_url: str
    temp_dir: str
    config: dict
    pid: int
    """The head's ``ray start --block`` process; it leads the session (and process group) every node runs in."""

    @property
    def env(self) -> dict[str, str]:
        """Variables a client (a driver subprocess, ``ray status``, ``ray.init``) of this cluster needs, and the
        autoscaler's config for fer_ray's placement checks (``fer_ray.placement.autoscaler_node_types``)."""
        return {"RAY_ADDRESS": self.gcs_address, "RAY_AUTH_MODE": "token",
                "FER_RAY_AUTOSCALING_CONFIG": str(Path(self.temp_dir, "autoscaling.yaml"))}

    def connect(self, **init_kwargs) -> None:
        """``ray.init`` this process as a client of the cluster. Token mode is set process-wide as Ray's own local
        ``ray.init`` does (``RAY_AUTH_MODE=token`` and a refreshed config: Ray reads the variable when its config is
        initialized, at import)."""
        import ray
        from ray._raylet import Config

        os.environ["RAY_AUTH_MODE"] = "token"
        Config.initialize("")
        ray.init(address=self.gcs_address, **init_kwargs)

    def log_text(self, name: str = "monitor.log") -> str:
        """A log of the head's session (``monitor.log``: the autoscaler's view, ``ray start.log``: the head)."""
        path = Path(self.temp_dir, "ray start.log") if name == "ray start.log" else \
            Path(self.temp_dir, "session_latest", "logs", name)
        return path.read_text(errors="replace") if path.exists() else ""


@contextlib.contextmanager
def autoscaling_cluster(types: dict | None = None, idle_timeout_minutes: float = 0.25, upscaling_speed: float = 1.0,
                        head_object_store_mb: int = 200, start_timeout_s: float = 180.0) -> Iterator[LocalCluster]:
    """Start a head (0 CPUs: it takes no trials) with Ray's autoscaler over the fake multi-node provider and the
    node ``types`` (default ``node_types()``), in a temp folder of its own given as ``--temp-dir`` (not Ray's
    default, as on the clusters where Ray Train's State-API cleaner fails), on free loopback ports; yield a
    ``LocalCluster``. On exit, end the session of processes it started (``ray start --block`` runs in a new session:
    the head's and every worker node's processes), by its id, and remove the temp folder. Token authentication is
    on: clients need ``LocalCluster.env``."""
    tmp = tempfile.mkdtemp(prefix="fer_ray_asc_")  # short: Ray's socket paths live under it
    gcs, dash, client, agent = free_ports(4)
    config = autoscaling_config(gcs, types or node_types(), idle_timeout_minutes, upscaling_speed)
    cfg_path = Path(tmp, "autoscaling.yaml")
    cfg_path.write_text(_dump_yaml(config))
    ray_cli = str(Path(sys.executable).with_name("ray"))
    cmd = [ray_cli, "start", "--head", "--block", f"--autoscaling-config={cfg_path}", f"--temp-dir={tmp}",
           f"--port={gcs}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}", "--num-cpus=0",
           "--num-gpus=0", f"--object-store-memory={head_object_store_mb * 1024**2}", "--disable-usage-stats"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "token"}
    log_file = open(Path(tmp, "ray start.log"), "wb")  # the head writes to it until it ends
    proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    cluster = LocalCluster(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", tmp, config, proc.pid)
    try:
        deadline = time.monotonic() + start_timeout_s
        while "Ray runtime started" not in cluster.log_text("ray start.log"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the autoscaling head did not start:\n{cluster.log_text('ray start.log')[-3000:]}")
            time.sleep(0.5)
        yield cluster
    finally:
        # SIGTERM, then SIGKILL after 5 s: the head's `ray start --block` waits on its GCS for the whole of a longer
        # grace (20 s, measured), and nothing of a run lives only on this cluster (LocalNodes.stop does the same).
        end_session(proc.pid, grace_s=5.0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        log_file.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _dump_yaml(obj: dict) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False)


PRELOAD = ("numpy", "pandas", "pyarrow.parquet", "torch", "torchvision", "timm", "kornia", "ray", "ray.train",
           "ray.tune", "fer_ray.cli", "fer_ray.sweep", "fer_ray.train", "fer_ray.tta", "fer_ray.ensemble",
           "fer_ray.report", "fer_ray.budget", "fer_ray.serve")
"""What a ``ScriptRunner``'s server imports once, before it forks a child per script."""


class ScriptRunner:
    """Runs Python scripts as ``python script args...`` would, each in a child forked from one server process
    (``multiprocessing``'s forkserver) that imported ``PRELOAD`` once: a fresh interpreter importing torch, Ray and
    timm costs ~5-8 s on 2 cores before a script does any work, and the benchmark smokes are 17 scripts.

    The server only imports (it starts no Ray and runs no torch op), so each child starts clean: it takes the given
    environment and working folder, its file descriptors 1 and 2 go to files, and it ends with ``ray.shutdown()``
    when the script left Ray connected, as an exiting interpreter would."""

    def __init__(self, preload: tuple[str, ...] = PRELOAD):
        import multiprocessing

        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(list(preload))

    def run(self, script: str | Path, args: list[str], env: dict[str, str], cwd: str | Path,
            timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            child = self.ctx.Process(target=_run_script, args=(str(script), list(args), dict(env), str(cwd),
                                                                 str(out), str(err)))
            child.start()
            child.join(timeout)
            if child.is_alive():
                child.kill()
                child.join()
                raise subprocess.TimeoutExpired([str(script), *args], timeout)
            return subprocess.CompletedProcess([str(script), *args], child.exitcode,
                                               out.read_text(errors="replace") if out.exists() else "",
                                               err.read_text(errors="replace") if err.exists() else "")


def _run_script(script: str, args: list[str], env: dict[str, str], cwd: str, out: str, err: str) -> None:
    """A ``ScriptRunner`` child: ``script`` as ``__main__``; its exit status is the script's."""
    import runpy
    import traceback

    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.path.insert(0, str(Path(script).resolve().parent))
    sys.argv = [script, *args]
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)
