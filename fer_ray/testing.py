"""Helpers the tests and benchmarks share: a real S3-compatible server (moto's server mode) on loopback.

Needs the ``dev`` extra (``moto[server]``). Nothing in the pipeline imports this module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}
"""Fake credentials for the loopback server (and no slow EC2 metadata lookups)."""


@contextlib.contextmanager
def s3_server(bucket: str = "fer-test", prefix: str = "runs") -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1 and a free port, put fake credentials in ``os.environ`` (so Ray started
    afterwards, and subprocesses, get them), create ``bucket``; yield ``s3://bucket/prefix?region=...&
    endpoint_override=127.0.0.1:PORT&scheme=http``. Stops the server and restores the environment on exit."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    try:
        query = f"region=us-east-1&endpoint_override=127.0.0.1:{port}&scheme=http"
        fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}?{query}&allow_bucket_creation=true")
        fs.create_dir(bucket)
        yield f"s3://{bucket}/{prefix}?{query}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
