"""values.schema.json models the router's own config parser, key for key.

At every mapping under router.config in the chart's examples (ci/*-values.yaml), a
misspelled key is rejected twice: by the schema (``helm install`` fails and names the
path) and by the router (``config_from_dict``, what ``kvroute serve`` runs, names the key).
The router's error lists the keys it accepts there; they must be exactly the keys the
schema allows (plus the few the chart sets itself). So neither can drift from the other:
a key the router learns and the schema lacks, or the reverse, fails here. And every
object the schema describes must occur in some example, so all of it is checked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvroute.router.config import config_from_dict
from kvroute.router.errors import ConfigError
from kvroute.router.secrets import Local
from tests.helm.chart import CHART, CI_VALUES, NS, RELEASE, raw_router_config, render, run_helm

SCHEMA = json.loads((CHART / "values.schema.json").read_text())
TYPO = "zz_typo"
# Keys of the router config that the chart writes itself and values may not set.
CHART_OWNED = {(): {"discovery"}, ("server",): {"host", "port"}}
SECRET_FORMS = {"secretKeyRef", "file", "env"}
Path_ = tuple[Any, ...]


def resolve(node: dict) -> dict:
    while "$ref" in node:
        node = SCHEMA["definitions"][node["$ref"].rsplit("/", 1)[1]]
    return node


def is_secret(node: dict) -> bool:
    return node is SCHEMA["definitions"]["secretRef"] or node is SCHEMA["definitions"]["secretKeyRef"]


def config_schema() -> dict:
    return resolve(SCHEMA["properties"]["router"]["properties"]["config"])


def policy_options_schema(pool_schema: dict, pool: dict) -> dict:
    """policy_options depend on the pool's policy: the schema's if/then rule for it."""
    policy = pool.get("policy", "prefix")
    for rule in pool_schema.get("allOf", ()):
        cond = rule.get("if", {}).get("properties", {}).get("policy", {})
        if cond.get("const") == policy or policy in cond.get("enum", ()):
            return rule["then"]["properties"]["policy_options"]
    raise AssertionError(f"the schema has no policy_options rule for policy {policy!r}")


def schema_at(path: Path_, config: dict) -> dict:
    node, value = config_schema(), config
    for step in path:
        if isinstance(step, int):
            node = resolve(node["items"])
        elif step == "policy_options":
            node = policy_options_schema(node, value)
        else:
            node = resolve(node["properties"][step])
        value = value[step]
    return node


def mappings(tree: Any, path: Path_ = ()) -> Iterator[Path_]:
    """Paths of the mappings a user writes keys into (not secret references, not the
    free-form ones: kv_events.endpoints, cascade verifiers, telemetry.traces.headers)."""
    if isinstance(tree, dict):
        if len(tree) == 1 and set(tree) <= SECRET_FORMS:
            return
        yield path
        for k, v in tree.items():
            if k not in ("endpoints", "verifiers", "headers"):
                yield from mappings(v, (*path, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from mappings(v, (*path, i))


def wildcard(path: Path_) -> Path_:
    return tuple("*" if isinstance(s, int) else s for s in path)


def router_key(path: Path_) -> str:
    key = ""
    for step in path:
        key += f"[{step}]" if isinstance(step, int) else (f".{step}" if key else step)
    return key


def dig(tree: Any, path: Path_) -> Any:
    for step in path:
        tree = tree[step]
    return tree


def _cases() -> list[tuple[Path, Path_]]:
    """One (values file, path) per distinct place in the schema, over every example."""
    seen: dict[Path_, tuple[Path, Path_]] = {}
    for values in [CHART / "values.yaml", *CI_VALUES]:
        config = (yaml.safe_load(values.read_text())["router"] or {}).get("config") or {}
        for path in mappings(config):
            seen.setdefault(wildcard(path), (values, path))
    return list(seen.values())


CASES = _cases()


def _id(case: tuple[Path, Path_]) -> str:
    return f"{case[0].name}:" + (".".join(map(str, case[1])) or "<root>")


def schema_objects(node: dict, path: Path_ = ()) -> Iterator[Path_]:
    """Wildcard paths of every object with named keys that the config schema describes."""
    node = resolve(node)
    if is_secret(node):
        return
    if "properties" in node:
        yield path
        for k, sub in node["properties"].items():
            yield from schema_objects(sub, (*path, k))
    if "items" in node:
        yield from schema_objects(node["items"], (*path, "*"))


def test_examples_cover_the_whole_config_schema() -> None:
    missing = set(schema_objects(config_schema())) - {wildcard(p) for _, p in CASES}
    assert not missing, f"no ci/*-values.yaml sets anything under {sorted(missing)}"


def test_every_object_rejects_unknown_keys() -> None:
    """additionalProperties: false everywhere under router.config (types are checked too)."""
    def walk(node: dict, path: str) -> Iterator[str]:
        node = resolve(node)
        if "properties" in node and node.get("additionalProperties") is not False:
            yield path
        for k, sub in node.get("properties", {}).items():
            yield from walk(sub, f"{path}.{k}")
        if "items" in node:
            yield from walk(node["items"], f"{path}[]")
    assert not list(walk(config_schema(), "router.config"))
    for name, node in SCHEMA["definitions"].items():
        assert "properties" not in node or node.get("additionalProperties") is False, name


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_router_accepts_exactly_the_keys_the_schema_allows(helm, case) -> None:
    values, path = case
    config = raw_router_config(render(helm, values))
    dig(config, path)[TYPO] = 1
    with pytest.raises(ConfigError) as err:
        config_from_dict(config, local=Local(check=False))
    assert err.value.key == (f"{router_key(path)}.{TYPO}" if path else TYPO), str(err.value)
    found = re.search(r"valid(?: keys)?: (.+)$", str(err.value))
    assert found, f"the router's error lists no valid keys: {err.value}"
    router_keys = set(found.group(1).split(", "))
    schema_keys = set(schema_at(path, config)["properties"]) | CHART_OWNED.get(path, set())
    assert router_keys == schema_keys, (
        f"{router_key(path) or '<root>'}: only the router accepts {sorted(router_keys - schema_keys)}, "
        f"only the schema {sorted(schema_keys - router_keys)}")


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_schema_rejects_a_typo(helm, case, tmp_path) -> None:
    values, path = case
    tree = yaml.safe_load(values.read_text())
    dig(tree["router"]["config"], path)[TYPO] = 1
    vf = tmp_path / "values.yaml"
    vf.write_text(yaml.safe_dump(tree))
    proc = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", NS, "-f", str(vf), check=False)
    assert proc.returncode != 0, f"the schema accepted {TYPO} at {router_key(path)}"
    pointer = "/".join(["/router/config", *map(str, path)])
    assert f"at '{pointer}'" in proc.stderr and f"'{TYPO}' not allowed" in proc.stderr, proc.stderr
