"""A box with several GPU types (the seeds' RTX 3090 + GTX 1080 Ti): the GPU inventory, faked at the one place fer_ray
reads it (``FER_RAY_FAKE_GPUS`` / ``FER_RAY_FAKE_ARCHS``), becomes one Ray node per GPU type; a GPU the installed
torch cannot drive is left out with one line.

The plan is a pure function, tested case by case. The Ray test starts the per-type nodes of a fake 3090 + 1080 Ti +
3090 box for real (``ray start`` processes on 127.0.0.1 with logical GPUs: ``--num-gpus`` needs no GPU, and
``CUDA_VISIBLE_DEVICES`` is only set), sees both types in the cluster's resources and labels, and ends only the
processes it started. It needs its own Ray, so the session's is paused (``no_session_ray``).
"""

import json
import os
import time

import pytest

from fer_ray import nodes
from fer_ray.config import ConfigError
from fer_ray.gpu import FAKE_ARCHS_ENV, FAKE_GPUS_ENV, inventory

CUDA13 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
"""torch 2.14.1's CUDA 13 kernel list (no sm_61)."""
CU126 = ["sm_50", "sm_60", "sm_61", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
"""A CUDA 12.6 build's (with sm_61)."""
RTX3090 = {"name": "NVIDIA GeForce RTX 3090", "capability": [8, 6], "memory_gb": 24}
GTX1080TI = {"name": "NVIDIA GeForce GTX 1080 Ti", "capability": [6, 1], "memory_gb": 11}
T4 = {"name": "Tesla T4", "capability": [7, 5], "memory_gb": 16}
SEEDS_BOX = [RTX3090, GTX1080TI, RTX3090]
R, G = "GeForce-RTX-3090", "GeForce-GTX-1080-Ti"


def test_inventory_reads_the_fake_and_names_gpus_as_ray_does(monkeypatch):
    monkeypatch.setenv(FAKE_GPUS_ENV, json.dumps(SEEDS_BOX))
    monkeypatch.setenv(FAKE_ARCHS_ENV, ",".join(CUDA13))
    gpus = inventory()
    assert [(g.index, g.accelerator_type, g.capability, g.memory_gb, g.supported) for g in gpus] == [
        (0, R, (8, 6), 24, True), (1, G, (6, 1), 11, False), (2, R, (8, 6), 24, True)]
    assert [g.supported for g in inventory(archs=CU126)] == [True, True, True]
    assert inventory(gpus=[]) == []


@pytest.mark.parametrize("text", ["not json", '{"name": "x"}', '[{"name": "NVIDIA T4"}]', "[1]"])
def test_a_bad_fake_inventory_is_one_line(monkeypatch, text):
    monkeypatch.setenv(FAKE_GPUS_ENV, text)
    with pytest.raises(ConfigError, match=r"^FER_RAY_FAKE_GPUS: a JSON list of .* expected \(.*\)$"):
        inventory()


def plan(gpus, archs=CUDA13, cpus=16):
    return nodes.plan_nodes(inventory(gpus=gpus, archs=archs), cpus)


def shape(p: nodes.NodePlan):
    return [(n.head, n.accelerator_type, n.gpus, n.num_cpus) for n in p.nodes]


def test_the_seeds_box_on_cuda13_leaves_the_1080ti_out_with_one_line():
    p = plan(SEEDS_BOX)
    assert shape(p) == [(True, R, (0, 2), 16)]
    assert not p.in_process, "the 3090s need a node that cannot see the 1080 Ti"
    (line,) = p.left_out
    assert line.startswith("GPU 1 (NVIDIA GeForce GTX 1080 Ti, compute capability 6.1) left out: torch ")
    assert "not sm_61" in line and "CUDA 12.6" in line and "\n" not in line


def test_the_seeds_box_with_sm61_kernels_gets_one_node_per_type():
    p = plan(SEEDS_BOX, archs=CU126)
    assert shape(p) == [(True, R, (0, 2), 10), (False, G, (1,), 6)], "CPUs in proportion to GPUs, 1 each first"
    assert p.left_out == () and not p.in_process


@pytest.mark.parametrize("gpus,archs,expected,in_process,num_gpus,lines", [
    ([], CUDA13, [(True, None, (), 16)], True, None, 0),                        # a CPU box: today's local Ray
    ([RTX3090, RTX3090], CUDA13, [(True, R, (0, 1), 16)], True, None, 0),      # one type: Ray sees it right
    ([GTX1080TI], CUDA13, [(True, None, (), 16)], True, 0, 1),                  # nothing usable: a CPU Ray
    ([GTX1080TI, RTX3090], CUDA13, [(True, R, (1,), 16)], False, 0, 1),         # the usable one at index 1
    ([GTX1080TI, RTX3090], CU126, [(True, G, (0,), 8), (False, R, (1,), 8)], False, None, 0),  # head: lowest index
    ([T4, RTX3090, GTX1080TI], CU126, [(True, "T4", (0,), 6), (False, R, (1,), 5), (False, G, (2,), 5)], False,
     None, 0),
])
def test_plan_cases(gpus, archs, expected, in_process, num_gpus, lines):
    p = plan(gpus, archs)
    assert shape(p) == expected
    assert (p.in_process, p.num_gpus, len(p.left_out)) == (in_process, num_gpus, lines)


@pytest.mark.parametrize("total,weights,expected", [
    (16, [2, 1], [10, 6]), (2, [2, 1], [1, 1]), (8, [1, 1], [4, 4]), (2, [1, 1, 1], [1, 1, 0]), (1, [3], [1]),
    (3, [1, 1, 1], [1, 1, 1]),
])
def test_split_cpus(total, weights, expected):
    assert nodes.split_cpus(total, weights) == expected
    assert sum(nodes.split_cpus(total, weights)) == total


def test_ray_start_lines_give_each_node_its_gpus_type_and_ports():
    head, worker = nodes.ray_start_lines(plan(SEEDS_BOX, archs=CU126), host="192.168.1.10", port=6379)
    assert head.startswith("CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=0,2 python -m fer_ray.nodes start --head "
                           "--port=6379 --dashboard-host=127.0.0.1 --node-ip-address=192.168.1.10")
    resource = """'--resources={"accelerator_type:GeForce-RTX-3090": 1}'"""
    assert f"{resource} --labels=ray.io/accelerator-type=GeForce-RTX-3090" in head
    assert "--num-gpus=2" in head and "--dashboard-agent-listen-port=52365" in head
    assert worker.startswith("CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=1 python -m fer_ray.nodes start "
                             "--address=192.168.1.10:6379")
    assert "--labels=ray.io/accelerator-type=GeForce-GTX-1080-Ti" in worker and "--dashboard-agent-listen-port=52366" \
        in worker


class _KernelSocket:
    """A loopback socket whose ``bind(0)`` gets the lowest port no open one holds, as a kernel may: a port drawn,
    closed and drawn again comes back the same."""

    held: set = set()

    def __init__(self, *args):
        self.port = None

    def bind(self, address):
        self.port = min(set(range(40000, 40100)) - self.held)
        self.held.add(self.port)

    def getsockname(self):
        return ("127.0.0.1", self.port)

    def close(self):
        self.held.discard(self.port)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_started_nodes_get_distinct_ports(monkeypatch, tmp_path):
    """Every port ``start_nodes`` gives the nodes differs from the others, on a kernel that hands a just-closed port
    out again (two components on one port: Ray refused to start the head, "dashboard_agent_http is trying to use a
    port number 34555 that is used by other components", seen in the suite)."""
    import re
    import subprocess

    commands = []

    class Recorded:
        def __init__(self, cmd, **kwargs):
            commands.append(cmd)
            self.pid = 1 << 22

    monkeypatch.setattr(nodes.socket, "socket", _KernelSocket)
    monkeypatch.setattr(subprocess, "Popen", Recorded)
    monkeypatch.setattr(nodes, "_wait_started", lambda *a: None)
    monkeypatch.setattr(nodes.tempfile, "mkdtemp", lambda prefix: str(tmp_path))
    started = nodes.start_nodes(plan(SEEDS_BOX, archs=CU126), object_store_mb=100)
    assert len(commands) == 2 and started.gcs_address.startswith("127.0.0.1:")
    ports = [int(p) for cmd in commands for a in cmd for p in re.findall(r"^--[a-z-]*port=(\d+)$", a)]
    assert len(ports) == 5 and len(set(ports)) == 5, ports  # gcs, dashboard, client server, one agent a node
    assert len(set(nodes.free_ports(20))) == 20


@pytest.mark.parametrize("argv,expected", [
    (["start", "--labels=ray.io/accelerator-type=GeForce-RTX-3090"], R),
    (["start", "--labels", "zone=a,ray.io/accelerator-type=T4"], "T4"),
    (["start", "--num-gpus=0"], None),
])
def test_the_node_wrapper_reads_its_type_from_the_label(argv, expected):
    assert nodes.planned_type(argv) == expected


def test_fer_ray_nodes_prints_the_plan(monkeypatch, capsys):
    from fer_ray.cli import main

    monkeypatch.setenv(FAKE_GPUS_ENV, json.dumps(SEEDS_BOX))
    monkeypatch.setenv(FAKE_ARCHS_ENV, ",".join(CUDA13))
    assert main(["nodes", "--num-cpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "GPU 1: NVIDIA GeForce GTX 1080 Ti (GeForce-GTX-1080-Ti, compute capability 6.1, 11 GB), left out" in out
    assert "GPU 1 (NVIDIA GeForce GTX 1080 Ti, compute capability 6.1) left out: torch" in out
    assert "head   GPUs 0,2 (GeForce-RTX-3090), 8 CPUs" in out and "CUDA_VISIBLE_DEVICES=0,2" in out


@pytest.mark.ray
def test_a_mixed_box_gets_one_ray_node_per_gpu_type(no_session_ray, monkeypatch):
    """``init_ray`` on the fake seeds' box (1080 Ti usable: sm_61 in the kernel list) starts a head with the two
    3090s and a worker with the 1080 Ti: both types' resources and labels, tasks of each type see their own
    CUDA_VISIBLE_DEVICES; ``stop_local_nodes`` leaves none of their processes."""
    import ray

    from fer_ray import cluster
    from fer_ray.placement import cluster_gpus

    monkeypatch.setenv(FAKE_GPUS_ENV, json.dumps(SEEDS_BOX))
    monkeypatch.setenv(FAKE_ARCHS_ENV, ",".join(CU126))
    monkeypatch.setenv("RAY_AUTH_MODE", os.environ.get("RAY_AUTH_MODE", "token"))  # restored afterwards
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(cluster, "STARTED_LOCAL_RAY", cluster.STARTED_LOCAL_RAY)
    cluster.init_ray(num_cpus=2)
    started = cluster.LOCAL_NODES
    pids = list(started.pids) if started else []
    try:
        assert len(pids) == 2, "a head and one worker node"
        deadline = time.monotonic() + 60  # the resource view catches up with a new node in a second or two
        while cluster_gpus() != {R: (2, 2), G: (1, 1)} and time.monotonic() < deadline:
            time.sleep(0.2)
        assert cluster_gpus() == {R: (2, 2), G: (1, 1)}
        res = ray.cluster_resources()
        assert (res["GPU"], res["CPU"], res[f"accelerator_type:{R}"], res[f"accelerator_type:{G}"]) == (3, 2, 1, 1)
        labels = sorted(n["Labels"].get("ray.io/accelerator-type") for n in ray.nodes() if n["Alive"])
        assert labels == sorted([R, G])

        @ray.remote(num_cpus=0)
        def sees() -> tuple[str, str]:
            return os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("CUDA_DEVICE_ORDER")

        on = {t: sees.options(num_gpus=n, resources={f"accelerator_type:{t}": 0.001}) for t, n in ((R, 2), (G, 1))}
        seen = ray.get([on[R].remote(), on[G].remote()], timeout=120)
        assert [(sorted(ids.split(",")), order) for ids, order in seen] == [(["0", "2"], "PCI_BUS_ID"),
                                                                            (["1"], "PCI_BUS_ID")]
    finally:
        cluster.stop_local_nodes()
    assert cluster.LOCAL_NODES is None and not ray.is_initialized()
    assert not any(nodes.session_pids(pid) for pid in pids), "no process of their sessions is left"
    assert started is None or not os.path.exists(started.temp_dir)
