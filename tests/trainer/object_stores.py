"""Real peers for the trainer's storage backends, on loopback: moto's S3 server, the
GCS emulator, Azurite (Microsoft's Azure Storage emulator) and a plain HTTP server with
directory listings.

Each server yields the environment a worker pod gets from its credentials Secret
(`envFrom`): the trainer finds its endpoint and keys there, as it would in a cluster.
"""

from __future__ import annotations

import logging
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Iterator

from tests.conftest import REPO
from tests.trainer.prometheus_server import free_port

LOOPBACK = "127.0.0.1"
INSTALL_AZURITE = REPO / "scripts" / "install-azurite.sh"
# Azurite's one account and its key: public, the same in every copy of the emulator.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


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


def install_azurite() -> str:
    """Idempotent (`make tools` has usually done it): the path of Azurite's Blob service."""
    result = subprocess.run(["bash", str(INSTALL_AZURITE)], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"{INSTALL_AZURITE.name} failed:\n{result.stderr[-3000:]}")
    return result.stdout.strip().splitlines()[-1]


def wait_for_port(port: int, process: subprocess.Popen, log: IO[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{process.args[0]} exited {process.returncode}: {log.read()[-3000:]}")
        try:
            socket.create_connection((LOOPBACK, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{process.args[0]} did not listen on {LOOPBACK}:{port} within {timeout:.0f} s")


@contextmanager
def azure_blob_server() -> Iterator[dict[str, str]]:
    """Azurite's Blob service, in memory. A connection string in AZURE_STORAGE_CONNECTION_STRING
    is how adlfs (and Azure's own clients) find an account, its key and its endpoint."""
    port = free_port()
    command = [install_azurite(), "--blobHost", LOOPBACK, "--blobPort", str(port), "--inMemoryPersistence",
               "--silent", "--disableTelemetry",
               # azure-storage-blob may speak a newer service version than the emulator knows.
               "--skipApiVersionCheck"]
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            wait_for_port(port, process, log)
            yield {"AZURE_STORAGE_CONNECTION_STRING": f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
                                                      f"AccountKey={AZURITE_KEY};"
                                                      f"BlobEndpoint=http://{LOOPBACK}:{port}/{AZURITE_ACCOUNT};"}
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


@contextmanager
def http_folder(folder: Path, tls: ssl.SSLContext | None = None) -> Iterator[str]:
    """`folder` served over HTTP (HTTPS with a server context `tls`) with directory
    listings (what fsspec's HTTP backend reads as a folder); yields the URL of its root."""
    server = ThreadingHTTPServer((LOOPBACK, 0), partial(_QuietHandler, directory=str(folder)))
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://{LOOPBACK}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def private_ca_and_server_context(folder: Path) -> tuple[Path, ssl.SSLContext]:
    """A company's own certificate authority, as `ca.pem` in `folder`, and the server
    context of a host on loopback whose certificate that CA signed."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def certificate(subject: str, key, issuer: str, issuer_key, *, ca: bool) -> x509.Certificate:
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                          content_commitment=False, key_encipherment=False,
                                                          data_encipherment=False, key_agreement=False,
                                                          encipher_only=False, decipher_only=False), critical=True)
            builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        else:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]),
                                            critical=False)
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate("Example Corp Root CA", ca_key, "Example Corp Root CA", ca_key, ca=True)
    server = certificate(LOOPBACK, server_key, "Example Corp Root CA", ca_key, ca=False)
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    (folder / "server.pem").write_bytes(server.public_bytes(pem))
    (folder / "server.key").write_bytes(server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                                 serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "server.pem", folder / "server.key")
    return folder / "ca.pem", context


def forget_filesystems() -> None:
    """fsspec keeps one filesystem object per class and options: one made while an
    earlier server ran would still talk to that server's port."""
    from adlfs import AzureBlobFileSystem
    from gcsfs import GCSFileSystem
    from s3fs import S3FileSystem

    for backend in (S3FileSystem, GCSFileSystem, AzureBlobFileSystem):
        backend.clear_instance_cache()


@contextmanager
def emulated_bucket(scheme: str, monkeypatch) -> Iterator[tuple[object, str]]:
    """An empty bucket (an Azure container for `az`) on an emulated `s3`, `gs` or `az`
    store, with the environment (set through `monkeypatch`) pointing every fsspec client
    of this process and its children at it."""
    import fsspec

    server = {"s3": s3_server, "gs": gcs_server, "az": azure_blob_server}[scheme]
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
