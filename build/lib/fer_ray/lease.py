"""The driver lease: one fer_ray command writes an experiment at a time.

A command that writes an experiment (``fer-ray sweep``/``demo``/``train``, ``tta``, ``ensemble``, ``evaluate``,
``distill``) holds ``Lease`` on the experiment's root (``.fer_ray.lease``, a small JSON file written through
``fer_ray.storage``: a local folder, NFS or a bucket) from before its first write until it ends. The file names
its holder: a random token, host, pid (and the pid's start time on Linux, so a recycled pid is not mistaken for
the holder), the command, when it was taken and its last heartbeat. A daemon thread of the holder rewrites the
heartbeat every ``ttl_s / 4`` seconds.

A second writer is refused with one line (``LeaseHeld``, a ``ConfigError``: the CLI prints it and exits 2) that
names the experiment and the holder, unless the lease is stale:

- on the same host, at once when the holder's pid is not running (or is another process with a recycled pid);
- from anywhere, when its heartbeat is older than the holder's TTL (``FER_RAY_LEASE_TTL_S``, default 60 s; the
  holder records its own TTL in the file, so a taker judges it by the holder's cadence). Hosts' clocks must agree
  to well within the TTL (NTP does).

A stale lease is taken over with one log line naming the old holder; ``--resume`` after a killed driver therefore
starts at once on the same host, and after at most one TTL from another host. Every write replaces the whole
file atomically, and a taker reads the file back after writing it, so of two takers racing within one round trip
one is refused; no object store reached through pyarrow offers a compare-and-swap, so the lease guards against a
second command started by mistake, not against an adversary. A holder whose lease was taken over (it stalled
beyond its TTL) logs that once and stops renewing; it never deletes another holder's lease.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from fer_ray.config import ConfigError
from fer_ray.storage import Storage

log = logging.getLogger(__name__)

LEASE = ".fer_ray.lease"
"""The lease file, in the experiment's root."""
TTL_ENV = "FER_RAY_LEASE_TTL_S"
DEFAULT_TTL_S = 60.0


class LeaseHeld(ConfigError):
    """Another live fer_ray command holds the experiment's lease (one line naming the experiment and the holder)."""


def ttl_from_env() -> float:
    """The lease TTL in seconds: ``$FER_RAY_LEASE_TTL_S`` or ``DEFAULT_TTL_S``; a bad value is one ``ConfigError``."""
    raw = os.environ.get(TTL_ENV, "").strip()
    if not raw:
        return DEFAULT_TTL_S
    try:
        ttl = float(raw)
    except ValueError:
        ttl = float("nan")
    if not ttl > 0 or ttl == float("inf"):
        raise ConfigError(f"{TTL_ENV}: expected a number of seconds > 0, got {raw!r}")
    return ttl


def pid_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), ``None`` where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int, start: str | None = None) -> bool:
    """Whether process ``pid`` runs on this host (and, given ``start``, is the process that started then)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    return start is None or pid_start(pid) in (None, start)


@dataclass(frozen=True)
class Holder:
    """What the lease file says about its holder (times are seconds since the epoch)."""

    token: str
    host: str
    pid: int
    command: str
    since: float
    heartbeat: float
    ttl_s: float
    pid_start: str | None = None

    def describe(self, now: float) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        return (f"{self.command or 'a fer_ray command'} on host {self.host} pid {self.pid} since {since} (last "
                f"heartbeat {max(now - self.heartbeat, 0.0):.0f}s ago, TTL {self.ttl_s:g}s)")


class Lease:
    """The lease on ``storage`` (an experiment root) for ``command``; a context manager (acquire, then release).

    ``clock``, ``host``, ``pid`` and ``alive`` are injectable for tests; ``ttl_s`` defaults to ``ttl_from_env()``.
    """

    def __init__(self, storage: Storage, command: str = "", ttl_s: float | None = None, *,
                 clock: Callable[[], float] = time.time, host: str | None = None, pid: int | None = None,
                 alive: Callable[[int, str | None], bool] = pid_alive):
        self.storage, self.command = storage, command
        self.ttl_s = ttl_from_env() if ttl_s is None else ttl_s
        self.clock, self.alive = clock, alive
        self.host = host or socket.gethostname()
        self.pid = os.getpid() if pid is None else pid
        self.token = secrets.token_hex(8)
        self.since: float | None = None
        self.lost: Holder | None = None
        """Set when another command took this lease over while it was held."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._outage = False
        self._made_root = False

    @property
    def where(self) -> str:
        return self.storage.uri_of(LEASE)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- reading -------------------------------------------------------------------------------------------
    def holder(self) -> Holder | None:
        """The current holder, or ``None`` when there is no lease (an unreadable file counts as none)."""
        if not self.storage.is_file(LEASE):
            return None
        try:
            return Holder(**json.loads(self.storage.read_text(LEASE)))
        except (ValueError, TypeError) as e:
            log.warning("%s: unreadable lease file (%s); treating the experiment as free", self.where, e)
            return None

    def stale_reason(self, holder: Holder, now: float) -> str | None:
        """Why ``holder``'s lease no longer binds (``None`` while it does)."""
        if holder.host == self.host and not self.alive(holder.pid, holder.pid_start):
            return f"pid {holder.pid} is not running on this host"
        if now - holder.heartbeat > holder.ttl_s:
            return f"no heartbeat for {now - holder.heartbeat:.0f}s, over its TTL of {holder.ttl_s:g}s"
        return None

    def check(self) -> Holder | None:
        """Raise ``LeaseHeld`` when another live command holds the lease; return a stale holder (or ``None``)."""
        holder = self.holder()
        if holder is None or holder.token == self.token:
            return None
        now = self.clock()
        if self.stale_reason(holder, now) is None:
            raise LeaseHeld(f"{self.storage.uri}: another fer_ray command is writing this experiment: "
                            f"{holder.describe(now)}; wait for it to end or stop it (a dead driver's lease "
                            f"lapses at once on its host, else {holder.ttl_s:g}s after its last heartbeat)")
        return holder

    # -- holding -------------------------------------------------------------------------------------------
    def acquire(self, heartbeat: bool = True) -> None:
        """Take the lease (refused with ``LeaseHeld``; a stale one is taken over with one log line); with
        ``heartbeat``, start the thread that renews it."""
        stale = self.check()
        if stale is not None:
            now = self.clock()
            log.warning("%s: taking over the stale lease of %s: %s", self.storage.uri, stale.describe(now),
                        self.stale_reason(stale, now))
        self._made_root = self.storage.is_local and not self.storage.exists()
        self.since = self.clock()
        self._write(self.since)
        now_held = self.holder()
        if now_held is None or now_held.token != self.token:  # another taker wrote after us
            self.since = None
            self.check()
            raise LeaseHeld(f"{self.storage.uri}: another fer_ray command took the lease at the same moment")
        if heartbeat:
            self._thread = threading.Thread(target=self._beat, name="fer_ray-lease", daemon=True)
            self._thread.start()

    def _write(self, heartbeat: float) -> None:
        holder = Holder(self.token, self.host, self.pid, self.command, self.since, heartbeat, self.ttl_s,
                        pid_start(self.pid) if self.pid == os.getpid() else None)
        self.storage.write_json(LEASE, asdict(holder))

    def renew(self) -> bool:
        """Rewrite the heartbeat; False (and ``lost`` set, one log line) when another command holds the lease now."""
        if self.since is None or self.lost is not None:
            return False
        holder = self.holder()
        if holder is not None and holder.token != self.token:
            self.lost = holder
            log.error("%s: this command's lease was taken over by %s (this one stalled past its TTL?); two commands "
                      "may now write the experiment", self.storage.uri, holder.describe(self.clock()))
            return False
        self._write(self.clock())
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                if not self.renew():
                    return
                if self._outage:
                    log.warning("%s: lease heartbeat written again", self.where)
                self._outage = False
            except OSError as e:  # a storage outage: one line per outage, keep trying
                if not self._outage:
                    log.warning("%s: could not renew the lease (%s); retrying every %.0fs", self.where, e,
                                self.ttl_s / 4)
                self._outage = True

    def release(self) -> None:
        """Stop renewing and delete the lease file if this command still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(self.ttl_s, 10.0))
            self._thread = None
        if self.since is None:
            return
        self.since = None
        with contextlib.suppress(OSError):
            holder = self.holder()
            if holder is not None and holder.token == self.token:
                self.storage.delete(LEASE)
            if self._made_root and self.storage.is_empty():  # a command that stopped before writing leaves no folder
                os.rmdir(self.storage.root)
