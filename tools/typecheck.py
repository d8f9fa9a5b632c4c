"""Type-check the router with mypy: ``python tools/typecheck.py`` (CI runs it).

The code lives in router/, classifier/ and benchmarks/ and installs as kvroute.router
and so on (pyproject.toml maps the folders). mypy cannot follow that mapping, so this
lays the same names out as links in a temporary folder and checks ``kvroute.router``
there, with the settings of ``[tool.mypy]`` in pyproject.toml.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="kvroute-mypy-") as tmp:
        root = Path(tmp) / "kvroute"
        root.mkdir()
        (root / "__init__.py").symlink_to(REPO / "kvroute" / "__init__.py")
        for name in ("router", "classifier", "benchmarks"):
            (root / name).symlink_to(REPO / name, target_is_directory=True)
        cmd = [sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"),
               "--cache-dir", str(Path.home() / ".cache" / "kvroute" / "mypy"), "-p", "kvroute.router"]
        return subprocess.run(cmd, cwd=tmp).returncode


if __name__ == "__main__":
    sys.exit(main())
