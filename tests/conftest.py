"""Shared fixtures. Integration fixtures (the real vLLM fleet) live in tests/integration."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


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
