"""TLS on both sides of the router.

- ``server.tls``: the router serves HTTPS with this certificate and key (every process of
  ``--procs N`` too). Without it, plain HTTP, for a mesh or an ingress that ends TLS.
- A pool's ``tls``: how the router checks its ``https://`` workers. ``ca_file`` trusts a
  private CA (a fleet's own) in place of the system's; ``cert_file`` and ``key_file`` are
  the router's client certificate, for workers behind mutual TLS; ``verify: false`` turns
  checking off, for a test fleet with self-signed certificates only.

Files are read when the config is loaded, so a wrong path or a PEM that does not parse
stops start-up with the key named, not the first request. They are read again when they
change (checked every ``reload_s``): certificates are renewed in place (cert-manager
rewrites a Secret's files), and one served past its end would fail every handshake. New
connections use the new files; a renewal that does not load is logged and the previous
certificate stays.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvroute.router import validate as v
from kvroute.router.errors import ConfigError
from kvroute.router.secrets import Local

log = logging.getLogger(__name__)
RELOAD_S = 60.0  # how often certificate files are checked for a change, by default


@dataclass(frozen=True)
class ServerTls:
    cert_file: str  # PEM: the certificate, then any intermediates
    key_file: str  # PEM: its private key, unencrypted
    reload_s: float = RELOAD_S  # how often the files are checked for a renewal


@dataclass(frozen=True)
class UpstreamTls:
    ca_file: str | None = None  # PEM bundle to trust instead of the system's CAs
    verify: bool = True  # false: no certificate or host name check (test fleets only)
    cert_file: str | None = None  # the router's client certificate, for mutual TLS
    key_file: str | None = None
    reload_s: float = RELOAD_S

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(f for f in (self.ca_file, self.cert_file, self.key_file) if f is not None)


def parse_server_tls(raw: Any, key: str, local: Local) -> ServerTls | None:
    if raw is None:
        return None
    raw = v.section(raw, ("cert_file", "key_file", "reload_s"), key)
    cfg = ServerTls(cert_file=local.path(v.required(raw, "cert_file", str, key, "the PEM certificate to serve"),
                                         v.join(key, "cert_file"), "no such file"),
                    key_file=local.path(v.required(raw, "key_file", str, key, "the certificate's PEM private key"),
                                        v.join(key, "key_file"), "no such file"),
                    reload_s=v.get(raw, "reload_s", float, key, RELOAD_S, positive=True))
    if local.check:
        _load_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cfg.cert_file, cfg.key_file, key)
    return cfg


def parse_upstream_tls(raw: Any, key: str, local: Local) -> UpstreamTls | None:
    if raw is None:
        return None
    raw = v.section(raw, ("ca_file", "verify", "cert_file", "key_file", "reload_s"), key)
    files = {k: local.path(p, v.join(key, k), "no such file") if (p := v.get(raw, k, str, key)) else None
             for k in ("ca_file", "cert_file", "key_file")}
    if (files["cert_file"] is None) != (files["key_file"] is None):
        missing = "key_file" if files["key_file"] is None else "cert_file"
        raise ConfigError(v.join(key, missing), "a client certificate needs both cert_file and key_file")
    cfg = UpstreamTls(verify=v.get(raw, "verify", bool, key, True),
                      reload_s=v.get(raw, "reload_s", float, key, RELOAD_S, positive=True), **files)
    if not cfg.verify and cfg.ca_file is not None:
        raise ConfigError(v.join(key, "ca_file"), "has no effect with verify: false; drop one of them")
    if local.check:
        client_context(cfg, key)
    return cfg


def server_context(cfg: ServerTls) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, cfg.cert_file, cfg.key_file, "server.tls")
    return ctx


def client_context(cfg: UpstreamTls | None, key: str = "tls") -> ssl.SSLContext | bool:
    """What aiohttp's ``ssl=`` takes: ``True`` is its default checking with the system's CAs."""
    if cfg is None:
        return True
    try:
        ctx = ssl.create_default_context(cafile=cfg.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(v.join(key, "ca_file"), f"not a PEM CA bundle: {exc}") from None
    if not cfg.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cfg.cert_file is not None and cfg.key_file is not None:
        _load_chain(ctx, cfg.cert_file, cfg.key_file, key)
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert_file: str, key_file: str, key: str) -> None:
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(v.join(key, "cert_file"), f"certificate and key do not load: {exc}") from None


Stamp = tuple[int, int, int] | None


def stamps(files: Sequence[str]) -> tuple[Stamp, ...]:
    """Each file's (inode, size, modification time), None where it cannot be read (mid-swap,
    or gone): what tells a renewed file from the one loaded."""
    out: list[Stamp] = []
    for f in files:
        try:
            st = os.stat(f)
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


class Refresher:
    """Calls ``load`` when any of ``files`` changes (a new inode, size or modification
    time: a Secret volume swaps a symlink, an editor rewrites the file)."""

    def __init__(self, files: Sequence[str], load: Callable[[], None], what: str) -> None:
        self.files, self.load, self.what = tuple(files), load, what
        self._seen = stamps(self.files)

    def check(self) -> None:
        """Reload if the files changed."""
        stamp = stamps(self.files)
        if stamp == self._seen or None in stamp:
            return
        self._seen = stamp
        try:
            self.load()
        except (OSError, ssl.SSLError, ConfigError) as exc:
            log.error("%s: %s changed but did not load, the previous certificate stays: %s", self.what,
                      ", ".join(self.files), getattr(exc, "message", exc))
            return
        log.info("%s: reloaded %s", self.what, ", ".join(self.files))

    async def run(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.check()


def server_refresher(ctx: ssl.SSLContext, cfg: ServerTls) -> Refresher:
    """New connections get the renewed certificate: it is loaded into the serving context,
    once a scratch context has shown that the pair loads (a half-loaded pair would fail
    every handshake)."""

    def load() -> None:
        _load_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cfg.cert_file, cfg.key_file, "server.tls")
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file)

    return Refresher((cfg.cert_file, cfg.key_file), load, "server.tls")
