"""What config parsing may read from the machine it runs on: secrets, files and folders.

A secret in the config (a worker API key, an admin key, a webhook or Redis URL) can be
written as a reference instead of a literal, so that it lives in a Kubernetes Secret or an
environment variable and never in a ConfigMap:

    api_key: {env: VLLM_API_KEY}          # the variable's value
    api_key: {file: /etc/kvroute/key}     # the file's content, surrounding whitespace stripped

``kvroute config check --skip-local-checks`` validates a config written for another
machine (a rendered Helm chart): references and paths are checked in form only, and each
secret reads as a placeholder that names its key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvroute.router.errors import ConfigError


@dataclass(frozen=True)
class Local:
    """Whether to look at this machine while parsing (``check=False``: form only)."""

    check: bool = True

    def secret(self, value: Any, key: str, *, literal: bool = True) -> str:
        """A config string that may be a ``{env: NAME}`` or ``{file: PATH}`` reference."""
        if isinstance(value, str) and value:
            if not literal:
                raise ConfigError(key, "give a reference, {env: NAME} or {file: PATH}, not the secret itself")
            return value
        if not isinstance(value, Mapping) or len(value) != 1 or next(iter(value)) not in ("env", "file"):
            kinds = "a string, {env: NAME} or {file: PATH}" if literal else "{env: NAME} or {file: PATH}"
            raise ConfigError(key, f"expected {kinds}")
        kind, where = next(iter(value.items()))
        if not isinstance(where, str) or not where:
            raise ConfigError(f"{key}.{kind}", "expected a non-empty string")
        if not self.check:
            return f"<{kind}:{where}>"
        if kind == "env":
            secret = os.environ.get(where)
            if not secret:
                raise ConfigError(f"{key}.env", f"environment variable {where} is not set or empty")
            return secret
        try:
            secret = Path(where).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{key}.file", f"cannot read {where}: {exc.strerror}") from None
        if not secret:
            raise ConfigError(f"{key}.file", f"{where} is empty")
        return secret

    def path(self, path: str, key: str, what: str, *, folder: bool = False) -> str:
        """A local file or folder the config names; checked only when looking at this machine."""
        if self.check and not (Path(path).is_dir() if folder else Path(path).exists()):
            raise ConfigError(key, f"{what}: {path!r}")
        return path
