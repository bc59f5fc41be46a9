"""A real GCS JSON API server for the tests: gcp-storage-emulator (HTTP on 127.0.0.1, a free port, objects in
memory), started once per session; the environment points gcsfs (this process and every subprocess: main.py,
horovodrun's ranks) at it.

The environment it sets: ``STORAGE_EMULATOR_HOST`` (gcsfs' and google-cloud-storage's endpoint override),
``FSSPEC_GS={"token": "anon"}`` (fsspec's per-protocol defaults: no credential lookup, so a developer's own
Google credentials are never used) and ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``: gcsfs' default filesystem
first asks the Storage Control gRPC API for the bucket's layout (zonal / hierarchical), an API the emulator does
not serve; with the variable, gcsfs uses its JSON API filesystem, the one the default falls back to for plain
buckets.

Fixtures: ``gcs_server`` (the endpoint URL), ``gcs_bucket`` (a fresh, empty bucket per test: ``gs://<name>``).
"""

from __future__ import annotations

import importlib
import os
import sys
import uuid
from collections.abc import Iterator

import pytest

from tests.s3_server import free_port

ENV = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "FSSPEC_GS": '{"token": "anon"}', "NO_GCE_CHECK": "true"}


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[str]:
    """Start gcp-storage-emulator in a thread; yields its endpoint URL; stopped (and the environment and
    fsspec's gs defaults restored) after."""
    if "gcsfs" not in sys.modules:  # read when gcsfs is imported: set before
        os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    pytest.importorskip("gcsfs")
    emulator = pytest.importorskip("gcp_storage_emulator.server")
    import fsspec.config
    import gcsfs.core

    port = free_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*ENV, "STORAGE_EMULATOR_HOST"]}
    saved_conf = fsspec.config.conf.get("gs")
    registry = importlib.import_module("fsspec.registry")._registry  # noqa: SLF001 - restored after
    saved_impl = registry.get("gs")
    os.environ.update({**ENV, "STORAGE_EMULATOR_HOST": endpoint})
    fsspec.config.conf["gs"] = {**(saved_conf or {}), "token": "anon"}  # this process read FSSPEC_GS already
    registry["gs"] = gcsfs.core.GCSFileSystem  # the JSON API filesystem even if gcsfs was imported before
    gcsfs.core.GCSFileSystem.clear_instance_cache()
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if saved_conf is None:
            fsspec.config.conf.pop("gs", None)
        else:
            fsspec.config.conf["gs"] = saved_conf
        if saved_impl is None:
            registry.pop("gs", None)
        else:
            registry["gs"] = saved_impl
        gcsfs.core.GCSFileSystem.clear_instance_cache()


@pytest.fixture
def gcs_bucket(gcs_server: str) -> str:
    """A new empty bucket on the session's server: ``gs://wd-sok-<random>``."""
    import requests

    name = f"wd-sok-{uuid.uuid4().hex[:12]}"
    requests.post(f"{gcs_server}/storage/v1/b", params={"project": "test"}, json={"name": name},
                  timeout=10).raise_for_status()
    return f"gs://{name}"
