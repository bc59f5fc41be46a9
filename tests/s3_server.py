"""A real S3 API server for the tests: moto in server mode (HTTP on 127.0.0.1, a free port), as s3fs's own
test suite uses, started once per session; the environment points botocore (this process and every
subprocess: main.py, horovodrun's ranks) at it.

Fixtures: ``s3_server`` (the endpoint URL), ``s3_bucket`` (a fresh, empty bucket per test: ``s3://<name>``).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import pytest

ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_SESSION_TOKEN": "", "AWS_SECURITY_TOKEN": ""}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Start moto's ThreadedMotoServer; yields its endpoint URL; stopped (and the environment restored) after."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update({**ENV, "AWS_ENDPOINT_URL": endpoint})
    _forget_clients()
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _forget_clients()


def _forget_clients() -> None:
    """fsspec caches filesystem instances (and their endpoint): drop them when the endpoint changes."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A new empty bucket on the session's server: ``s3://wd-sok-<random>``."""
    import boto3

    name = f"wd-sok-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"
