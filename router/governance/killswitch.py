"""The kill switch: halt everything, one agent, one tenant or one model, at once.

Entries come from the admin API (kept in the store, so with Redis every replica sees
them), from a file and from a URL (a YAML/JSON list of ``{scope, value, reason}``). The
router checks a local snapshot before every upstream call and between stream chunks, and
re-reads the sources at most every ``ttl_s`` (at most 5 s): on demand when a request
finds the snapshot stale, and from a background loop, so an idle replica is current too.
"""

from __future__ import annotations

import logging
from pathlib import Path

import aiohttp
import orjson
import yaml

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


class KillSwitch:
    def __init__(self, cfg: KillSwitchConfig, store: Store, clock: Clock):
        self.cfg = cfg
        self.store = store
        self.clock = clock
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

    async def maybe_refresh(self) -> None:
        if self.clock.time() - self._checked_at >= self.cfg.ttl_s:
            await self.refresh()

    async def refresh(self, session: aiohttp.ClientSession | None = None) -> None:
        self._checked_at = self.clock.time()
        raw = await self.store.kill_all()
        self._from_store = {k: orjson.loads(v) for k, v in raw.items()}
        if self.cfg.file:
            self._read_file()
        if self.cfg.url and session is not None:
            await self._read_url(session)
        self._merge()

    def _read_file(self) -> None:
        if self.cfg.file is None:
            return
        path = Path(self.cfg.file)
        try:
            mtime = path.stat().st_mtime
            if mtime == self._file_mtime:
                return
            self._from_file = _parse_entries(yaml.safe_load(path.read_text()), "file")
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
                self._from_url = _parse_entries(yaml.safe_load(await resp.text()), "url")
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
