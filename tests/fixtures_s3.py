"""A real S3-compatible HTTP server on loopback (moto's server mode, in a subprocess) for tests.

Loaded as a pytest plugin (``pytest_plugins = ["fixtures_s3"]``). The server is a
separate process speaking HTTP, so boto3's whole stack (signing, retries,
pagination, streaming) runs as it does against AWS or MinIO; nothing is mocked
in-process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


def free_port() -> int:
    """A loopback TCP port nobody listens on (right now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MotoServer:
    """``python -m moto.server`` on 127.0.0.1; ``url`` is what AWS_ENDPOINT_URL gets."""

    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, log: Path, **env: str) -> "MotoServer":
        port = free_port()
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env},
            )
        server = cls(proc, port, log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return server
            except OSError:
                time.sleep(0.05)
        server.stop()
        raise RuntimeError(f"moto server did not answer on port {port} within 30 s:\n{log.read_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def client(self):
        """A boto3 client for setting up buckets (test credentials, this server)."""
        import boto3

        return boto3.session.Session().client(
            "s3", endpoint_url=self.url, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory) -> Iterator[MotoServer]:
    """An S3 server that accepts any credentials (moto's default)."""
    server = MotoServer.start(tmp_path_factory.mktemp("moto") / "server.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto_auth_server(tmp_path_factory) -> Iterator[MotoServer]:
    """An S3 server that checks credentials from the first request (unknown keys -> InvalidAccessKeyId)."""
    server = MotoServer.start(tmp_path_factory.mktemp("moto-auth") / "server.log", INITIAL_NO_AUTH_ACTION_COUNT="0")
    yield server
    server.stop()


@pytest.fixture
def s3_env(moto_server, monkeypatch, tmp_path) -> MotoServer:
    """Point the standard AWS variables (and qadapt's cache) at the loopback server for one test."""
    for var in ("AWS_ENDPOINT_URL_S3", "S3_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    for var, value in TEST_ENV.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.url)
    monkeypatch.setenv("QADAPT_CACHE", str(tmp_path / "qadapt-cache"))
    return moto_server


@pytest.fixture
def closed_endpoint(s3_env, monkeypatch) -> str:
    """Point AWS_ENDPOINT_URL at a loopback port nobody listens on (one attempt, no retries)."""
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    return url
