"""Storage by URI: one folder on any filesystem pyarrow reaches, read and written whole-file and atomically.

A location is a local path, ``file:///abs/path``, ``s3://bucket/prefix`` (S3-compatible stores take
``?region=us-east-1&endpoint_override=host:port&scheme=http``), ``gs://bucket/prefix``, ``hdfs://...``: anything
``pyarrow.fs.FileSystem.from_uri`` accepts, which is also what Ray Tune and Ray Train accept as ``storage_path``.
``join_uri`` appends path parts *before* the query string, so a child keeps the endpoint settings.

Writes never leave half a file: a local file goes to a temp file beside it, then ``os.replace``; on an object
store the payload is built in memory first and uploaded in one request (an object becomes visible only when its
upload completes). Credentials come from the environment (``AWS_*``, ``GOOGLE_APPLICATION_CREDENTIALS``) or the
machine's role; ``fer_ray.cluster.init_ray`` forwards the ``AWS_*`` variables to Ray's workers.
"""

from __future__ import annotations

import io
import json
import posixpath
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from fer_ray.atomic import atomic_write_bytes


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


class Storage:
    """A folder at ``location`` (a path or URI); every method takes paths relative to it (``a/b.json``)."""

    def __init__(self, location: str | Path, filesystem: pafs.FileSystem | None = None):
        self.uri = normalize(location) if filesystem is None else str(location)
        if filesystem is None:
            self.fs, self.root = resolve(self.uri)
        else:
            self.fs, self.root = filesystem, str(location).rstrip("/")
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

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
    def exists(self, rel: str = "") -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def is_file(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File

    def read_bytes(self, rel: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except FileNotFoundError:
            raise StorageError(f"{self.uri_of(rel)}: no such file") from None

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_text(rel))

    def files(self, rel: str = "", recursive: bool = False) -> list[str]:
        """Files under ``rel`` (paths relative to this storage), sorted; an absent folder has none."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), recursive=recursive, allow_not_found=True))
        return sorted(posixpath.relpath(i.path, self.root) for i in infos if i.type == pafs.FileType.File)

    def dirs(self, rel: str = "") -> list[str]:
        """Names of the sub-folders directly under ``rel``, sorted."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    # -- writing -------------------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write ``data`` to ``rel`` atomically; returns its location (``uri_of``)."""
        path = self.path(rel)
        if self.is_local:
            atomic_write_bytes(path, lambda f: f.write(data))
        else:
            self.fs.create_dir(posixpath.dirname(path), recursive=True)
            with self.fs.open_output_stream(path) as f:
                f.write(data)
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
        info = self.fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(rel))

    def is_empty(self) -> bool:
        """True when nothing is at this location (or an empty folder is)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return not infos


def parent_and_name(location: str) -> tuple[str, str]:
    """A file's folder location (query kept) and its name: ``s3://b/x/f.pt?q`` → ``("s3://b/x?q", "f.pt")``."""
    base, query = split_uri(normalize(location))
    head, name = posixpath.split(base)
    return head + query, name
