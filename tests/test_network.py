"""What a fer_ray-started local Ray exposes on the network, measured: the listening sockets of this session's Ray
processes (read from /proc, so no tool is needed). Ray 2.60 binds its dashboard/job server where told (fer_ray
tells it 127.0.0.1) but has no setting to keep the GCS, raylet, object manager, workers and dashboard agent off the
other interfaces; there, token authentication is on and a client without the cluster's token is refused (checked
with a real connection attempt). docs/cluster.md ("What listens where") lists the same."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray


def _listening_inodes() -> dict[str, tuple[str, int]]:
    """Socket inode → (local address, port) of every listening TCP socket on the machine."""
    out = {}
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            addr_hex, port_hex = fields[1].split(":")
            raw = bytes.fromhex(addr_hex)
            if width == 8:
                ip = ".".join(str(b) for b in raw[::-1])
            else:  # four little-endian 32-bit words
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                ip = "::" if not any(words) else ("::1" if words == bytes(15) + b"\1" else words.hex())
            out[fields[9]] = (ip, int(port_hex, 16))
    return out


def _descendants(root: int) -> set[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
            parents[int(pid)] = int(rest.rsplit(") ", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = {root}, [root]
    while frontier:
        kids = [p for p, pp in parents.items() if pp in frontier and p not in found]
        found.update(kids)
        frontier = kids
    return found


def _listeners(pids: set[int]) -> list[tuple[str, int, str]]:
    inodes, rows = _listening_inodes(), []
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                rows.append((*inodes[target[8:-1]], name))
    return sorted(set(rows))


def test_what_a_fer_ray_started_ray_listens_on(ray_session):
    import ray
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    listeners = _listeners(_descendants(os.getpid()))
    # The port this Ray's dashboard got (8265 unless another Ray on the host holds it, as under pytest-xdist).
    dashboard = int(ray._private.worker._global_node.webui_url.rsplit(":", 1)[1])
    assert [ip for ip, port, _ in listeners if port == dashboard] == ["127.0.0.1"], listeners
    loopback = {"127.0.0.1", "::1"}
    exposed = [row for row in listeners if row[0] not in loopback]
    assert exposed, "Ray 2.60 binds its gRPC servers on every interface; if this fails, Ray can now do better: " \
                    "bind them to 127.0.0.1 in fer_ray.cluster.init_ray and update docs/cluster.md"
    assert {name for *_, name in exposed} <= {"gcs_server", "raylet", "python"} | {
        n for *_, n in exposed if n.startswith("ray::")}, exposed
    assert is_token_auth_enabled(), "non-loopback listeners without token authentication"


@pytest.mark.subprocess
def test_a_client_without_the_token_is_refused(ray_session, tmp_path):
    import ray

    gcs = ray.get_runtime_context().gcs_address
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {
        "HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled",  # no token anywhere
        "RAY_NUM_REDIS_GET_RETRIES": "3"}  # Ray asks the GCS once a second, 20 times by default: 4 s, not 20
    out = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address={gcs!r}); print('CONNECTED')"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "CONNECTED" not in out.stdout
    assert "InvalidAuthToken" in out.stderr, out.stderr[-1500:]
