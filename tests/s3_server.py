"""A real S3-compatible server on loopback for the object-storage tests (moto's server mode, as
s3fs's own tests run it): clients talk HTTP to it, nothing in the client is mocked.

Use the ``s3`` fixture (tests/conftest.py): it gives a bucket URL prefix and sets the
environment (``AWS_ENDPOINT_URL``, keys, region) that fsspec/s3fs and boto read, in this
process and in the loader's workers, which inherit it.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class S3:
    endpoint: str
    bucket: str

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def put(self, key: str, data: bytes) -> str:
        """Upload ``data`` as ``key``; returns its URL."""
        import fsspec

        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        with fs.open(f"{self.bucket}/{key}", "wb") as f:
            f.write(data)
        return self.url(key)

    def upload(self, local_path: str, key: str) -> str:
        with open(local_path, "rb") as f:
            return self.put(key, f.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server(monkeypatch) -> Iterator[S3]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # (a line per request otherwise)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    try:
        import urllib.request

        import fsspec

        # moto keeps its buckets in process-wide state that outlives a server: start empty
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10)
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("data")
        fs.clear_instance_cache()
        yield S3(endpoint, "data")
    finally:
        server.stop()
