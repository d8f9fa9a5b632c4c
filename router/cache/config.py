"""The ``cache:`` section and a model's own ``cache:`` override (docs/cache.md).

    cache:
      store: auto            # auto | memory | redis
      max_bytes: 268435456   # the in-process store's bound
      redis: {url: redis://cache:6379/0, prefix: "kvroute:cache"}  # else governance.redis
      exact: {ttl_s: 3600, max_entry_bytes: 1048576, greedy_by_default: false}
      semantic: {threshold: 0.995, ttl_s: 3600, max_entries: 100000, sync_interval_s: 0.5}
    models:
      - name: chat
        cache: {exact: {ttl_s: 60}}   # fields override the top-level exact; false turns it off

An empty ``exact: {}`` (``semantic: {}``) turns that cache on with its defaults. A model's
``exact`` (``semantic``) mapping starts from the top-level one (or from the defaults when
there is none).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from kvroute.router import validate as v
from kvroute.router.errors import ConfigError
from kvroute.router.governance.config import RedisConfig
from kvroute.router.secrets import Local

STORES = ("auto", "memory", "redis")
DEFAULT_PREFIX = "kvroute:cache"


@dataclass(frozen=True)
class ExactCacheConfig:
    ttl_s: float = 3600.0  # an entry lives this long (Redis TTL, or the in-process clock)
    max_entry_bytes: int = 1024 * 1024  # a larger answer is not stored
    # A request without ``temperature`` counts as deterministic: set it for models whose
    # generation_config (vLLM's default sampling) is greedy.
    greedy_by_default: bool = False


# The semantic cache's default threshold: cosine similarity of the last user turns'
# embeddings. Set by benchmarks/semantic_calibration.py (docs/cache.md#semantic-cache).
DEFAULT_THRESHOLD = 0.995


@dataclass(frozen=True)
class SemanticCacheConfig:
    threshold: float = DEFAULT_THRESHOLD  # serve a hit at or above this cosine similarity
    ttl_s: float = 3600.0
    max_entry_bytes: int = 1024 * 1024
    greedy_by_default: bool = False  # as ExactCacheConfig's
    max_entries: int = 100_000  # per replica, across tenants and models: the oldest go first
    sync_interval_s: float = 0.5  # with Redis: how often a replica reads the entries others added


@dataclass(frozen=True)
class ModelCache:
    """The cache settings one model ends up with (top level merged with its override)."""

    exact: ExactCacheConfig | None = None  # None: off for this model
    semantic: SemanticCacheConfig | None = None

    @property
    def on(self) -> bool:
        return self.exact is not None or self.semantic is not None


@dataclass(frozen=True)
class CacheConfig:
    store: str = "auto"  # auto: redis when one is configured (here or governance), else memory
    max_bytes: int = 256 * 1024 * 1024  # in-process LRU bound, keys and answers together
    redis: RedisConfig | None = field(default=None, repr=False)  # resolved: cache.redis or governance.redis
    exact: ExactCacheConfig | None = None  # the default for every model; None: off unless a model turns it on
    semantic: SemanticCacheConfig | None = None  # likewise


def parse_cache(raw: Any, key: str, local: Local, governance_redis: RedisConfig | None) -> CacheConfig:
    raw = v.section(raw, ("store", "max_bytes", "redis", "exact", "semantic"), key)
    d = CacheConfig()
    store = v.get(raw, "store", str, key, d.store, choices=STORES)
    redis = None
    if raw.get("redis") is not None:
        redis = _parse_redis(raw["redis"], v.join(key, "redis"), local)
    elif governance_redis is not None:  # the same server, under the cache's own key prefix
        redis = replace(governance_redis, prefix=DEFAULT_PREFIX)
    if store == "redis" and redis is None:
        raise ConfigError(f"{key}.store", "redis needs cache.redis (or governance.redis)")
    exact = _over(raw, "exact", key, None, _parse_exact, ExactCacheConfig())
    semantic = _over(raw, "semantic", key, None, _parse_semantic, SemanticCacheConfig())
    return CacheConfig(store=store, max_bytes=v.get(raw, "max_bytes", int, key, d.max_bytes, positive=True),
                       redis=None if store == "memory" else redis, exact=exact, semantic=semantic)


def model_cache(raw: Any, key: str, top: CacheConfig | None) -> ModelCache:
    """A model's cache: the top-level ``cache`` with the model's ``cache`` over it."""
    raw = v.section(raw, ("exact", "semantic"), key)
    return ModelCache(
        exact=_over(raw, "exact", key, top.exact if top else None, _parse_exact, ExactCacheConfig()),
        semantic=_over(raw, "semantic", key, top.semantic if top else None, _parse_semantic, SemanticCacheConfig()))


def _over(raw: dict, name: str, key: str, inherited: Any, parse: Any, default: Any) -> Any:
    """A model's ``exact`` or ``semantic``: absent inherits, ``false`` turns it off, a
    mapping (or ``true``) is parsed over what it inherits."""
    if name not in raw:
        return inherited
    if raw[name] is False:
        return None
    return parse(raw[name], v.join(key, name), inherited or default)


def _parse_exact(raw: Any, key: str, base: ExactCacheConfig) -> ExactCacheConfig:
    if raw is True:
        raw = {}
    raw = v.section(raw, ("ttl_s", "max_entry_bytes", "greedy_by_default"), key)
    return ExactCacheConfig(
        ttl_s=v.get(raw, "ttl_s", float, key, base.ttl_s, positive=True),
        max_entry_bytes=v.get(raw, "max_entry_bytes", int, key, base.max_entry_bytes, positive=True),
        greedy_by_default=v.get(raw, "greedy_by_default", bool, key, base.greedy_by_default),
    )


def _parse_semantic(raw: Any, key: str, base: SemanticCacheConfig) -> SemanticCacheConfig:
    if raw is True:
        raw = {}
    raw = v.section(raw, ("threshold", "ttl_s", "max_entry_bytes", "greedy_by_default", "max_entries",
                          "sync_interval_s"), key)
    threshold = v.get(raw, "threshold", float, key, base.threshold, positive=True)
    if threshold > 1:
        raise ConfigError(f"{key}.threshold", f"a cosine similarity in (0, 1], got {threshold}")
    return SemanticCacheConfig(
        threshold=threshold,
        ttl_s=v.get(raw, "ttl_s", float, key, base.ttl_s, positive=True),
        max_entry_bytes=v.get(raw, "max_entry_bytes", int, key, base.max_entry_bytes, positive=True),
        greedy_by_default=v.get(raw, "greedy_by_default", bool, key, base.greedy_by_default),
        max_entries=v.get(raw, "max_entries", int, key, base.max_entries, positive=True),
        sync_interval_s=v.get(raw, "sync_interval_s", float, key, base.sync_interval_s, positive=True),
    )


def _parse_redis(raw: Any, key: str, local: Local) -> RedisConfig:
    raw = v.section(raw, ("url", "prefix", "password", "connect_timeout_s", "timeout_s"), key)
    if raw.get("url") is None:
        raise ConfigError(f"{key}.url", "required: a redis:// URL")
    url = local.secret(raw["url"], f"{key}.url")
    if (local.check or isinstance(raw["url"], str)) and not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"{key}.url", "required: a redis:// URL")
    password = None if raw.get("password") is None else local.secret(raw["password"], f"{key}.password")
    d = RedisConfig(url="")
    return RedisConfig(url=url, prefix=v.get(raw, "prefix", str, key, DEFAULT_PREFIX), password=password,
                       connect_timeout_s=v.get(raw, "connect_timeout_s", float, key, d.connect_timeout_s,
                                               positive=True),
                       timeout_s=v.get(raw, "timeout_s", float, key, d.timeout_s, positive=True))

