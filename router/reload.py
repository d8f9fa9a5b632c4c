"""SIGHUP: re-read the config file and apply its worker lists and API keys, without a restart.

With ``discovery.source: static`` the ``workers`` of each model (or tier) are the fleet. An
operator who adds or retires a worker edits the file and sends SIGHUP (``systemctl reload``,
``kill -HUP``; the supervisor of ``--procs N`` passes it to every process). Each pool's
members become the new list the way discovery changes them: workers that stay keep their
health, breaker and index entries, new ones join at once, and one that leaves finishes the
requests it has in flight.

Keys are applied too, so that a leaked one can be revoked at once: governance's tenant
and admin keys (``keys_file`` included), and each pool's ``api_key`` for its workers
(secret files are read again).

The secret files the config names (``{file: PATH}`` references, ``governance.keys_file``)
are watched as well (``watch_secrets``): when one changes, as a Kubernetes Secret's mounted
files do after an update, the config is reloaded as SIGHUP would.

Nothing else is applied live. A file that does not load is refused whole, with the key
named, and the router goes on with what it had. Other changes (a policy, a budget, a new
model) are named in a warning: they take effect at the next restart.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from kvroute.router import keys
from kvroute.router.config import ModelConfig, RouterConfig, load_config
from kvroute.router.errors import ConfigError
from kvroute.router.tls import stamps

log = logging.getLogger(__name__)
SECRETS_CHECK_S = 60.0  # how often the secret files a config names are checked for a change


async def reload(app: web.Application, path: str | Path, why: str = "SIGHUP") -> str:
    """Apply ``path``'s worker lists and keys to ``app``; returns the outcome for
    ``kvroute_config_reloads_total``: ``applied``, ``unchanged`` or ``failed``. ``why``
    starts its log lines."""
    metrics = app[keys.METRICS]
    try:  # read and checked off the loop (files, tokenizer folders, certificates); applied on it
        new = await asyncio.get_running_loop().run_in_executor(None, load_config, path)
    except ConfigError as exc:
        log.error("%s: %s not reloaded, the running config stays: %s", why, path, exc.message)
        metrics.config_reloads.labels("failed").inc()
        return "failed"
    old = app[keys.CONFIG]
    routes = app[keys.ROUTES]
    changed: list[str] = []
    for key, pool in {p.key: p for m in new.models for p in m.pools}.items():
        route = routes.by_key.get(key)
        if route is None:
            continue  # a new model or tier: named below
        before = {w.url for w in route.pool.all()}
        if old.discovery.source == "static" and before != set(pool.workers):  # another order changes nothing
            route.pool.set_members([(url, pool.tier) for url in pool.workers])
            added = [u for u in pool.workers if u not in before]
            gone = sorted(before - set(pool.workers))
            changed.append(f"{key}: +{len(added)} -{len(gone)} ({', '.join(added + [f'-{u}' for u in gone])})")
        if route.pool.api_key != pool.api_key:
            route.pool.set_api_key(pool.api_key)
            changed.append(f"{key}: api_key")  # never the key itself
    gov = app.get(keys.GOVERNOR)
    if gov is not None and new.governance is not None and (
            (gov.cfg.tenants, gov.cfg.admin_keys) != (new.governance.tenants, new.governance.admin_keys)):
        gov.set_keys(new.governance.tenants, new.governance.admin_keys)
        changed.append(f"governance: keys of {len(new.governance.tenants)} tenants and "
                       f"{len(new.governance.admin_keys)} admin keys")
    later = _needs_restart(old, new)
    if later:
        log.warning("%s: %s changes %s; these take effect at the next restart", why, path, ", ".join(later))
    if changed:
        log.info("%s: %s reloaded: %s", why, path, "; ".join(changed))
    else:
        log.info("%s: %s reloaded, no worker list or key changed", why, path)
    outcome = "applied" if changed else "unchanged"
    metrics.config_reloads.labels(outcome).inc()
    return outcome


def _needs_restart(old: RouterConfig, new: RouterConfig) -> list[str]:
    """The config's sections (and models) that differ beyond what a reload applies."""
    if old.governance is not None and new.governance is not None:  # its keys are applied
        old = replace(old, governance=replace(old.governance, tenants=(), admin_keys=()))
        new = replace(new, governance=replace(new.governance, tenants=(), admin_keys=()))
    out = [f.name for f in fields(RouterConfig) if f.name != "models" and getattr(old, f.name) != getattr(new, f.name)]
    before = {m.name: _live_parts_dropped(m) for m in old.models}
    after = {m.name: _live_parts_dropped(m) for m in new.models}
    out += [f"models[{name!r}]" for name in sorted(before.keys() | after.keys()) if before.get(name) != after.get(name)]
    if old.discovery.source != "static" and _workers(old) != _workers(new):
        out.append(f"workers (with discovery.source {old.discovery.source}, discovery owns the worker lists)")
    return out


def _workers(cfg: RouterConfig) -> dict[str, tuple[str, ...]]:
    return {p.key: p.workers for m in cfg.models for p in m.pools}


def _live_parts_dropped(m: ModelConfig) -> Any:
    return replace(m, workers=(), api_key=None, tiers=tuple(replace(t, workers=(), api_key=None) for t in m.tiers))


async def watch_secrets(app: web.Application, path: str | Path, interval_s: float = SECRETS_CHECK_S) -> None:
    """Reload ``path`` (as SIGHUP does) whenever a secret file it names changes; until cancelled."""
    loop = asyncio.get_running_loop()
    files = await loop.run_in_executor(None, secret_files, path)
    seen = stamps(files)
    while True:
        await asyncio.sleep(interval_s)
        now = await loop.run_in_executor(None, secret_files, path)  # the file may name others by now
        stamp = stamps(now)
        if now == files and stamp != seen and None not in stamp:
            changed = [f for f, a, b in zip(files, seen, stamp, strict=True) if a != b]
            await reload(app, path, why=f"{', '.join(changed)} changed")
        files, seen = now, stamp


def secret_files(path: str | Path) -> list[str]:
    """The files ``path``'s config reads secrets from: every ``{file: PATH}`` reference and
    ``governance.keys_file``; none when the file does not load."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return []
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if len(node) == 1 and isinstance(node.get("file"), str):
                found.append(node["file"])
            for key, value in node.items():
                if key == "keys_file" and isinstance(value, str):
                    found.append(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(raw)
    return sorted(set(found))
