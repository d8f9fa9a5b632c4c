"""Who is calling and what for: API keys to tenants, attribution tags, W3C trace context,
and the session a request belongs to.

Keys are compared by their SHA-256 digest, so the table holds no key in the clear and a
lookup takes the same time whatever the key. Keys are never logged; rate limits and
derived sessions use ``key_id``, a prefix of the digest.

A request names its session with ``x-kvroute-session`` or the body's ``user``. When it
names none, ``derive_session`` makes one from the sources in ``governance.session_id.derive``,
in order, so that the default session limits and loop detection protect agents that send
no labels:

- ``trace``: the client's W3C ``traceparent`` trace ID (one agent run is usually one trace):
  ``trace:<trace id>``.
- ``fingerprint``: the API key plus a hash of the conversation's opening, its system
  prompt(s) and first user message (a completion: the prompt's first 4 KiB), which stay
  the same while an agent's conversation grows: ``fp:<hash>``. Conversations that open
  with the same words under the same key share it.

The source is in the spend log (``session_source``: header, user, trace, fingerprint).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from kvroute.router.errors import Forbidden, Unauthorized
from kvroute.router.governance.config import TAGS, GovernanceConfig
from kvroute.router.prefix import normalize_content

ANONYMOUS = "anonymous"
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_MAX_TAG = 128


@dataclass(frozen=True)
class Caller:
    tenant: str  # ANONYMOUS when governance has no tenants
    admin: bool = False


@dataclass(frozen=True)
class Attribution:
    """The tags every request's spend record carries."""

    tenant: str
    agent: str | None = None
    task: str | None = None
    feature: str | None = None
    user: str | None = None
    session: str | None = None
    trace_id: str | None = None
    key_id: str = "none"  # a prefix of the API key's SHA-256, for rate limits (never the key)
    session_source: str | None = None  # header, user, trace or fingerprint

    @property
    def derived_session(self) -> bool:
        return self.session_source in ("trace", "fingerprint")

    def tag(self, name: str) -> str | None:
        return getattr(self, name)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Authenticator:
    def __init__(self, cfg: GovernanceConfig):
        self.open = cfg.open
        self._tenants = {_digest(k): t.name for t in cfg.tenants for k in t.keys}
        self._admin = {_digest(k) for k in cfg.admin_keys}

    @staticmethod
    def bearer(authorization: str | None) -> str | None:
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        return token.strip() or None if scheme.lower() == "bearer" else None

    def caller(self, authorization: str | None) -> Caller | None:
        """The tenant or admin a key belongs to; None without a key; 401 for a bad key."""
        key = self.bearer(authorization)
        if key is None:
            if authorization:
                raise Unauthorized("The Authorization header must be 'Bearer <API key>'.")
            return None
        d = _digest(key)
        if d in self._admin:
            return Caller(ANONYMOUS, admin=True)
        tenant = self._tenants.get(d)
        if tenant is None:
            raise Unauthorized("Incorrect API key provided.")
        return Caller(tenant)

    def tenant_of(self, authorization: str | None) -> str:
        """For the completion routes: the caller's tenant, or 401."""
        caller = self.caller(authorization)
        if caller is None:
            if self.open:
                return ANONYMOUS
            raise Unauthorized("You didn't provide an API key (Authorization: Bearer <key>).")
        if caller.admin and not self.open:
            raise Forbidden("An admin key cannot make completion requests; use a tenant key.")
        return caller.tenant

    def require_admin(self, authorization: str | None) -> None:
        caller = self.caller(authorization)
        if caller is None or not caller.admin:
            if not self._admin:
                raise Forbidden("The admin API is disabled: configure governance.admin_keys.")
            if caller is None:
                raise Unauthorized("The admin API needs an admin key (Authorization: Bearer <key>).")
            raise Forbidden("This key is not an admin key.")


def trace_id(traceparent: str | None) -> str | None:
    m = _TRACEPARENT.match(traceparent or "")
    return m.group(1) if m else None


def new_traceparent() -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def key_id(authorization: str | None) -> str:
    key = Authenticator.bearer(authorization)
    return _digest(key).hex()[:16] if key else "none"


def _opening(body: dict) -> str:
    """The part of a conversation that stays the same while it grows."""
    messages = body.get("messages")
    if isinstance(messages, list):
        system, first_user = [], ""
        for m in messages:
            if not isinstance(m, dict):
                continue
            if m.get("role") in ("system", "developer"):
                system.append(normalize_content(m.get("content")))
            elif m.get("role") == "user":
                first_user = normalize_content(m.get("content"))
                break
        return "\x1e".join([*system, "\x1f", first_user])
    prompt = body.get("prompt")
    return prompt[:4096] if isinstance(prompt, str) else repr(prompt)[:4096]


def derive_session(sources: tuple[str, ...], client_trace: str | None, kid: str, tenant: str,
                   body: dict) -> tuple[str | None, str | None]:
    """(session, source) for a request that names no session; (None, None) when no source applies."""
    for source in sources:
        if source == "trace" and client_trace:
            return f"trace:{client_trace}", "trace"
        if source == "fingerprint":
            h = hashlib.blake2b(f"{tenant}\x1d{kid}\x1d{_opening(body)}".encode(), digest_size=12)
            return f"fp:{h.hexdigest()}", "fingerprint"
    return None, None


def attribution(tenant: str, headers: Mapping[str, str], session: str | None, *, kid: str = "none",
                source: str | None = None) -> Attribution:
    tags = {}
    for name in TAGS:
        value = headers.get(f"x-kvroute-{name}")
        tags[name] = value[:_MAX_TAG] if value else None
    return Attribution(tenant=tenant, session=session[:_MAX_TAG] if session else None,
                       trace_id=trace_id(headers.get("traceparent")), key_id=kid,
                       session_source=source if session else None, **tags)
