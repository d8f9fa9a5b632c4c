"""The kill switch: halt everything, one agent, one tenant or one model, at once.

Entries come from the admin API (kept in the store, so with Redis every replica sees
them), from a file and from a URL (a YAML/JSON list of ``{scope, value, reason}``). The
router checks a local snapshot before every upstream call and between stream chunks, and
re-reads the sources at most every ``ttl_s`` (at most 5 s): on demand when a request
finds the snapshot stale, and from a background loop, so an idle replica is current too.

While the store cannot be read (``governance.on_store_error.kill_switch``), file and URL
entries still apply, and the store's entries are handled so that the switch never stops
working unnoticed:

- ``fail_closed`` (default): keep enforcing the last entries read from the store. A replica
  that has not read the store once since it started cannot know whether ``global`` is set
  (one that scaled up during the outage would otherwise serve an agent halted on every
  other replica), so it refuses requests (503 ``governance_unavailable``) until it has.
- ``fail_open``: ignore the store's entries until it answers again (availability over
  enforcement, logged once per outage).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from pathlib import Path

import aiohttp
import orjson
import yaml

from kvroute.router.errors import StoreUnavailable
from kvroute.router.governance.clock import Clock
from kvroute.router.governance.config import KillSwitchConfig
from kvroute.router.governance.store import Store

log = logging.getLogger(__name__)

KILL_SCOPES = ("global", "tenant", "agent", "model")


def entry_key(scope: str, value: str | None) -> str:
    if scope not in KILL_SCOPES:
        raise ValueError(f"scope must be one of {', '.join(KILL_SCOPES)}")
    if scope == "global":
        return "global"
    if not value:
        raise ValueError(f"a {scope} kill needs a value")
    return f"{scope}:{value}"


def _parse_entries(doc: object, source: str) -> dict[str, dict]:
    if isinstance(doc, dict):
        doc = doc.get("kills", [])
    out: dict[str, dict] = {}
    for e in doc if isinstance(doc, list) else []:
        if not isinstance(e, dict):
            continue
        try:
            key = entry_key(str(e.get("scope", "")), e.get("value"))
        except ValueError as exc:
            log.warning("kill switch %s: skipping entry %r: %s", source, e, exc)
            continue
        out[key] = {"reason": str(e.get("reason") or "halted by operator"), "source": source}
    return out


def _load_if_changed(path: Path, known_mtime: float | None) -> tuple[float, object] | None:
    """(mtime, parsed YAML) of the kill-switch file; None while its mtime is ``known_mtime``.
    Runs in an executor."""
    mtime = path.stat().st_mtime
    if mtime == known_mtime:
        return None
    return mtime, yaml.safe_load(path.read_text())


class KillSwitch:
    """``executor`` reads and parses the file and URL sources (None: the loop's default)."""

    def __init__(self, cfg: KillSwitchConfig, store: Store, clock: Clock, *, fail_open: bool = False,
                 executor: Executor | None = None):
        self._executor = executor
        self.cfg = cfg
        self.store = store
        self.clock = clock
        self.fail_open = fail_open  # on_store_error.kill_switch
        self.loaded = False  # the store's entries were read at least once since start
        self.store_ok = True  # the last read of the store succeeded
        self.active: dict[str, dict] = {}
        self._from_store: dict[str, dict] = {}
        self._from_file: dict[str, dict] = {}
        self._from_url: dict[str, dict] = {}
        self._file_mtime: float | None = None
        self._checked_at = -1e18

    def check(self, tenant: str, agent: str | None, model: str) -> tuple[str, dict] | None:
        """The entry that halts this request, if any (no I/O)."""
        if not self.active:
            return None
        for key in ("global", f"tenant:{tenant}", f"agent:{agent}" if agent else None, f"model:{model}"):
            if key and key in self.active:
                return key, self.active[key]
        return None

    @property
    def unverified(self) -> bool:
        """fail_closed, and the store's entries were never read: no request can be cleared."""
        return not self.fail_open and not self.loaded

    @property
    def store_state(self) -> str:
        """``ok``, ``stale`` (unreachable: last entries kept, or ignored under fail_open) or
        ``unknown`` (unreachable and never read since start)."""
        if self.store_ok and self.loaded:
            return "ok"
        return "stale" if self.loaded else "unknown"

    async def maybe_refresh(self) -> None:
        # Unverified: read now, even if another refresh (the poller's first) is in flight.
        if self.unverified or self.clock.time() - self._checked_at >= self.cfg.ttl_s:
            await self.refresh()

    async def refresh(self, session: aiohttp.ClientSession | None = None) -> None:
        """Re-read every source; a store that cannot be read is handled here, never raised."""
        self._checked_at = self.clock.time()
        try:
            raw = await self.store.kill_all()
        except StoreUnavailable:
            self._store_unreachable()
        else:
            self._from_store = {k: orjson.loads(v) for k, v in raw.items()}
            if not self.store_ok:
                log.warning("kill switch: the store answers again (%d entries)", len(self._from_store))
            self.store_ok = self.loaded = True
        if self.cfg.file:
            await self._read_file()
        if self.cfg.url and session is not None:
            await self._read_url(session)
        self._merge()

    def _store_unreachable(self) -> None:
        if self.store_ok:  # once per outage; kvroute_store_errors_total{op="kill_refresh"} counts every try
            if self.fail_open:
                log.error("kill switch: store unreachable, ignoring its %d entries until it answers "
                          "(on_store_error.kill_switch: fail_open); file and URL entries still apply",
                          len(self._from_store))
            elif self.loaded:
                log.error("kill switch: store unreachable, enforcing the %d entries last read from it",
                          len(self._from_store))
            else:
                log.error("kill switch: store unreachable and never read since start: refusing requests "
                          "until it answers (on_store_error.kill_switch: fail_closed)")
        self.store_ok = False
        if self.fail_open:
            self._from_store = {}

    async def _read_file(self) -> None:
        if self.cfg.file is None:
            return
        path = Path(self.cfg.file)
        loop = asyncio.get_running_loop()
        try:  # off the loop: a stat on a slow volume, or a large file to read and parse
            loaded = await loop.run_in_executor(self._executor, _load_if_changed, path, self._file_mtime)
            if loaded is None:
                return
            mtime, doc = loaded
            self._from_file = _parse_entries(doc, "file")
            self._file_mtime = mtime
        except FileNotFoundError:
            self._from_file, self._file_mtime = {}, None
        except (OSError, yaml.YAMLError) as exc:
            log.error("kill switch file %s unreadable, keeping the last entries: %s", path, exc)

    async def _read_url(self, session: aiohttp.ClientSession) -> None:
        if self.cfg.url is None:
            return
        try:
            async with session.get(self.cfg.url, timeout=aiohttp.ClientTimeout(total=self.cfg.ttl_s)) as resp:
                resp.raise_for_status()
                text = await resp.text()
            doc = await asyncio.get_running_loop().run_in_executor(self._executor, yaml.safe_load, text)
            self._from_url = _parse_entries(doc, "url")
        except (aiohttp.ClientError, TimeoutError, yaml.YAMLError) as exc:
            log.error("kill switch URL unreadable, keeping the last entries: %s", exc)

    def _merge(self) -> None:
        before = set(self.active)
        self.active = {**self._from_url, **self._from_file, **self._from_store}
        for key in set(self.active) - before:
            log.warning("kill switch ON for %s: %s", key, self.active[key]["reason"])
        for key in before - set(self.active):
            log.warning("kill switch OFF for %s", key)

    async def set(self, scope: str, value: str | None, reason: str) -> str:
        key = entry_key(scope, value)
        entry = {"reason": reason, "source": "admin", "at": self.clock.time()}
        await self.store.kill_set(key, orjson.dumps(entry).decode())
        self._from_store[key] = entry
        self._merge()
        return key

    async def clear(self, scope: str, value: str | None) -> bool:
        key = entry_key(scope, value)
        found = await self.store.kill_clear(key)
        self._from_store.pop(key, None)
        self._merge()
        return found

    def entries(self) -> list[dict]:
        out = []
        for key, e in sorted(self.active.items()):
            scope, _, value = key.partition(":")
            out.append({"scope": scope, "value": value or None, **e})
        return out
