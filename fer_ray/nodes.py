"""The local Ray of one box with several GPU types: the node plan, and the ``ray start`` processes that carry it out.

Ray names a node after one GPU (NVML's device 0, whatever ``CUDA_VISIBLE_DEVICES`` says), so a box with an RTX 3090
and a GTX 1080 Ti started as one node is all ``GeForce-RTX-3090`` to placement rules, batch caps and fractional
packing. ``plan_nodes`` (pure) gives each GPU type a node of its own: the head carries the type of the
lowest-indexed usable GPU, one worker node each other type; every node gets ``CUDA_VISIBLE_DEVICES`` for its GPUs
(with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, so the indices are NVML's, as ``fer_ray.gpu.inventory`` reads them),
``--num-gpus``, an ``accelerator_type:<X>`` resource, the ``ray.io/accelerator-type`` label, and a share of the CPUs
in proportion to its GPUs. A GPU the installed torch cannot drive is left out with one line naming it and the fix.
A box whose GPUs are all usable and of one type needs none of this (``NodePlan.in_process``: a plain local
``ray.init`` sees it right).

``start_nodes`` starts the plan on 127.0.0.1 with ports and a temp folder of its own, each node a ``ray start
--block`` process leading its own session, run as ``python -m fer_ray.nodes start ...``: Ray's own CLI with the
node's detected accelerator type fixed to its ``ray.io/accelerator-type`` label (else Ray would add a resource named
after NVML's device 0 to every node). ``LocalNodes.stop`` ends exactly those sessions, by id. ``ray_start_lines``
writes the same commands for a long-lived ``ray start`` cluster (``cluster-onprem.yaml``'s head); ``fer-ray nodes``
prints the plan and them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fer_ray.gpu import GPUInfo

TYPE_LABEL = "ray.io/accelerator-type"
"""Ray's node label for its accelerator type (``ray._raylet.RAY_NODE_ACCELERATOR_TYPE_KEY``)."""
RESOURCE_PREFIX = "accelerator_type:"
AGENT_PORT = 52365
"""Ray's default dashboard-agent port: on one host every node needs its own (``ray_start_lines`` counts up)."""


@dataclasses.dataclass(frozen=True)
class NodeSpec:
    """One Ray node of the plan."""

    head: bool
    accelerator_type: str | None
    gpus: tuple[int, ...]
    """GPU indices (NVML / PCI bus order): its ``CUDA_VISIBLE_DEVICES``."""
    num_cpus: int

    def env(self) -> dict[str, str]:
        """The variables the node's ``ray start`` runs with (the GPUs it sees)."""
        return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(map(str, self.gpus))}

    def resource_args(self) -> list[str]:
        """``--num-cpus``, ``--num-gpus`` and, on a GPU node, its type's resource and label."""
        args = [f"--num-cpus={self.num_cpus}", f"--num-gpus={len(self.gpus)}"]
        if self.accelerator_type:
            args += [f"--resources={json.dumps({RESOURCE_PREFIX + self.accelerator_type: 1})}",
                     f"--labels={TYPE_LABEL}={self.accelerator_type}"]
        return args

    def describe(self) -> str:
        gpus = f"GPUs {','.join(map(str, self.gpus))} ({self.accelerator_type})" if self.gpus else "no GPU"
        return f"{'head' if self.head else 'worker':6s} {gpus}, {self.num_cpus} CPUs"


@dataclasses.dataclass(frozen=True)
class NodePlan:
    """The Ray nodes a local fer_ray run starts on this box, and the GPUs it leaves out."""

    nodes: tuple[NodeSpec, ...]
    left_out: tuple[str, ...] = ()
    """One line per GPU left out: which, why, and the fix."""
    gpus_seen: int = 0
    """How many GPUs the inventory listed."""

    @property
    def in_process(self) -> bool:
        """True when one plain local Ray sees the box right: one node with every GPU (of one type), or none usable."""
        return len(self.nodes) == 1 and (len(self.nodes[0].gpus) == self.gpus_seen or not self.nodes[0].gpus)

    @property
    def num_gpus(self) -> int | None:
        """``num_gpus`` for an in-process Ray: ``None`` (Ray detects them) unless GPUs are left out (then 0)."""
        return 0 if self.left_out else None


def split_cpus(total: int, weights: list[int]) -> list[int]:
    """``total`` CPUs in proportion to ``weights`` (largest remainders; the first, the head, gets ties), at least one
    each while there are enough."""
    n = len(weights)
    if total >= n:
        base = [1] * n
        spare, weights_sum = total - n, sum(weights) or n
        shares = [spare * (w or 1) / weights_sum for w in weights]
    else:
        base, spare, shares = [0] * n, total, [total / n] * n
    out = [b + int(s) for b, s in zip(base, shares, strict=True)]
    order = sorted(range(n), key=lambda i: (-(shares[i] - int(shares[i])), i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


def plan_nodes(gpus: list[GPUInfo], num_cpus: int) -> NodePlan:
    """One node per usable GPU type (the head takes the type of the lowest-indexed usable GPU), CPUs split in
    proportion to GPUs; GPUs the installed torch cannot drive are left out, one line each."""
    left_out = tuple(g.left_out_line() for g in gpus if not g.supported)
    groups: dict[str, list[int]] = {}
    for g in sorted((g for g in gpus if g.supported), key=lambda g: g.index):
        groups.setdefault(g.accelerator_type, []).append(g.index)
    if not groups:
        return NodePlan((NodeSpec(True, None, (), num_cpus),), left_out, len(gpus))
    cpus = split_cpus(num_cpus, [len(v) for v in groups.values()])
    nodes = tuple(NodeSpec(i == 0, name, tuple(idx), c) for i, ((name, idx), c) in enumerate(zip(groups.items(), cpus,
                                                                                                  strict=True)))
    return NodePlan(nodes, left_out, len(gpus))


def ray_start_lines(plan: NodePlan, host: str = "127.0.0.1", port: int = 6379, python: str = "python") -> list[str]:
    """Shell lines that start ``plan`` as a long-lived cluster (``ray start`` without ``--block``): the head with
    its GCS on ``host:port`` and the dashboard on 127.0.0.1, each worker joining it."""
    lines = []
    for i, node in enumerate(plan.nodes):
        role = ["--head", f"--port={port}", "--dashboard-host=127.0.0.1"] if node.head else [f"--address={host}:{port}"]
        args = [python, "-m", "fer_ray.nodes", "start", *role, f"--node-ip-address={host}", *node.resource_args(),
                f"--dashboard-agent-listen-port={AGENT_PORT + i}"]
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in node.env().items())
        lines.append(f"{env} {shlex.join(args)}")
    return lines


def format_plan(plan: NodePlan, host: str = "127.0.0.1", port: int = 6379, python: str = "python") -> str:
    """What ``fer-ray nodes`` prints: the GPUs left out, the nodes, and their ``ray start`` lines."""
    out = list(plan.left_out)
    out += [f"{len(plan.nodes)} Ray node(s) for {plan.gpus_seen} GPU(s):", *(f"  {n.describe()}" for n in plan.nodes)]
    if plan.in_process:
        out.append("a local fer-ray run starts one plain Ray for this box (no per-type nodes needed)")
    out += ["as a `ray start` cluster (cluster-onprem.yaml's head_start_ray_commands):",
            *ray_start_lines(plan, host, port, python)]
    return "\n".join(out)


# -- starting and ending the plan's processes ----------------------------------------------------------------------
def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now. Drawn with all ``n`` sockets bound at once: one port
    drawn, released and drawn again can come back the same (the kernel hands out a just-closed port again), and
    two Ray components given one port refuse to start ("... is trying to use a port number ... that is used by
    other components")."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (``free_ports`` for several that must differ)."""
    return free_ports(1)[0]


def session_pids(sid: int) -> list[int]:
    """Live processes in session ``sid`` (Linux ``/proc``; zombies, dead but not yet reaped, are not counted)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getsid(int(d.name)) == sid and (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    out.append(int(d.name))
            except (OSError, IndexError):
                continue
    return out


def end_session(sid: int, grace_s: float = 20.0) -> None:
    """End every process of the session ``sid`` (one this process started): SIGTERM to its process group, then
    SIGKILL to whatever of the session is left after ``grace_s`` (never a kill by name, never ``ray stop``)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(sid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in session_pids(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.2)


@dataclasses.dataclass
class LocalNodes:
    """The running nodes of a plan: the head's GCS address, the temp folder, each node's ``ray start --block``
    process (the leader of a session holding all of that node's processes) and its log."""

    gcs_address: str
    temp_dir: str
    pids: list[int] = dataclasses.field(default_factory=list)
    logs: list[Path] = dataclasses.field(default_factory=list)

    def stop(self, grace_s: float = 5.0) -> None:
        """End the nodes' sessions, workers first, and remove the temp folder. ``grace_s``: how long SIGTERM has
        before SIGKILL (short: a head's ``ray start --block`` waits on its GCS for long after SIGTERM, and nothing of
        a run lives only on these nodes)."""
        for pid in reversed(self.pids):
            end_session(pid, grace_s)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # reap it (it is ours) if nothing else has
        self.pids.clear()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _started(log: Path) -> bool:
    return log.exists() and "Ray runtime started" in log.read_text(errors="replace")


def start_nodes(plan: NodePlan, object_store_mb: int | None = None, timeout_s: float = 180.0) -> LocalNodes:
    """Start ``plan``'s nodes on 127.0.0.1 (free ports, a temp folder of their own, token authentication) and return
    them once each has said it started; on failure, end what was started and raise with the node's log tail.
    ``object_store_mb``: per node (default: Ray's default for the box, split between the nodes)."""
    if object_store_mb is None:
        import psutil

        object_store_mb = max(100, int(psutil.virtual_memory().total * 0.3 / 2**20 / len(plan.nodes)))
    tmp = tempfile.mkdtemp(prefix="fer_ray_nodes_")  # short: Ray's socket paths live under it
    gcs, dash, client, *agents = free_ports(3 + len(plan.nodes))
    nodes = LocalNodes(f"127.0.0.1:{gcs}", tmp)
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "token"}
    procs: list[subprocess.Popen] = []
    try:
        for i, node in enumerate(plan.nodes):
            role = ["--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                    f"--ray-client-server-port={client}"] if node.head else [f"--address={nodes.gcs_address}"]
            cmd = [sys.executable, "-m", "fer_ray.nodes", "start", "--block", *role, "--node-ip-address=127.0.0.1",
                   *node.resource_args(), f"--dashboard-agent-listen-port={agents[i]}", f"--temp-dir={tmp}",
                   f"--object-store-memory={object_store_mb * 2**20}", "--disable-usage-stats"]
            log = Path(tmp, f"node{i}.log")
            with open(log, "wb") as f:  # the child keeps its own descriptor
                procs.append(subprocess.Popen(cmd, env=base | node.env(), stdout=f, stderr=subprocess.STDOUT,
                                              start_new_session=True))
            nodes.pids.append(procs[-1].pid)
            nodes.logs.append(log)
            # One node at a time: nodes joining at once on a loaded host have missed Ray's own 30-s join deadline.
            _wait_started(procs[-1], log, timeout_s)
    except BaseException:
        nodes.stop()
        raise
    return nodes


def _wait_started(proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s  # a liveness guard: a node starts in seconds
    while not _started(log):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"a local Ray node did not start ({log.name}):\n{tail}")
        time.sleep(0.3)


# -- `python -m fer_ray.nodes start ...`: Ray's CLI with the node's accelerator type fixed --------------------------
def planned_type(argv: list[str]) -> str | None:
    """The ``ray.io/accelerator-type`` value of a ``ray start`` command line's ``--labels``, if any."""
    for i, a in enumerate(argv):
        value = a.split("=", 1)[1] if a.startswith("--labels=") else argv[i + 1] if a == "--labels" and \
            i + 1 < len(argv) else None
        for pair in (value or "").split(","):
            key, _, val = pair.partition("=")
            if key.strip() == TYPE_LABEL:
                return val.strip()
    return None


def fix_accelerator_type(name: str | None) -> None:
    """Make Ray's NVIDIA accelerator manager report ``name`` as this node's type (``None``: no type) instead of
    NVML's device 0's, which it reads whatever ``CUDA_VISIBLE_DEVICES`` says (tests/test_ray_internals.py)."""
    from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager

    NvidiaGPUAcceleratorManager.get_current_node_accelerator_type = staticmethod(lambda: name)


def main(argv: list[str] | None = None) -> None:
    """``ray <argv>`` (Ray's own CLI), the node's accelerator type taken from its ``--labels``."""
    argv = sys.argv[1:] if argv is None else argv
    fix_accelerator_type(planned_type(argv))
    from ray.scripts.scripts import main as ray_main

    sys.argv = ["ray", *argv]
    ray_main()


if __name__ == "__main__":
    main()
