"""The ``governance:`` section of the router config: tenants, budgets, kill switch, alerts.

Parsed into frozen dataclasses with the checks of ``router.config`` (``router/validate.py``):
unknown keys are errors and every error names its key, e.g.
``config key 'governance.budgets[1].scope'``.
An absent ``governance:`` key turns governance off; ``governance: {}`` turns it on with the
defaults below (one session budget, in-memory state, no API keys required).

Default per-session limits (a session is ``x-kvroute-session`` or the body's ``user``, else
one derived from the W3C trace ID or a conversation fingerprint: ``session_id``, see
``identity.py``): 20,000 tokens, 15 tool calls, $0.50 and 2 minutes of wall clock (the
wall clock only for sessions the client names).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvroute.router import validate as v
from kvroute.router.errors import ConfigError
from kvroute.router.secrets import Local

SCOPES = ("request", "session", "agent", "task", "feature", "user", "tenant", "global")
ACTIONS = ("reject", "throttle", "downgrade")
LOOP_ACTIONS = ("flag", "inject", "throttle", "halt")
TAGS = ("agent", "task", "feature", "user")
MATCH_KEYS = ("tenant", *TAGS)  # what a budget or rate limit may match on
SESSION_SOURCES = ("trace", "fingerprint")  # how a session is derived when the request names none
RATE_PER = ("key", "tenant", "agent", "model")
WINDOWS = {"hour": 3600, "day": 86400, "week": 7 * 86400}
DEFAULT_SESSION_BUDGET = "session-default"


@dataclass(frozen=True)
class Limits:
    tokens: int | None = None
    usd: float | None = None
    tool_calls: int | None = None
    wall_s: float | None = None  # session scope only: time since the session's first request


@dataclass(frozen=True)
class Budget:
    name: str
    scope: str
    limits: Limits
    window_s: int | None = None  # a rolling window: usage over the last window_s seconds
    buckets: int = 24  # the rolling window counts usage in this many sub-buckets
    action: str = "reject"
    soft: bool = False  # alert only, never enforce
    tenant: str | None = None  # only this tenant's requests
    throttle_at: float = 0.8  # throttle: delay requests once the budget is this full
    throttle_delay_s: float = 1.0
    downgrade_at: float = 1.0  # downgrade: move to the cheaper tier once the budget is this full
    # only requests whose tags have these values (tenant, agent, task, feature, user)
    match: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    overrides: tuple[str, ...] = ()  # budgets that do not apply to a request this one applies to

    def matches(self, tags: Mapping[str, str | None]) -> bool:
        if self.tenant is not None and tags.get("tenant") != self.tenant:
            return False
        return all(tags.get(k) in values for k, values in self.match.items())


@dataclass(frozen=True)
class SessionIdConfig:
    """How a request that names no session gets one (identity.derive_session)."""

    derive: tuple[str, ...] = SESSION_SOURCES  # tried in order; () is off
    ttl_s: float = 900.0  # a derived session's state is dropped this long after its last request


@dataclass(frozen=True)
class RateLimit:
    name: str
    per: str  # key, tenant, agent or model: one counter per value
    requests: int | None = None  # per window
    tokens: int | None = None  # prompt + max_tokens per window
    window_s: float = 60.0
    match: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def matches(self, tags: Mapping[str, str | None]) -> bool:
        return all(tags.get(k) in values for k, values in self.match.items())


@dataclass(frozen=True)
class Tenant:
    name: str
    keys: tuple[str, ...]


@dataclass(frozen=True)
class KillSwitchConfig:
    file: str | None = None  # YAML/JSON list of {scope, value, reason}, re-read every ttl_s
    url: str | None = None  # same document over HTTP(S)
    ttl_s: float = 2.0


WEBHOOK_FORMATS = ("generic", "slack")
ALERT_KINDS = ("threshold", "spend_spike", "loop_detected")  # a webhook's `kinds`, besides threshold_<pct>
SPIKE_DIMENSIONS = ("tenant", "agent", "feature")


@dataclass(frozen=True)
class Webhook:
    """One alert receiver: which alerts go to it, and how the payload looks."""

    url: str = field(repr=False)  # often carries a token
    kinds: tuple[str, ...] = ()  # alert kinds (threshold_70, threshold, spend_spike, loop_detected); () is all
    format: str = "generic"  # generic: the alert as JSON, or `template` filled in; slack: {"text": ...}
    template: Any = None  # JSON value whose strings may hold {kind}, {budget}, {ratio}, ... placeholders

    def wants(self, kind: str) -> bool:
        return not self.kinds or kind in self.kinds or (kind.startswith("threshold_") and "threshold" in self.kinds)


@dataclass(frozen=True)
class AlertConfig:
    thresholds: tuple[float, ...] = (0.7, 1.0, 1.2)
    spike_factor: float = 3.0  # current hour's spend over the rolling hourly average
    spike_baseline_hours: int = 24
    spike_by: tuple[str, ...] = ("tenant",)  # spike detection per tenant, agent and/or feature
    webhook_url: str | None = field(default=None, repr=False)  # often carries a token
    webhooks: tuple[Webhook, ...] = ()  # routed receivers; webhook_url is one more that takes every alert
    webhook_timeout_s: float = 2.0
    webhook_retries: int = 3
    webhook_queue: int = 1000

    @property
    def receivers(self) -> tuple[Webhook, ...]:
        extra = (Webhook(self.webhook_url),) if self.webhook_url else ()
        return extra + self.webhooks


@dataclass(frozen=True)
class LoopConfig:
    window: int = 5  # the session's last N requests
    ratio: float = 0.8  # more than this share calling one tool, or repeating one prompt
    action: str = "halt"
    throttle_delay_s: float = 2.0
    message: str = ("You appear to be repeating the same action. Stop, reconsider your approach, "
                    "and either try something different or finish with what you have.")


@dataclass(frozen=True)
class RedisConfig:
    url: str = field(repr=False)  # may carry a password
    prefix: str = "kvroute:gov"
    password: str | None = field(default=None, repr=False)
    # Every request waits on Redis before it reaches a worker, so a Redis that stops
    # answering must cost a bounded, small delay, not a hang. A healthy Redis answers the
    # reserve script in about a millisecond, and a TCP handshake on a LAN takes well under
    # one: half a second of silence means it is down (or stalled far beyond what a request
    # should wait), while a fork or fsync stall of a few hundred ms still passes.
    connect_timeout_s: float = 0.5
    timeout_s: float = 0.5


FAIL_MODES = ("fail_closed", "fail_open")


@dataclass(frozen=True)
class StoreErrorPolicy:
    """What a replica does while its store (Redis) cannot be reached (router/governance/guard.py).

    budgets: fail_closed refuses requests (503 governance_unavailable); fail_open admits
    them without a reservation (and without loop detection) and charges their usage when
    they finish, if the store is back by then.
    kill_switch: fail_closed keeps enforcing the last kill list read from the store, and
    refuses requests while it has never read one since start; fail_open ignores the
    store's list while it is unreachable. Both keep honouring kill_switch.file and .url.
    """

    budgets: str = "fail_closed"
    kill_switch: str = "fail_closed"


@dataclass(frozen=True)
class GovernanceConfig:
    tenants: tuple[Tenant, ...] = ()
    admin_keys: tuple[str, ...] = ()
    budgets: tuple[Budget, ...] = ()
    kill_switch: KillSwitchConfig = KillSwitchConfig()
    alerts: AlertConfig = AlertConfig()
    loops: LoopConfig = LoopConfig()
    redis: RedisConfig | None = None
    on_store_error: StoreErrorPolicy = StoreErrorPolicy()
    tag_values: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # metric label allow-list
    session_id: SessionIdConfig = SessionIdConfig()
    rate_limits: tuple[RateLimit, ...] = ()
    # Without a tokenizer the prompt is estimated (chars / 4) and reserved times this factor;
    # settlement charges the worker's exact usage.
    estimate_factor: float = 1.25
    default_max_tokens: int = 1024  # reserved when a request names no max_tokens
    # Each tenant's prompts get its own cache_salt: vLLM shares no cached block between
    # tenants, so none can tell from a fast first token what another sent.
    isolate_kv_cache: bool = False
    min_completion_tokens: int = 16  # below this much room a request is refused, not shrunk
    reservation_ttl_s: float = 900.0  # backstop: a reservation never settled expires
    session_ttl_s: float = 86400.0

    @property
    def open(self) -> bool:
        """No tenants: requests without an API key are allowed (and keys are not checked)."""
        return not self.tenants


def default_session_budget() -> Budget:
    return Budget(DEFAULT_SESSION_BUDGET, "session",
                  Limits(tokens=20_000, usd=0.50, tool_calls=15, wall_s=120.0))


# ---- parsing (the checks themselves are router/validate.py) ----------------------------


def _window(raw: Mapping[str, Any], key: str) -> int | None:
    if "window" in raw and "window_s" in raw:
        raise ConfigError(f"{key}.window", "give window or window_s, not both")
    if raw.get("window") is not None:
        w = raw["window"]
        if w not in WINDOWS:
            raise ConfigError(f"{key}.window", f"must be one of {', '.join(WINDOWS)} (or use window_s)")
        return WINDOWS[w]
    return v.get(raw, "window_s", int, key, positive=True)


def _parse_limits(raw: Any, key: str, scope: str) -> Limits:
    raw = v.section(raw, ("tokens", "usd", "tool_calls", "wall_s"), key)
    limits = Limits(tokens=v.get(raw, "tokens", int, key, positive=True),
                    usd=v.get(raw, "usd", float, key, positive=True),
                    tool_calls=v.get(raw, "tool_calls", int, key, positive=True),
                    wall_s=v.get(raw, "wall_s", float, key, positive=True))
    if limits == Limits():
        raise ConfigError(key, "give at least one of tokens, usd, tool_calls, wall_s")
    if limits.wall_s is not None and scope != "session":
        raise ConfigError(f"{key}.wall_s", "only a session budget has a wall-clock limit")
    if limits.tool_calls is not None and scope == "request":
        raise ConfigError(f"{key}.tool_calls", "a request budget cannot limit tool calls")
    return limits


def parse_match(raw: Any, key: str, allowed: tuple[str, ...] = MATCH_KEYS) -> dict[str, tuple[str, ...]]:
    """``{tag: value}`` or ``{tag: [values]}``: a request matches when each tag has one of them."""
    raw = v.section(raw, allowed, key)
    out = {}
    for k, x in raw.items():
        values = (x,) if isinstance(x, str) and x else v.str_list(x, f"{key}.{k}")
        if not values:
            raise ConfigError(f"{key}.{k}", "expected a non-empty string or list of strings")
        out[k] = values
    return out


def _parse_budget(raw: Any, key: str) -> Budget:
    raw = v.section(raw, ("name", "scope", "limit", "window", "window_s", "buckets", "action", "soft", "tenant",
                          "throttle_at", "throttle_delay_s", "downgrade_at", "match", "overrides"), key)
    d = Budget("", "", Limits())
    name = v.required(raw, "name", str, key)
    scope = v.get(raw, "scope", str, key, choices=SCOPES)
    limits = _parse_limits(raw.get("limit"), f"{key}.limit", scope)
    window_s = _window(raw, key)
    if window_s is not None and scope in ("request", "session"):
        raise ConfigError(f"{key}.window", f"a {scope} budget has no window")
    buckets = v.get(raw, "buckets", int, key, d.buckets, positive=True)
    if "buckets" in raw and window_s is None:
        raise ConfigError(f"{key}.buckets", "only a budget with a window has buckets")
    if buckets > 1440:
        raise ConfigError(f"{key}.buckets", "at most 1440")
    downgrade_at = v.get(raw, "downgrade_at", float, key, d.downgrade_at, positive=True)
    if downgrade_at > 1:
        raise ConfigError(f"{key}.downgrade_at", "must be at most 1 (a share of the budget)")
    action = v.get(raw, "action", str, key, d.action, choices=ACTIONS)
    if "downgrade_at" in raw and action != "downgrade":
        raise ConfigError(f"{key}.downgrade_at", "only a budget with action: downgrade has downgrade_at")
    return Budget(
        name=name,
        scope=scope,
        limits=limits,
        window_s=window_s,
        buckets=buckets,
        action=action,
        soft=v.get(raw, "soft", bool, key, d.soft),
        tenant=v.get(raw, "tenant", str, key, d.tenant),
        throttle_at=v.get(raw, "throttle_at", float, key, d.throttle_at, positive=True),
        throttle_delay_s=v.get(raw, "throttle_delay_s", float, key, d.throttle_delay_s, positive=True),
        downgrade_at=downgrade_at,
        match=parse_match(raw.get("match"), f"{key}.match"),
        overrides=v.str_list(raw.get("overrides"), f"{key}.overrides"),
    )


def _parse_session_id(raw: Any, key: str) -> SessionIdConfig:
    raw = v.section(raw, ("derive", "ttl_s"), key)
    d = SessionIdConfig()
    derive = raw.get("derive", list(d.derive))
    if derive == "off" or derive is False:
        derive = []
    if isinstance(derive, str):
        derive = [derive]
    sources = v.str_list(derive, f"{key}.derive")
    for s in sources:
        if s not in SESSION_SOURCES:
            raise ConfigError(f"{key}.derive", f"must be off or a list of {', '.join(SESSION_SOURCES)}")
    return SessionIdConfig(derive=sources, ttl_s=v.get(raw, "ttl_s", float, key, d.ttl_s, positive=True))


def _parse_rate_limit(raw: Any, key: str) -> RateLimit:
    raw = v.section(raw, ("name", "per", "requests_per_minute", "tokens_per_minute", "window_s", "match"), key)
    d = RateLimit("", "key")
    name = v.required(raw, "name", str, key)
    per = v.get(raw, "per", str, key, d.per, choices=RATE_PER)
    rpm = v.get(raw, "requests_per_minute", int, key, positive=True)
    tpm = v.get(raw, "tokens_per_minute", int, key, positive=True)
    if rpm is None and tpm is None:
        raise ConfigError(key, "give requests_per_minute, tokens_per_minute or both")
    window_s = v.get(raw, "window_s", float, key, d.window_s, positive=True)
    if window_s > 3600:
        raise ConfigError(f"{key}.window_s", "must be at most 3600 seconds")
    scale = window_s / 60.0  # the limits are per minute; a window counts its share of them
    return RateLimit(name=name, per=per, window_s=window_s, match=parse_match(raw.get("match"), f"{key}.match"),
                     requests=None if rpm is None else max(1, round(rpm * scale)),
                     tokens=None if tpm is None else max(1, round(tpm * scale)))


def _parse_tenants(value: Any, key: str, local: Local) -> list[Tenant]:
    out = []
    for i, t in enumerate(v.items(value, key, "expected a list of {name, keys}")):
        tkey = f"{key}[{i}]"
        t = v.section(t, ("name", "keys"), tkey)
        name = v.required(t, "name", str, tkey)
        keys = v.secret_list(t.get("keys"), f"{tkey}.keys", local)
        if not keys:
            raise ConfigError(f"{tkey}.keys", "required: at least one API key")
        out.append(Tenant(name, keys))
    return out


def _read_keys_file(path: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(path, str):
        raise ConfigError(key, "expected a file path")
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"invalid YAML in {path}") from exc
    return v.section(raw, ("tenants", "admin_keys"), key)


def _parse_webhook(raw: Any, key: str, local: Local) -> Webhook:
    raw = v.section(raw, ("url", "kinds", "format", "template"), key)
    if raw.get("url") is None:
        raise ConfigError(f"{key}.url", "required: an http(s) URL")
    url = local.secret(raw["url"], f"{key}.url")
    if local.check or isinstance(raw["url"], str):  # a reference is checked once resolved
        v.http_url(url, f"{key}.url", secret=True)
    kinds = v.str_list(raw.get("kinds"), f"{key}.kinds")
    for kind in kinds:
        if kind not in ALERT_KINDS and not (kind.startswith("threshold_") and kind[10:].isdigit()):
            raise ConfigError(f"{key}.kinds", f"unknown alert kind {kind!r}; valid: {', '.join(ALERT_KINDS)} or "
                              "threshold_<percent>, e.g. threshold_70")
    fmt = v.get(raw, "format", str, key, "generic", choices=WEBHOOK_FORMATS)
    template = raw.get("template")
    if template is not None and not isinstance(template, (dict, list, str)):
        raise ConfigError(f"{key}.template", "expected a JSON object, list or string")
    if template is not None and fmt == "slack" and not isinstance(template, str):
        raise ConfigError(f"{key}.template", "a slack webhook's template is the message text (a string)")
    return Webhook(url=url, kinds=kinds, format=fmt, template=template)


def _parse_alerts(raw: Any, key: str, local: Local) -> AlertConfig:
    raw = v.section(raw, ("thresholds", "spike_factor", "spike_baseline_hours", "spike_by", "webhook_url",
                          "webhooks", "webhook_timeout_s", "webhook_retries", "webhook_queue"), key)
    d = AlertConfig()
    thresholds = d.thresholds
    if raw.get("thresholds") is not None:
        thresholds = tuple(sorted(v.number_list(
            raw["thresholds"], f"{key}.thresholds", "expected a list of positive ratios, e.g. [0.7, 1.0, 1.2]",
            lambda ts: bool(ts) and all(t > 0 for t in ts))))
    url = None
    if raw.get("webhook_url") is not None:
        url = local.secret(raw["webhook_url"], f"{key}.webhook_url")
        if local.check or isinstance(raw["webhook_url"], str):  # a reference is checked once resolved
            v.http_url(url, f"{key}.webhook_url", secret=True)
    hooks = v.items(raw.get("webhooks"), f"{key}.webhooks", "expected a list of {url, on, format, template}")
    spike_by = v.str_list(raw.get("spike_by"), f"{key}.spike_by") or d.spike_by
    for dim in spike_by:
        if dim not in SPIKE_DIMENSIONS:
            raise ConfigError(f"{key}.spike_by", f"must be a list of {', '.join(SPIKE_DIMENSIONS)}")
    return AlertConfig(
        thresholds=thresholds,
        spike_factor=v.get(raw, "spike_factor", float, key, d.spike_factor, positive=True),
        spike_baseline_hours=v.get(raw, "spike_baseline_hours", int, key, d.spike_baseline_hours, positive=True),
        spike_by=spike_by,
        webhook_url=url,
        webhooks=tuple(_parse_webhook(h, f"{key}.webhooks[{i}]", local) for i, h in enumerate(hooks)),
        webhook_timeout_s=v.get(raw, "webhook_timeout_s", float, key, d.webhook_timeout_s, positive=True),
        webhook_retries=v.get(raw, "webhook_retries", int, key, d.webhook_retries, non_negative=True),
        webhook_queue=v.get(raw, "webhook_queue", int, key, d.webhook_queue, positive=True),
    )


def _parse_loops(raw: Any, key: str) -> LoopConfig:
    raw = v.section(raw, ("window", "ratio", "action", "throttle_delay_s", "message"), key)
    d = LoopConfig()
    action = v.get(raw, "action", str, key, d.action, choices=LOOP_ACTIONS)
    ratio = v.get(raw, "ratio", float, key, d.ratio, positive=True)
    if ratio >= 1:
        raise ConfigError(f"{key}.ratio", "must be below 1")
    window = v.get(raw, "window", int, key, d.window, positive=True)
    if window < 2:
        raise ConfigError(f"{key}.window", "must be at least 2")
    return LoopConfig(window=window, ratio=ratio, action=action,
                      throttle_delay_s=v.get(raw, "throttle_delay_s", float, key, d.throttle_delay_s, positive=True),
                      message=v.get(raw, "message", str, key, d.message))


def _parse_kill(raw: Any, key: str) -> KillSwitchConfig:
    raw = v.section(raw, ("file", "url", "ttl_s"), key)
    d = KillSwitchConfig()
    ttl = v.get(raw, "ttl_s", float, key, d.ttl_s, positive=True)
    if ttl > 5:
        raise ConfigError(f"{key}.ttl_s", "must be at most 5 seconds")
    url = v.get(raw, "url", str, key)
    if url is not None:
        v.http_url(url, f"{key}.url")
    return KillSwitchConfig(file=v.get(raw, "file", str, key), url=url, ttl_s=ttl)


def _parse_redis(raw: Any, key: str, local: Local) -> RedisConfig:
    raw = v.section(raw, ("url", "prefix", "password", "connect_timeout_s", "timeout_s"), key)
    if raw.get("url") is None:
        raise ConfigError(f"{key}.url", "required: a redis:// URL")
    url = local.secret(raw["url"], f"{key}.url")
    literal = isinstance(raw["url"], str)  # a reference is checked once resolved
    if (local.check or literal) and not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"{key}.url", "required: a redis:// URL")
    password = None if raw.get("password") is None else local.secret(raw["password"], f"{key}.password")
    d = RedisConfig(url="")
    return RedisConfig(url=url, prefix=v.get(raw, "prefix", str, key, d.prefix), password=password,
                       connect_timeout_s=_timeout(raw, "connect_timeout_s", key, d.connect_timeout_s),
                       timeout_s=_timeout(raw, "timeout_s", key, d.timeout_s))


def _timeout(raw: Mapping[str, Any], name: str, key: str, default: float) -> float:
    value = v.get(raw, name, float, key, default, positive=True)
    if value > 30:  # beyond this a hung Redis holds requests as if there were no timeout
        raise ConfigError(f"{key}.{name}", "must be at most 30 seconds")
    return value


def _parse_store_errors(raw: Any, key: str) -> StoreErrorPolicy:
    raw = v.section(raw, ("budgets", "kill_switch"), key)
    d = StoreErrorPolicy()
    return StoreErrorPolicy(budgets=v.get(raw, "budgets", str, key, d.budgets, choices=FAIL_MODES),
                            kill_switch=v.get(raw, "kill_switch", str, key, d.kill_switch, choices=FAIL_MODES))


def _parse_tag_values(raw: Any, key: str) -> dict[str, tuple[str, ...]]:
    raw = v.section(raw, TAGS, key)
    return {k: v.str_list(x, f"{key}.{k}") for k, x in raw.items()}


def parse_governance(raw: Any, key: str = "governance", *, local: Local = Local()) -> GovernanceConfig:
    """Validate the ``governance:`` mapping into a ``GovernanceConfig``."""
    raw = v.section(raw, ("tenants", "keys_file", "admin_keys", "budgets", "kill_switch", "alerts", "loops",
                          "redis", "on_store_error", "tag_values", "default_max_tokens", "min_completion_tokens",
                          "reservation_ttl_s", "session_ttl_s", "session_id", "rate_limits", "estimate_factor",
                          "isolate_kv_cache"), key)
    tenants = _parse_tenants(raw.get("tenants"), f"{key}.tenants", local)
    admin = list(v.secret_list(raw.get("admin_keys"), f"{key}.admin_keys", local))
    if raw.get("keys_file") is not None and not local.check:
        if not isinstance(raw["keys_file"], str):
            raise ConfigError(f"{key}.keys_file", "expected a file path")
    elif raw.get("keys_file") is not None:
        fkey = f"{key}.keys_file"
        secret = _read_keys_file(raw["keys_file"], fkey)
        tenants += _parse_tenants(secret.get("tenants"), f"{fkey}:tenants", local)
        admin += v.str_list(secret.get("admin_keys"), f"{fkey}:admin_keys")
    v.unique([t.name for t in tenants], lambda i: f"{key}.tenants[{i}].name", "tenant")
    seen: set[str] = set()
    for i, t in enumerate(tenants):
        for k in t.keys:
            if k in seen or k in admin:
                raise ConfigError(f"{key}.tenants[{i}].keys", "an API key is listed twice")
            seen.add(k)
    budgets_raw = v.items(raw.get("budgets"), f"{key}.budgets", "expected a list of budgets")
    budgets = [_parse_budget(b, f"{key}.budgets[{i}]") for i, b in enumerate(budgets_raw)]
    v.unique([b.name for b in budgets], lambda i: f"{key}.budgets[{i}].name", "budget")
    # The default session limits apply unless a session budget covers every request; a
    # tenant's or agent's own session budget overrides them by naming them in `overrides`.
    if not any(b.scope == "session" and b.tenant is None and not b.match for b in budgets):
        budgets.insert(0, default_session_budget())
    names = {b.name for b in budgets}
    offset = len(budgets) - len(budgets_raw)  # the default session budget, when it was added
    for i in range(len(budgets_raw)):
        for name in budgets[i + offset].overrides:
            if name not in names:
                raise ConfigError(f"{key}.budgets[{i}].overrides", f"no budget named {name!r}")
    rates_raw = v.items(raw.get("rate_limits"), f"{key}.rate_limits", "expected a list of rate limits")
    rates = [_parse_rate_limit(r, f"{key}.rate_limits[{i}]") for i, r in enumerate(rates_raw)]
    v.unique([r.name for r in rates], lambda i: f"{key}.rate_limits[{i}].name", "rate limit")
    factor = v.get(raw, "estimate_factor", float, key, GovernanceConfig.estimate_factor, positive=True)
    if factor < 1 or factor > 4:
        raise ConfigError(f"{key}.estimate_factor", "must be between 1 and 4")
    d = GovernanceConfig()
    isolate = v.get(raw, "isolate_kv_cache", bool, key, d.isolate_kv_cache)
    if isolate and not tenants and raw.get("keys_file") is None:
        raise ConfigError(f"{key}.isolate_kv_cache", "needs tenants (tenants or keys_file) to isolate")
    return GovernanceConfig(
        tenants=tuple(tenants),
        isolate_kv_cache=isolate,
        admin_keys=tuple(admin),
        budgets=tuple(budgets),
        kill_switch=_parse_kill(raw.get("kill_switch"), f"{key}.kill_switch"),
        alerts=_parse_alerts(raw.get("alerts"), f"{key}.alerts", local),
        loops=_parse_loops(raw.get("loops"), f"{key}.loops"),
        redis=None if raw.get("redis") is None else _parse_redis(raw["redis"], f"{key}.redis", local),
        on_store_error=_parse_store_errors(raw.get("on_store_error"), f"{key}.on_store_error"),
        tag_values=_parse_tag_values(raw.get("tag_values"), f"{key}.tag_values"),
        default_max_tokens=v.get(raw, "default_max_tokens", int, key, d.default_max_tokens, positive=True),
        min_completion_tokens=v.get(raw, "min_completion_tokens", int, key, d.min_completion_tokens,
                                    positive=True),
        reservation_ttl_s=v.get(raw, "reservation_ttl_s", float, key, d.reservation_ttl_s, positive=True),
        session_ttl_s=v.get(raw, "session_ttl_s", float, key, d.session_ttl_s, positive=True),
        session_id=_parse_session_id(raw.get("session_id"), f"{key}.session_id"),
        rate_limits=tuple(rates),
        estimate_factor=factor,
    )
