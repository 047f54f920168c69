"""The driver lease (``fer_ray.lease``) on a local folder and in moto's S3 bucket, with an injected clock: take,
refuse, renew, stale takeover, a dead pid; the CLI refuses a second writer with one line and writes nothing."""

import logging
import os
import subprocess
import sys
import time

import pytest

from fer_ray.cli import main
from fer_ray.config import ConfigError
from fer_ray.lease import LEASE, TTL_ENV, Lease, LeaseHeld, pid_alive, pid_start, ttl_from_env
from fer_ray.storage import Storage, join_uri


class Clock:
    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> Storage:
    if request.param == "local":
        return Storage(tmp_path / "exp")
    return Storage(join_uri(request.getfixturevalue("s3_server"), f"lease_{tmp_path.name}"))


def _lease(root: Storage, clock: Clock, **kw) -> Lease:
    return Lease(root, command=kw.pop("command", "fer-ray sweep"), ttl_s=60, clock=clock, **kw)


def test_take_refuse_renew_release(root):
    clock = Clock()
    first = _lease(root, clock, host="node-a")
    first.acquire(heartbeat=False)
    holder = first.holder()
    assert (holder.host, holder.command, holder.heartbeat) == ("node-a", "fer-ray sweep", clock.t)
    second = _lease(root, clock, host="node-a", command="fer-ray tta")
    with pytest.raises(LeaseHeld) as e:
        second.acquire(heartbeat=False)
    line = str(e.value)
    assert "\n" not in line and root.uri in line and "node-a" in line and f"pid {first.pid}" in line
    assert "since 2027-01-15 08:00:00 UTC" in line and "fer-ray sweep" in line
    clock.t += 50
    assert first.renew() and first.holder().heartbeat == clock.t
    clock.t += 50  # 100 s after the start, 50 s after the last heartbeat: still held
    with pytest.raises(LeaseHeld):
        second.acquire(heartbeat=False)
    first.release()
    assert not root.is_file(LEASE)
    second.acquire(heartbeat=False)  # free again
    assert second.holder().command == "fer-ray tta"
    second.release()


def test_stale_heartbeat_is_taken_over_once(root, caplog):
    clock = Clock()
    first = _lease(root, clock, host="node-a")
    first.acquire(heartbeat=False)
    clock.t += 61  # past the TTL: the holder stopped renewing (its node died)
    other = _lease(root, clock, host="node-b")
    with caplog.at_level(logging.WARNING, logger="fer_ray.lease"):
        other.acquire(heartbeat=False)
    takeover = [r.getMessage() for r in caplog.records if "taking over" in r.getMessage()]
    assert len(takeover) == 1 and "node-a" in takeover[0] and "no heartbeat for 61s" in takeover[0]
    assert other.holder().host == "node-b"
    # The old holder wakes up: it sees the takeover, stops renewing, and leaves the new holder's lease alone.
    assert not first.renew() and first.lost.host == "node-b"
    first.release()
    assert other.holder().token == other.token
    other.release()


def test_dead_pid_on_the_same_host_is_stale_at_once(root):
    clock = Clock()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    assert not pid_alive(dead_pid)
    first = _lease(root, clock, host="node-a", pid=dead_pid)
    first.acquire(heartbeat=False)  # its heartbeat is fresh, but its pid is gone
    elsewhere = _lease(root, clock, host="node-b")
    with pytest.raises(LeaseHeld):  # another host cannot see the pid: only the TTL frees it there
        elsewhere.acquire(heartbeat=False)
    same_host = _lease(root, clock, host="node-a")
    same_host.acquire(heartbeat=False)
    assert same_host.holder().pid == same_host.pid
    same_host.release()


def test_recycled_pid_is_not_the_holder():
    me = pid_start(os.getpid())
    assert me is not None and pid_alive(os.getpid(), me)
    assert not pid_alive(os.getpid(), str(int(me) + 1))  # same pid, another start time


def test_heartbeat_thread_renews(tmp_path):
    clock = Clock()
    lease = Lease(Storage(tmp_path / "exp"), ttl_s=0.2, clock=clock)
    with lease:
        clock.t += 1000
        deadline = time.monotonic() + 20  # liveness guard: renewals come every 0.05 s
        while lease.holder().heartbeat != clock.t:
            assert time.monotonic() < deadline, "the heartbeat thread never renewed"
            time.sleep(0.02)
    assert not (tmp_path / "exp").exists(), "a lease on a new folder leaves nothing behind"


def test_ttl_from_env(monkeypatch):
    monkeypatch.setenv(TTL_ENV, "15")
    assert ttl_from_env() == 15
    monkeypatch.setenv(TTL_ENV, "soon")
    with pytest.raises(ConfigError, match=TTL_ENV):
        ttl_from_env()


def _snapshot(folder) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def test_cli_refuses_a_second_writer_with_one_line(tmp_path, capsys):
    exp = tmp_path / "smoke"
    holder = Lease(Storage(exp), command="fer-ray sweep")
    holder.acquire(heartbeat=False)
    before = _snapshot(tmp_path)
    for argv in (["sweep", "smoke.yaml", "--out", str(tmp_path)],
                 ["sweep", "smoke.yaml", "--out", str(tmp_path), "--overwrite"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(exp) in err and f"pid {holder.pid}" in err, err
    assert _snapshot(tmp_path) == before, "a refused sweep wrote nothing"
    (exp / "sweep.yaml").write_text("name: smoke\n")  # an experiment to resume or score
    before = _snapshot(tmp_path)
    for argv in (["sweep", "--resume", str(exp)], ["tta", str(exp)], ["ensemble", str(exp)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "another fer_ray command is writing" in err, err
    assert _snapshot(tmp_path) == before, "a refused command wrote nothing"
    holder.release()
