"""CORS, for browser apps that call the router directly (``server.cors``; off by default).

A browser sends a preflight (``OPTIONS`` with ``Origin`` and
``Access-Control-Request-Method``) before a cross-origin ``POST`` with JSON or an
``Authorization`` header, and hides any answer that does not name its origin. With
``server.cors`` set:

- a preflight from an allowed origin, for a method the router serves and allowed headers,
  gets 204 with the ``Access-Control-Allow-*`` headers; any other preflight gets a 403
  that says what was refused (the browser then blocks the request);
- every answer to an allowed origin, errors and streams included, names the origin and
  exposes the router's own headers (``x-request-id``, ``x-kvroute-tier``, ``retry-after``,
  the ``x-ratelimit-*`` family), which a page cannot read otherwise.

The preflight is answered before anything else runs, so it needs no API key, as browsers
send none with it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from kvroute.router import validate as v
from kvroute.router.errors import ConfigError, Forbidden

METHODS = ("GET", "POST", "DELETE")  # what the router's routes answer
_ORIGIN = re.compile(r"^https?://[^/?#\s]+$")
_HEADER = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP token
# Readable by any page without being exposed (the Fetch standard's safelist), or of no use to it.
_NOT_EXPOSED = frozenset({"cache-control", "content-language", "content-length", "content-type", "expires",
                          "last-modified", "pragma", "vary", "date", "server", "connection", "transfer-encoding",
                          "content-encoding"})
# Headers kvroute may set; exposed with whatever else an answer carries.
_KVROUTE_HEADERS = ("x-request-id", "retry-after", "x-kvroute-tier", "x-kvroute-worker", "x-kvroute-session",
                    "x-kvroute-escalated", "x-kvroute-cache", "x-kvroute-cache-kind",
                    "x-kvroute-cache-similarity", "x-kvroute-predicted-cached-tokens", "x-kvroute-process")


@dataclass(frozen=True)
class CorsConfig:
    allow_origins: tuple[str, ...]  # lower-case origins, or "*" for any
    allow_headers: tuple[str, ...] = ("*",)  # lower-case request header names, or "*" for any
    allow_credentials: bool = False
    max_age_s: int = 600  # how long a browser may cache a preflight's answer


def parse_cors(raw: Any, key: str) -> CorsConfig | None:
    """``server.cors``: absent or null leaves CORS off."""
    if raw is None:
        return None
    raw = v.section(raw, ("allow_origins", "allow_headers", "allow_credentials", "max_age_s"), key)
    origins = v.str_list(raw.get("allow_origins"), v.join(key, "allow_origins"))
    if not origins:
        raise ConfigError(v.join(key, "allow_origins"), "required: the origins whose pages may call the "
                          "router, e.g. [https://chat.example.com], or ['*'] for any")
    for i, origin in enumerate(origins):
        if origin != "*" and not _ORIGIN.match(origin):
            raise ConfigError(v.join(v.join(key, "allow_origins"), i),
                              f"{origin!r} is not an origin: scheme://host[:port] with no path or trailing "
                              "slash (e.g. https://chat.example.com), or '*'")
    headers = v.str_list(raw.get("allow_headers"), v.join(key, "allow_headers")) or ("*",)
    for i, name in enumerate(headers):
        if name != "*" and not _HEADER.match(name):
            raise ConfigError(v.join(v.join(key, "allow_headers"), i), f"{name!r} is not a header name")
    d = CorsConfig(allow_origins=("*",))
    return CorsConfig(
        allow_origins=tuple(o.lower() for o in origins),
        allow_headers=tuple(h.lower() for h in headers),
        allow_credentials=v.get(raw, "allow_credentials", bool, key, d.allow_credentials),
        max_age_s=v.get(raw, "max_age_s", int, key, d.max_age_s, non_negative=True),
    )


class Cors:
    """The preflight middleware and the response hook, for one ``CorsConfig``."""

    def __init__(self, cfg: CorsConfig) -> None:
        self.cfg = cfg
        self._any_origin = "*" in cfg.allow_origins
        self._origins = frozenset(cfg.allow_origins)
        self._any_header = "*" in cfg.allow_headers
        self._headers = frozenset(cfg.allow_headers)

    def allowed(self, origin: str) -> bool:
        return self._any_origin or origin.lower() in self._origins

    def _origin_headers(self, origin: str) -> dict[str, str]:
        # "*" cannot carry credentials, and naming the origin means caches must key on it.
        if self._any_origin and not self.cfg.allow_credentials:
            return {"Access-Control-Allow-Origin": "*"}
        out = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        if self.cfg.allow_credentials:
            out["Access-Control-Allow-Credentials"] = "true"
        return out

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        headers = request.headers
        if request.method != "OPTIONS" or "Origin" not in headers or "Access-Control-Request-Method" not in headers:
            return await handler(request)
        return self.preflight(headers)

    def preflight(self, headers: Mapping[str, str]) -> web.Response:
        origin = headers["Origin"]
        method = headers["Access-Control-Request-Method"].strip().upper()
        asked = [h.strip().lower() for h in headers.get("Access-Control-Request-Headers", "").split(",") if h.strip()]
        if not self.allowed(origin):
            raise Forbidden(f"CORS: origin {origin!r} is not in server.cors.allow_origins", code="cors_forbidden")
        if method not in METHODS:
            raise Forbidden(f"CORS: method {method!r} is not served (the router answers {', '.join(METHODS)})",
                            code="cors_forbidden")
        refused = [h for h in asked if not self._any_header and h not in self._headers]
        if refused:
            raise Forbidden(f"CORS: request headers not in server.cors.allow_headers: {', '.join(refused)}",
                            code="cors_forbidden")
        out = self._origin_headers(origin)
        out["Access-Control-Allow-Methods"] = ", ".join(METHODS)
        if asked:
            out["Access-Control-Allow-Headers"] = ", ".join(asked)
        out["Access-Control-Max-Age"] = str(self.cfg.max_age_s)
        if "Vary" in out:
            out["Vary"] = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
        return web.Response(status=204, headers=out)

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """``app.on_response_prepare``: an answer to an allowed origin names it."""
        origin = request.headers.get("Origin")
        if origin is None or not self.allowed(origin) or "Access-Control-Allow-Origin" in response.headers:
            return
        for name, value in self._origin_headers(origin).items():
            if name == "Vary" and "Vary" in response.headers:
                value = f"{response.headers['Vary']}, {value}"
            response.headers[name] = value
        others = {h.lower() for h in response.headers} - _NOT_EXPOSED - set(_KVROUTE_HEADERS)
        others = {h for h in others if not h.startswith("access-control-")}
        response.headers["Access-Control-Expose-Headers"] = ", ".join([*_KVROUTE_HEADERS, *sorted(others)])
