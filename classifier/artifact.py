"""Versioned artifact directories and the atomic ``current`` pointer.

An artifact directory holds ``metadata.json`` (version, variant, encoder settings,
threshold, training data, date, accepted-with metrics) plus ``head.npz`` (frozen variant)
or ``model/`` (fine-tuned variant).  A *pointer directory* holds several artifacts and a
``current`` symlink (or, where symlinks are unavailable, a one-line file) naming the live
one.  New models are written completely under a fresh name first, then the pointer is
swapped with ``os.replace``, which is atomic: a reader sees the old or the new model,
never half of one.  A router polls :func:`resolve_artifact` and reloads when the
returned version changes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

METADATA = "metadata.json"
POINTER = "current"


def new_version(prefix: str = "v") -> str:
    """A sortable, unique-enough version string, e.g. ``v20261128T150501Z-1a2b``."""
    return f"{prefix}{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{os.urandom(2).hex()}"


def read_metadata(directory: str | Path) -> dict:
    with (Path(directory) / METADATA).open() as fh:
        return json.load(fh)


def write_metadata(directory: str | Path, meta: dict) -> None:
    path = Path(directory) / METADATA
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def resolve_artifact(path: str | Path) -> tuple[Path, str]:
    """(real artifact directory, version) for an artifact dir or a pointer dir.

    Cheap enough to poll: one readlink (or small file read) and one small JSON read.
    """
    path = Path(path)
    if (path / METADATA).is_file():
        target = path
    elif (path / POINTER).is_symlink() or (path / POINTER).is_dir():
        target = (path / POINTER).resolve()
    elif (path / POINTER).is_file():
        name = (path / POINTER).read_text().strip()
        target = (path / name).resolve()
    else:
        raise FileNotFoundError(
            f"{path} is neither a classifier artifact (no {METADATA}) nor a pointer "
            f"directory (no {POINTER!r} link or file)")
    meta = read_metadata(target)
    return target, str(meta["version"])


def swap_pointer(root: str | Path, artifact_name: str) -> None:
    """Point ``root/current`` at ``root/artifact_name`` atomically (symlink + os.replace)."""
    root = Path(root)
    if not (root / artifact_name / METADATA).is_file():
        raise FileNotFoundError(f"{root / artifact_name} is not a complete artifact")
    tmp = root / f".{POINTER}.{os.getpid()}.{os.urandom(3).hex()}"
    try:
        os.symlink(artifact_name, tmp)
    except OSError:  # no symlinks (some filesystems): a one-line file, replaced atomically
        tmp.write_text(artifact_name + "\n")
    os.replace(tmp, root / POINTER)


def export(src: str | Path, dest: str | Path, extra_meta: dict | None = None) -> Path:
    """Copy an artifact to ``dest`` (written beside it, then renamed into place)."""
    src_dir, _ = resolve_artifact(src)
    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} exists; export writes a new versioned directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    shutil.copytree(src_dir, tmp, dirs_exist_ok=True)
    if extra_meta:
        write_metadata(tmp, {**read_metadata(tmp), **extra_meta})
    os.replace(tmp, dest)
    return dest
