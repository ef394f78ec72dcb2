"""Shared test set-up: no network, deterministic torch, small thread count."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Golden images must not depend on the test machine's CPU: `--dtype auto` stays fp32 here
# (tests of the per-machine choice inject CPU flags and probe results instead).
os.environ.setdefault("HUABI_AUTO_DTYPE", "fp32")
# Likewise `--backend auto` stays torch for full-size models (tiny models are torch anyway):
# no backend probe runs here (tests/test_backend_auto.py unpins it and states the probe's record).
os.environ.setdefault("HUABI_AUTO_BACKEND", "torch")
# One torch thread in this process and in every server it starts: summation order (and so the last
# bit of a pixel) depends on the thread count, and byte-equality tests compare processes.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# CLI runs record their images in the default data dir's gallery when it exists: never the tester's own.
os.environ["HUABI_DATA_DIR"] = "off"


class NetworkAccessError(RuntimeError):
    pass


def _refuse(*args, **kwargs):
    raise NetworkAccessError(f"test tried to open a network connection: {args[:2]!r}")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail any test that opens a connection to anything but a local socket pair."""
    original_connect = socket.socket.connect

    def guarded_connect(self, address):
        if self.family == socket.AF_UNIX:
            return original_connect(self, address)
        host = address[0] if isinstance(address, tuple) else address
        if host in ("127.0.0.1", "::1", "localhost"):
            return original_connect(self, address)
        _refuse(address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    original_create_connection = socket.create_connection

    def guarded_create_connection(address, *args, **kwargs):  # loopback only (test servers, chromedriver)
        if address[0] in ("127.0.0.1", "::1", "localhost"):
            return original_create_connection(address, *args, **kwargs)
        _refuse(address)

    monkeypatch.setattr(socket, "create_connection", guarded_create_connection)
    original_getaddrinfo = socket.getaddrinfo

    def guarded_getaddrinfo(host, *args, **kwargs):  # loopback names resolve (local test servers)
        if host in ("127.0.0.1", "::1", "localhost"):
            return original_getaddrinfo(host, *args, **kwargs)
        _refuse(host)

    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    yield


# Tiny random-weight models of every family, shared by all test modules; the autouse
# isolated_huabi_cache keeps hash caches out of the user's ~/.cache.
from tiny_models import (  # noqa: E402,F401
    isolated_huabi_cache,
    tiny_mini_file,
    tiny_model_factory,
    tiny_sd1_file,
    tiny_sd1_folder,
    tiny_sd2_file,
    tiny_sdxl_file,
)
