"""Shared fixtures. Integration fixtures (the real vLLM fleet) live in tests/integration."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A test that kills a shared worker runs last: one after it would wait a minute for the
    # worker's restart (tests/integration/conftest.py restarts it for any test that follows).
    items.sort(key=lambda item: item.get_closest_marker("kills_worker") is not None)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from kvroute.router.local.tinymodel import build_tiny_model

    return build_tiny_model()


@pytest.fixture(scope="session")
def helm() -> str:
    """A real helm binary (``python tools/get_helm.py`` installs one without network)."""
    candidates = [os.environ.get("KVROUTE_HELM"), str(Path.home() / ".cache" / "kvroute" / "bin" / "helm"),
                  shutil.which("helm")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    pytest.fail("helm binary not found: run `python tools/get_helm.py` (or set KVROUTE_HELM)", pytrace=False)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> str:
    """A real redis-server for the session: governance, the response cache, packaging."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed: these tests need a real Redis (apt-get install redis-server)")
    folder = tmp_path_factory.mktemp("redis")
    for _ in range(5):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                 "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                time.sleep(0.05)
        else:
            proc.kill()
            proc.wait(10)
            continue  # the port was taken between choosing and binding: try another
        yield f"redis://127.0.0.1:{port}/0"
        proc.terminate()
        proc.wait(10)
        return
    pytest.fail("could not start redis-server")
