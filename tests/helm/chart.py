"""Rendering helm/kvroute for the tests in tests/helm: helm runs, parsed manifests, the
router config the chart writes, and ``kvroute config check`` on it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvroute.router.config import ModelConfig, RouterConfig, config_from_dict
from kvroute.router.secrets import Local

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "kvroute"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
NS = "kvr-test"
RELEASE = "rel"
SECRETS_DIR = "/etc/kvroute/secrets"


def run_helm(helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def template(helm: str, *args: str, release: str = RELEASE, chart: Path = CHART) -> str:
    return run_helm(helm, "template", release, str(chart), "--namespace", NS, *args).stdout


def docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


_cache: dict[tuple, list[dict]] = {}


def render(helm: str, values: Path | None = None, *sets: str, release: str = RELEASE) -> list[dict]:
    key = (values, sets, release)
    if key not in _cache:
        args = (["-f", str(values)] if values else []) + [a for s in sets for a in ("--set", s)]
        _cache[key] = docs(template(helm, *args, release=release))
    return _cache[key]


def ci(name: str) -> Path:
    return CHART / "ci" / f"{name}-values.yaml"


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict], kind: str, component: str | None = None) -> dict:
    found = [o for o in by_kind(objs, kind) if component is None
             or o["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    assert len(found) == 1, f"expected one {kind} ({component}), got {len(found)}"
    return found[0]


def workers(objs: list[dict]) -> list[dict]:
    return [d for d in by_kind(objs, "Deployment")
            if d["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"]


def container(dep: dict) -> dict:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def raw_router_config(objs: list[dict]) -> dict[str, Any]:
    """The router's config.yaml from the rendered ConfigMap, as parsed YAML."""
    return yaml.safe_load(one(objs, "ConfigMap", "router")["data"]["config.yaml"])


def router_config(objs: list[dict]) -> RouterConfig:
    """The rendered config, validated by the router's own parser. Form only: the files
    the config names (secrets, tokenizers) exist in the pod, not here."""
    return config_from_dict(raw_router_config(objs), local=Local(check=False))


def model_named(cfg: RouterConfig, name: str) -> ModelConfig:
    """The model entry ``name`` of ``cfg``."""
    (m,) = [m for m in cfg.models if m.name == name]
    return m


def config_check(path: Path) -> subprocess.CompletedProcess:
    """``kvroute config check --skip-local-checks``: what CI runs on a rendered config."""
    return subprocess.run(
        [sys.executable, "-m", "kvroute.router.cli", "config", "check", str(path), "--skip-local-checks"],
        capture_output=True, text=True, timeout=120)


def secret_mounts(router_deployment: dict) -> dict[str, tuple[str, str]]:
    """Path in the router container -> (Secret, key), from its projected config volume."""
    spec = router_deployment["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    vol = next(v for v in spec["volumes"] if v["name"] == "config")
    out = {}
    for src in vol["projected"]["sources"]:
        if "secret" in src:
            for item in src["secret"]["items"]:
                out[f"{mount['mountPath']}/{item['path']}"] = (src["secret"]["name"], item["key"])
    return out
