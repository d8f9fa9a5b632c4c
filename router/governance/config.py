"""The ``governance:`` section of the router config: tenants, budgets, kill switch, alerts.

Parsed into frozen dataclasses with the same rules as ``router.config``: unknown keys are
errors and every error names its key, e.g. ``config key 'governance.budgets[1].scope'``.
An absent ``governance:`` key turns governance off; ``governance: {}`` turns it on with the
defaults below (one session budget, in-memory state, no API keys required).

Default per-session limits (a session is ``x-kvroute-session`` or the body's ``user``):
20,000 tokens, 15 tool calls, $0.50 and 2 minutes of wall clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvroute.router.errors import ConfigError
from kvroute.router.secrets import Local

SCOPES = ("request", "session", "agent", "task", "feature", "user", "tenant", "global")
ACTIONS = ("reject", "throttle", "downgrade")
LOOP_ACTIONS = ("flag", "inject", "throttle", "halt")
TAGS = ("agent", "task", "feature", "user")
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


@dataclass(frozen=True)
class Tenant:
    name: str
    keys: tuple[str, ...]


@dataclass(frozen=True)
class KillSwitchConfig:
    file: str | None = None  # YAML/JSON list of {scope, value, reason}, re-read every ttl_s
    url: str | None = None  # same document over HTTP(S)
    ttl_s: float = 2.0


@dataclass(frozen=True)
class AlertConfig:
    thresholds: tuple[float, ...] = (0.7, 1.0, 1.2)
    spike_factor: float = 3.0  # current hour's spend over the rolling hourly average
    spike_baseline_hours: int = 24
    webhook_url: str | None = field(default=None, repr=False)  # often carries a token
    webhook_timeout_s: float = 2.0
    webhook_retries: int = 3
    webhook_queue: int = 1000


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


@dataclass(frozen=True)
class GovernanceConfig:
    tenants: tuple[Tenant, ...] = ()
    admin_keys: tuple[str, ...] = ()
    budgets: tuple[Budget, ...] = ()
    kill_switch: KillSwitchConfig = KillSwitchConfig()
    alerts: AlertConfig = AlertConfig()
    loops: LoopConfig = LoopConfig()
    redis: RedisConfig | None = None
    tag_values: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # metric label allow-list
    default_max_tokens: int = 1024  # reserved when a request names no max_tokens
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


# ---- parsing -------------------------------------------------------------------------


def _mapping(value: Any, key: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"expected a mapping, got {type(value).__name__}")
    return value


def _only(raw: Mapping[str, Any], allowed: set[str], key: str) -> None:
    for k in raw:
        if k not in allowed:
            raise ConfigError(f"{key}.{k}", f"unknown key; valid keys: {', '.join(sorted(allowed))}")


def _get(raw: Mapping[str, Any], name: str, kind: type, key: str, default: Any, *, positive: bool = False) -> Any:
    value = raw.get(name)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(f"{key}.{name}", f"expected {kind.__name__}, got {type(value).__name__}")
    if positive and value <= 0:
        raise ConfigError(f"{key}.{name}", f"must be positive, got {value}")
    return value


def _str_list(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(key, "expected a list of non-empty strings")
    return tuple(value)


def _secret_list(value: Any, key: str, local: Local) -> tuple[str, ...]:
    """API keys: strings or ``{env: NAME}`` / ``{file: PATH}`` references."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(key, "expected a list of keys (strings, {env: NAME} or {file: PATH})")
    return tuple(local.secret(v, f"{key}[{i}]") for i, v in enumerate(value))


def _window(raw: Mapping[str, Any], key: str) -> int | None:
    if "window" in raw and "window_s" in raw:
        raise ConfigError(f"{key}.window", "give window or window_s, not both")
    if raw.get("window") is not None:
        w = raw["window"]
        if w not in WINDOWS:
            raise ConfigError(f"{key}.window", f"must be one of {', '.join(WINDOWS)} (or use window_s)")
        return WINDOWS[w]
    return _get(raw, "window_s", int, key, None, positive=True)


def _parse_budget(raw: Any, key: str) -> Budget:
    raw = _mapping(raw, key)
    _only(raw, {"name", "scope", "limit", "window", "window_s", "buckets", "action", "soft", "tenant",
                "throttle_at", "throttle_delay_s"}, key)
    name = _get(raw, "name", str, key, None)
    if not name:
        raise ConfigError(f"{key}.name", "required")
    scope = _get(raw, "scope", str, key, None)
    if scope not in SCOPES:
        raise ConfigError(f"{key}.scope", f"must be one of {', '.join(SCOPES)}")
    lraw = _mapping(raw.get("limit"), f"{key}.limit")
    _only(lraw, {"tokens", "usd", "tool_calls", "wall_s"}, f"{key}.limit")
    lk = f"{key}.limit"
    limits = Limits(tokens=_get(lraw, "tokens", int, lk, None, positive=True),
                    usd=_get(lraw, "usd", float, lk, None, positive=True),
                    tool_calls=_get(lraw, "tool_calls", int, lk, None, positive=True),
                    wall_s=_get(lraw, "wall_s", float, lk, None, positive=True))
    if limits == Limits():
        raise ConfigError(lk, "give at least one of tokens, usd, tool_calls, wall_s")
    if limits.wall_s is not None and scope != "session":
        raise ConfigError(f"{lk}.wall_s", "only a session budget has a wall-clock limit")
    if limits.tool_calls is not None and scope == "request":
        raise ConfigError(f"{lk}.tool_calls", "a request budget cannot limit tool calls")
    window_s = _window(raw, key)
    if window_s is not None and scope in ("request", "session"):
        raise ConfigError(f"{key}.window", f"a {scope} budget has no window")
    buckets = _get(raw, "buckets", int, key, 24, positive=True)
    if "buckets" in raw and window_s is None:
        raise ConfigError(f"{key}.buckets", "only a budget with a window has buckets")
    if buckets > 1440:
        raise ConfigError(f"{key}.buckets", "at most 1440")
    action = _get(raw, "action", str, key, "reject")
    if action not in ACTIONS:
        raise ConfigError(f"{key}.action", f"must be one of {', '.join(ACTIONS)}")
    throttle_at = _get(raw, "throttle_at", float, key, 0.8, positive=True)
    return Budget(name=name, scope=scope, limits=limits, window_s=window_s, buckets=buckets, action=action,
                  soft=_get(raw, "soft", bool, key, False), tenant=_get(raw, "tenant", str, key, None),
                  throttle_at=throttle_at,
                  throttle_delay_s=_get(raw, "throttle_delay_s", float, key, 1.0, positive=True))


def _parse_tenants(value: Any, key: str, local: Local) -> list[Tenant]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(key, "expected a list of {name, keys}")
    out = []
    for i, t in enumerate(value):
        tkey = f"{key}[{i}]"
        t = _mapping(t, tkey)
        _only(t, {"name", "keys"}, tkey)
        name = _get(t, "name", str, tkey, None)
        if not name:
            raise ConfigError(f"{tkey}.name", "required")
        keys = _secret_list(t.get("keys"), f"{tkey}.keys", local)
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
    raw = _mapping(raw, key)
    _only(raw, {"tenants", "admin_keys"}, key)
    return raw


def _parse_alerts(raw: Any, key: str, local: Local) -> AlertConfig:
    raw = _mapping(raw, key)
    _only(raw, {"thresholds", "spike_factor", "spike_baseline_hours", "webhook_url", "webhook_timeout_s",
                "webhook_retries", "webhook_queue"}, key)
    d = AlertConfig()
    thresholds = raw.get("thresholds")
    if thresholds is not None:
        if (not isinstance(thresholds, list) or not thresholds
                or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0 for t in thresholds)):
            raise ConfigError(f"{key}.thresholds", "expected a list of positive ratios, e.g. [0.7, 1.0, 1.2]")
        thresholds = tuple(sorted(float(t) for t in thresholds))
    url = None if raw.get("webhook_url") is None else local.secret(raw["webhook_url"], f"{key}.webhook_url")
    literal = isinstance(raw.get("webhook_url"), str)  # a reference is checked once resolved
    if url is not None and (local.check or literal) and not url.startswith(("http://", "https://")):
        raise ConfigError(f"{key}.webhook_url", "not an http(s) URL")
    return AlertConfig(
        thresholds=thresholds or d.thresholds,
        spike_factor=_get(raw, "spike_factor", float, key, d.spike_factor, positive=True),
        spike_baseline_hours=_get(raw, "spike_baseline_hours", int, key, d.spike_baseline_hours, positive=True),
        webhook_url=url,
        webhook_timeout_s=_get(raw, "webhook_timeout_s", float, key, d.webhook_timeout_s, positive=True),
        webhook_retries=_get(raw, "webhook_retries", int, key, d.webhook_retries),
        webhook_queue=_get(raw, "webhook_queue", int, key, d.webhook_queue, positive=True),
    )


def _parse_loops(raw: Any, key: str) -> LoopConfig:
    raw = _mapping(raw, key)
    _only(raw, {"window", "ratio", "action", "throttle_delay_s", "message"}, key)
    d = LoopConfig()
    action = _get(raw, "action", str, key, d.action)
    if action not in LOOP_ACTIONS:
        raise ConfigError(f"{key}.action", f"must be one of {', '.join(LOOP_ACTIONS)}")
    ratio = _get(raw, "ratio", float, key, d.ratio, positive=True)
    if ratio >= 1:
        raise ConfigError(f"{key}.ratio", "must be below 1")
    window = _get(raw, "window", int, key, d.window, positive=True)
    if window < 2:
        raise ConfigError(f"{key}.window", "must be at least 2")
    return LoopConfig(window=window, ratio=ratio, action=action,
                      throttle_delay_s=_get(raw, "throttle_delay_s", float, key, d.throttle_delay_s, positive=True),
                      message=_get(raw, "message", str, key, d.message))


def _parse_kill(raw: Any, key: str) -> KillSwitchConfig:
    raw = _mapping(raw, key)
    _only(raw, {"file", "url", "ttl_s"}, key)
    ttl = _get(raw, "ttl_s", float, key, 2.0, positive=True)
    if ttl > 5:
        raise ConfigError(f"{key}.ttl_s", "must be at most 5 seconds")
    url = _get(raw, "url", str, key, None)
    if url is not None and not url.startswith(("http://", "https://")):
        raise ConfigError(f"{key}.url", f"not an http(s) URL: {url!r}")
    return KillSwitchConfig(file=_get(raw, "file", str, key, None), url=url, ttl_s=ttl)


def _parse_tag_values(raw: Any, key: str) -> dict[str, tuple[str, ...]]:
    raw = _mapping(raw, key)
    _only(raw, set(TAGS), key)
    return {k: _str_list(v, f"{key}.{k}") for k, v in raw.items()}


def parse_governance(raw: Any, key: str = "governance", *, local: Local = Local()) -> GovernanceConfig:
    """Validate the ``governance:`` mapping into a ``GovernanceConfig``."""
    raw = _mapping(raw, key)
    _only(raw, {"tenants", "keys_file", "admin_keys", "budgets", "kill_switch", "alerts", "loops", "redis",
                "tag_values", "default_max_tokens", "min_completion_tokens", "reservation_ttl_s",
                "session_ttl_s"}, key)
    tenants = _parse_tenants(raw.get("tenants"), f"{key}.tenants", local)
    admin = list(_secret_list(raw.get("admin_keys"), f"{key}.admin_keys", local))
    if raw.get("keys_file") is not None and not local.check:
        if not isinstance(raw["keys_file"], str):
            raise ConfigError(f"{key}.keys_file", "expected a file path")
    elif raw.get("keys_file") is not None:
        fkey = f"{key}.keys_file"
        secret = _read_keys_file(raw["keys_file"], fkey)
        tenants += _parse_tenants(secret.get("tenants"), f"{fkey}:tenants", local)
        admin += _str_list(secret.get("admin_keys"), f"{fkey}:admin_keys")
    seen: dict[str, str] = {}
    for i, t in enumerate(tenants):
        if t.name in {x.name for x in tenants[:i]}:
            raise ConfigError(f"{key}.tenants[{i}].name", f"duplicate tenant {t.name!r}")
        for k in t.keys:
            if k in seen or k in admin:
                raise ConfigError(f"{key}.tenants[{i}].keys", "an API key is listed twice")
            seen[k] = t.name
    budgets_raw = raw.get("budgets") or []
    if not isinstance(budgets_raw, list):
        raise ConfigError(f"{key}.budgets", "expected a list of budgets")
    budgets = [_parse_budget(b, f"{key}.budgets[{i}]") for i, b in enumerate(budgets_raw)]
    for i, b in enumerate(budgets):
        if b.name in [x.name for x in budgets[:i]]:
            raise ConfigError(f"{key}.budgets[{i}].name", f"duplicate budget {b.name!r}")
    if not any(b.scope == "session" for b in budgets):
        budgets.insert(0, default_session_budget())
    redis_cfg = None
    if raw.get("redis") is not None:
        rkey = f"{key}.redis"
        rraw = _mapping(raw["redis"], rkey)
        _only(rraw, {"url", "prefix", "password"}, rkey)
        if rraw.get("url") is None:
            raise ConfigError(f"{rkey}.url", "required: a redis:// URL")
        url = local.secret(rraw["url"], f"{rkey}.url")
        literal = isinstance(rraw["url"], str)  # a reference is checked once resolved
        if (local.check or literal) and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"{rkey}.url", "required: a redis:// URL")
        password = None if rraw.get("password") is None else local.secret(rraw["password"], f"{rkey}.password")
        redis_cfg = RedisConfig(url=url, prefix=_get(rraw, "prefix", str, rkey, "kvroute:gov"), password=password)
    d = GovernanceConfig()
    return GovernanceConfig(
        tenants=tuple(tenants),
        admin_keys=tuple(admin),
        budgets=tuple(budgets),
        kill_switch=_parse_kill(raw.get("kill_switch"), f"{key}.kill_switch"),
        alerts=_parse_alerts(raw.get("alerts"), f"{key}.alerts", local),
        loops=_parse_loops(raw.get("loops"), f"{key}.loops"),
        redis=redis_cfg,
        tag_values=_parse_tag_values(raw.get("tag_values"), f"{key}.tag_values"),
        default_max_tokens=_get(raw, "default_max_tokens", int, key, d.default_max_tokens, positive=True),
        min_completion_tokens=_get(raw, "min_completion_tokens", int, key, d.min_completion_tokens,
                                   positive=True),
        reservation_ttl_s=_get(raw, "reservation_ttl_s", float, key, d.reservation_ttl_s, positive=True),
        session_ttl_s=_get(raw, "session_ttl_s", float, key, d.session_ttl_s, positive=True),
    )
