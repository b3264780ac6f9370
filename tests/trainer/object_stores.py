"""Real peers for the trainer's storage backends, on loopback: moto's S3 server, the
GCS emulator and a plain HTTP server with directory listings.

Each server yields the environment a worker pod gets from its credentials Secret
(`envFrom`): the trainer finds its endpoint and keys there, as it would in a cluster.
"""

from __future__ import annotations

import logging
import threading
import uuid
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

from tests.trainer.prometheus_server import free_port

LOOPBACK = "127.0.0.1"


@contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """moto's S3 API. AWS_ENDPOINT_URL is how a user points the trainer at MinIO or any
    other S3-compatible store; botocore reads it, nothing of ours does."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address=LOOPBACK, port=port, verbose=False)
    server.start()
    try:
        yield {"AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{LOOPBACK}:{port}"}
    finally:
        server.stop()


@contextmanager
def gcs_server() -> Iterator[dict[str, str]]:
    """The GCS JSON API, in memory. gcsfs (and Google's own clients) go to
    STORAGE_EMULATOR_HOST without credentials."""
    from gcp_storage_emulator.server import create_server

    # gcsfs asks for Google's default credentials to tell a bucket's kind and, finding
    # none, logs a warning per request before it falls back to the plain API.
    logging.getLogger("gcsfs").setLevel(logging.ERROR)
    port = free_port()
    server = create_server(LOOPBACK, port, in_memory=True)
    server.start()
    try:
        yield {"STORAGE_EMULATOR_HOST": f"http://{LOOPBACK}:{port}"}
    finally:
        server.stop()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


@contextmanager
def http_folder(folder: Path) -> Iterator[str]:
    """`folder` served over HTTP with directory listings (what fsspec's HTTP backend
    reads as a folder); yields the URL of its root."""
    server = ThreadingHTTPServer((LOOPBACK, 0), partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{LOOPBACK}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def forget_filesystems() -> None:
    """fsspec keeps one filesystem object per class and options: one made while an
    earlier server ran would still talk to that server's port."""
    from gcsfs import GCSFileSystem
    from s3fs import S3FileSystem

    S3FileSystem.clear_instance_cache()
    GCSFileSystem.clear_instance_cache()


@contextmanager
def emulated_bucket(scheme: str, monkeypatch) -> Iterator[tuple[object, str]]:
    """An empty bucket on an emulated `s3` or `gs` store, with the environment (set through
    `monkeypatch`) pointing every fsspec client of this process and its children at it."""
    import fsspec

    server = {"s3": s3_server, "gs": gcs_server}[scheme]
    with server() as environment:
        for key, value in environment.items():
            monkeypatch.setenv(key, value)
        forget_filesystems()
        fs = fsspec.filesystem(scheme)
        # moto keeps its buckets in the process, from one server to the next.
        bucket = f"dreambooth-{uuid.uuid4().hex[:12]}"
        fs.mkdir(bucket)
        try:
            yield fs, bucket
        finally:
            forget_filesystems()
