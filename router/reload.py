"""SIGHUP: re-read the config file and apply its worker lists, without a restart.

With ``discovery.source: static`` the ``workers`` of each model (or tier) are the fleet. An
operator who adds or retires a worker edits the file and sends SIGHUP (``systemctl reload``,
``kill -HUP``; the supervisor of ``--procs N`` passes it to every process). Each pool's
members become the new list the way discovery changes them: workers that stay keep their
health, breaker and index entries, new ones join at once, and one that leaves finishes the
requests it has in flight.

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

from aiohttp import web

from kvroute.router import keys
from kvroute.router.config import ModelConfig, RouterConfig, load_config
from kvroute.router.errors import ConfigError

log = logging.getLogger(__name__)


async def reload(app: web.Application, path: str | Path) -> str:
    """Apply ``path``'s worker lists to ``app``'s pools; returns the outcome for
    ``kvroute_config_reloads_total``: ``applied``, ``unchanged`` or ``failed``."""
    metrics = app[keys.METRICS]
    try:  # read and checked off the loop (files, tokenizer folders, certificates); applied on it
        new = await asyncio.get_running_loop().run_in_executor(None, load_config, path)
    except ConfigError as exc:
        log.error("SIGHUP: %s not reloaded, the running config stays: %s", path, exc.message)
        metrics.config_reloads.labels("failed").inc()
        return "failed"
    old = app[keys.CONFIG]
    routes = app[keys.ROUTES]
    changed: list[str] = []
    pools = {p.key: p for m in new.models for p in m.pools}
    if old.discovery.source == "static":
        for key, pool in pools.items():
            route = routes.by_key.get(key)
            if route is None:
                continue  # a new model or tier: named below
            members = route.pool.all()
            if [w.url for w in members] != list(pool.workers):
                before = {w.url for w in members}
                route.pool.set_members([(url, pool.tier) for url in pool.workers])
                added = [u for u in pool.workers if u not in before]
                gone = sorted(before - set(pool.workers))
                changed.append(f"{key}: +{len(added)} -{len(gone)} ({', '.join(added + [f'-{u}' for u in gone])})")
    later = _needs_restart(old, new)
    if later:
        log.warning("SIGHUP: %s changes %s; these take effect at the next restart", path, ", ".join(later))
    if changed:
        log.info("SIGHUP: %s reloaded, workers: %s", path, "; ".join(changed))
    else:
        log.info("SIGHUP: %s reloaded, no worker list changed", path)
    outcome = "applied" if changed else "unchanged"
    metrics.config_reloads.labels(outcome).inc()
    return outcome


def _needs_restart(old: RouterConfig, new: RouterConfig) -> list[str]:
    """The config's sections (and models) that differ beyond the worker lists."""
    out = [f.name for f in fields(RouterConfig) if f.name != "models" and getattr(old, f.name) != getattr(new, f.name)]
    before = {m.name: _without_workers(m) for m in old.models}
    after = {m.name: _without_workers(m) for m in new.models}
    out += [f"models[{name!r}]" for name in sorted(before.keys() | after.keys()) if before.get(name) != after.get(name)]
    if old.discovery.source != "static" and _workers(old) != _workers(new):
        out.append(f"workers (with discovery.source {old.discovery.source}, discovery owns the worker lists)")
    return out


def _workers(cfg: RouterConfig) -> dict[str, tuple[str, ...]]:
    return {p.key: p.workers for m in cfg.models for p in m.pools}


def _without_workers(m: ModelConfig) -> Any:
    return replace(m, workers=(), tiers=tuple(replace(t, workers=()) for t in m.tiers))
