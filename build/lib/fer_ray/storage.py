"""Storage by URI: one folder on any filesystem pyarrow reaches, read and written whole-file and atomically.

A location is a local path, ``file:///abs/path``, ``s3://bucket/prefix`` (S3-compatible stores take
``?region=us-east-1&endpoint_override=host:port&scheme=http``), ``gs://bucket/prefix``, ``hdfs://...``: anything
``pyarrow.fs.FileSystem.from_uri`` accepts, which is also what Ray Tune and Ray Train accept as ``storage_path``.
``join_uri`` appends path parts *before* the query string, so a child keeps the endpoint settings.

Writes never leave half a file: a local file goes to a temp file beside it, then ``os.replace``; on an object
store the payload is built in memory first and uploaded in one request (an object becomes visible only when its
upload completes). Credentials come from the environment (``AWS_*``, ``GOOGLE_APPLICATION_CREDENTIALS``) or the
machine's role; ``fer_ray.cluster.init_ray`` forwards the ``AWS_*`` variables to Ray's workers.

A bucket outage is waited out: every read and write of a remote ``Storage`` (and ``Storage.call`` around any other
pyarrow call on its filesystem) that fails because the store cannot be reached (an ``OSError`` such as "Could not
connect to server", "Connection refused", a curl or timeout error: ``unreachable``) is retried with exponential
backoff (0.5 s doubling to 8 s) for up to ``FER_RAY_STORAGE_RETRY_S`` seconds (default 120), on top of pyarrow's
own retries (~6 s per call). One warning line per outage and process (``bucket s3://b (endpoint ...) unreachable,
retrying for up to 120 s``) and one when it answers again; past the limit, ``StorageUnavailable`` (a
``StorageError``: the CLI prints it as one line naming the bucket). Every retried operation is a whole-object
get, put, list or delete, so a retry is safe: a put is uploaded again from the same bytes, and a put cut off
mid-upload leaves no object (S3 shows an object only once its upload completes). Local paths are not retried.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pyarrow.fs as pafs

from fer_ray.atomic import atomic_write_bytes

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_ENV = "FER_RAY_STORAGE_RETRY_S"
DEFAULT_RETRY_S = 120.0
_UNREACHABLE = re.compile(r"could ?n[o']t connect|connection (refused|reset|aborted|closed)|curl ?(error|code)|"
                          r"NETWORK_CONNECTION|timed? ?out|broken pipe|unreachable|empty reply|"
                          r"recv failure|send failure|failed to connect", re.IGNORECASE)


def is_uri(location: str | Path) -> bool:
    """True for ``scheme://...`` locations, False for plain local paths."""
    return "://" in str(location)


def split_uri(uri: str) -> tuple[str, str]:
    """``(location without query, "?query" or "")``."""
    base, sep, query = str(uri).partition("?")
    return base, sep + query


def join_uri(location: str | Path, *parts: str) -> str:
    """``location``/``parts``, inserted before any ``?query`` (which carries an S3 endpoint, region...)."""
    base, query = split_uri(str(location))
    parts = [p.strip("/") for p in parts if p and p.strip("/")]
    if not parts:
        return base + query
    return "/".join([base.rstrip("/") or "/", *parts]) + query


def normalize(location: str | Path) -> str:
    """A local path made absolute (every process then means the same folder); URIs unchanged."""
    return str(location) if is_uri(location) else str(Path(location).expanduser().absolute())


def resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a location (see the module docstring)."""
    location = normalize(location)
    if not is_uri(location):
        return pafs.LocalFileSystem(), location
    try:
        fs, path = pafs.FileSystem.from_uri(location)
    except (ValueError, OSError) as e:
        raise StorageError(f"{location}: not a storage location pyarrow can open ({e})") from None
    return fs, path.rstrip("/")


class StorageError(OSError):
    """A location that cannot be opened, or a file that is missing where it must exist."""


class StorageUnavailable(StorageError):
    """The store could not be reached for longer than the retry limit (one line naming the bucket)."""


def unreachable(e: BaseException) -> bool:
    """True for the errors of a store that cannot be reached right now (worth retrying); False for a missing file,
    a denied request or any other answer the store gave."""
    return (isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, PermissionError, StorageError))
            and bool(_UNREACHABLE.search(str(e))))


def retry_limit_s() -> float:
    """``$FER_RAY_STORAGE_RETRY_S`` or ``DEFAULT_RETRY_S``; 0 turns the retries off; a bad value is one
    ``ConfigError``."""
    raw = os.environ.get(RETRY_ENV, "").strip()
    if not raw:
        return DEFAULT_RETRY_S
    try:
        limit = float(raw)
    except ValueError:
        limit = float("nan")
    if not 0 <= limit < float("inf"):
        from fer_ray.config import ConfigError

        raise ConfigError(f"{RETRY_ENV}: expected a number of seconds >= 0, got {raw!r}")
    return limit


_OUTAGES: dict[str, float] = {}
"""Bucket → when this process first saw it unreachable (the outage it logged); shared by every ``Storage``."""
_OUTAGES_LOCK = threading.Lock()


@dataclass
class Retry:
    """How long and how often an operation on an unreachable store is tried again; ``clock`` and ``sleep`` are
    injectable for tests."""

    limit_s: float = field(default_factory=retry_limit_s)
    first_s: float = 0.5
    max_s: float = 8.0
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep

    def call(self, where: str, fn: Callable[[], T]) -> T:
        """``fn()``, tried again while it fails with an ``unreachable`` error, for up to ``limit_s`` from its first
        failure; ``where`` (the bucket) names the outage in the log lines and in ``StorageUnavailable``."""
        start, wait = None, self.first_s
        while True:
            try:
                out = fn()
            except OSError as e:
                if not unreachable(e):
                    raise
                now = self.clock()
                start = now if start is None else start
                with _OUTAGES_LOCK:
                    first = where not in _OUTAGES
                    _OUTAGES.setdefault(where, now)
                if first:
                    log.warning("bucket %s unreachable, retrying for up to %.0f s (%s): %s", where, self.limit_s,
                                RETRY_ENV, _first_line(e))
                left = start + self.limit_s - now
                if left <= 0:  # the outage stays recorded: later calls in it log nothing new
                    raise StorageUnavailable(f"bucket {where} unreachable for {now - start:.0f} s, past the "
                                             f"{self.limit_s:.0f} s limit ({RETRY_ENV}): {_first_line(e)}") from None
                self.sleep(min(wait, left))
                wait = min(wait * 2, self.max_s)
                continue
            if start is not None or _OUTAGES:
                with _OUTAGES_LOCK:
                    since = _OUTAGES.pop(where, None)
                if since is not None:
                    log.warning("bucket %s reachable again after %.0f s", where, self.clock() - since)
            return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def bucket_of(uri: str) -> str:
    """The store a URI is in, as the outage lines name it: ``s3://bucket`` and its endpoint, if one is given."""
    base, query = split_uri(uri)
    scheme, _, rest = base.partition("://")
    endpoint = re.search(r"endpoint_override=([^&]+)", query)
    return f"{scheme}://{rest.split('/', 1)[0]}" + (f" (endpoint {endpoint.group(1)})" if endpoint else "")


class Storage:
    """A folder at ``location`` (a path or URI); every method takes paths relative to it (``a/b.json``).
    ``retry=False``: an unreachable store fails at once (after pyarrow's own retries) instead of being waited out."""

    def __init__(self, location: str | Path, filesystem: pafs.FileSystem | None = None, retry: bool = True):
        self.uri = normalize(location) if filesystem is None else str(location)
        if filesystem is None:
            self.fs, self.root = resolve(self.uri)
        else:
            self.fs, self.root = filesystem, str(location).rstrip("/")
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        self.retry = Retry() if retry and not self.is_local else None
        self.bucket = "" if self.is_local else bucket_of(self.uri)

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` (an operation on ``self.fs``), waiting out an outage of a remote store (the module docstring)."""
        return fn() if self.retry is None else self.retry.call(self.bucket, fn)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    def __str__(self) -> str:
        return self.uri

    @property
    def name(self) -> str:
        return posixpath.basename(self.root.rstrip("/"))

    @property
    def local_dir(self) -> Path | None:
        """The folder as a local ``Path`` when it is on this machine's filesystem, else ``None``."""
        return Path(self.root) if self.is_local else None

    def path(self, rel: str = "") -> str:
        """The path inside ``self.fs`` of ``rel``."""
        rel = rel.strip("/")
        return f"{self.root}/{rel}" if rel else self.root

    def uri_of(self, rel: str = "") -> str:
        """``rel`` as a full location (a local path or a URI with this storage's query string)."""
        return self.path(rel) if self.is_local else join_uri(self.uri, rel)

    def child(self, rel: str) -> Storage:
        return Storage(self.uri_of(rel))

    # -- reading -------------------------------------------------------------------------------------------
    def info(self, rel: str = "") -> pafs.FileInfo:
        return self.call(lambda: self.fs.get_file_info(self.path(rel)))

    def exists(self, rel: str = "") -> bool:
        return self.info(rel).type != pafs.FileType.NotFound

    def is_file(self, rel: str) -> bool:
        return self.info(rel).type == pafs.FileType.File

    def read_bytes(self, rel: str) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()

        try:
            return self.call(read)
        except FileNotFoundError:
            raise StorageError(f"{self.uri_of(rel)}: no such file") from None

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_text(rel))

    def files(self, rel: str = "", recursive: bool = False) -> list[str]:
        """Files under ``rel`` (paths relative to this storage), sorted; an absent folder has none."""
        infos = self._list(self.path(rel), recursive)
        return sorted(posixpath.relpath(i.path, self.root) for i in infos if i.type == pafs.FileType.File)

    def dirs(self, rel: str = "") -> list[str]:
        """Names of the sub-folders directly under ``rel``, sorted."""
        infos = self._list(self.path(rel))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def _list(self, path: str, recursive: bool = False) -> list[pafs.FileInfo]:
        return self.call(lambda: self.fs.get_file_info(pafs.FileSelector(path, recursive=recursive,
                                                                         allow_not_found=True)))

    # -- writing -------------------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write ``data`` to ``rel`` atomically; returns its location (``uri_of``)."""
        path = self.path(rel)
        if self.is_local:
            atomic_write_bytes(path, lambda f: f.write(data))
        else:
            def put() -> None:  # whole-object: tried again from the same bytes
                self.fs.create_dir(posixpath.dirname(path), recursive=True)
                with self.fs.open_output_stream(path) as f:
                    f.write(data)

            self.call(put)
        return self.uri_of(rel)

    def write_with(self, rel: str, write: Callable[[io.BytesIO], Any]) -> str:
        """Call ``write(fileobj)`` on an in-memory buffer, then store it as ``rel`` (atomically)."""
        buf = io.BytesIO()
        write(buf)
        return self.write_bytes(rel, buf.getvalue())

    def write_text(self, rel: str, text: str) -> str:
        return self.write_bytes(rel, text.encode())

    def write_json(self, rel: str, obj: Any) -> str:
        return self.write_text(rel, json.dumps(obj, indent=1, default=str))

    def delete(self, rel: str) -> None:
        """Remove the file or folder ``rel`` if it exists. On a local disk a symlink is removed as a link, never
        followed (``shutil.rmtree`` semantics: nothing outside the folder is touched)."""
        if self.is_local:
            path = Path(self.path(rel))
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                shutil.rmtree(path)
            return
        def remove() -> None:  # tried again whole: what the last try removed is gone, the rest is removed now
            info = self.fs.get_file_info(self.path(rel))
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(self.path(rel))
            elif info.type == pafs.FileType.File:
                self.fs.delete_file(self.path(rel))

        self.call(remove)

    def is_empty(self) -> bool:
        """True when nothing is at this location (or an empty folder is)."""
        return not self._list(self.root)


def parent_and_name(location: str) -> tuple[str, str]:
    """A file's folder location (query kept) and its name: ``s3://b/x/f.pt?q`` → ``("s3://b/x?q", "f.pt")``."""
    base, query = split_uri(normalize(location))
    head, name = posixpath.split(base)
    return head + query, name
