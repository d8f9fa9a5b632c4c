"""Typed, validated configuration.

The config is YAML (or the same shape built from ``kvroute serve`` flags). It is parsed
once into the frozen dataclasses below (the schema), then the parsers further down check
it with the rules of ``router/validate.py``, shared with ``router/governance/config.py``;
every validation error names the key, e.g. ``config key 'models[0].workers[1]': not an
http(s) URL``. Nothing here is global: the ``RouterConfig`` is passed to ``create_app``
explicitly.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from kvroute.router import validate as v
from kvroute.router.cache.config import CacheConfig, ModelCache, model_cache, parse_cache
from kvroute.router.chat_template import CONTENT_FORMATS, RESERVED_KWARGS, check_template, is_inline, load_template
from kvroute.router.cors import CorsConfig, parse_cors
from kvroute.router.errors import ConfigError
from kvroute.router.governance.config import GovernanceConfig, RedisConfig, parse_governance
from kvroute.router.routing_table import RoutingTable, parse_routes
from kvroute.router.secrets import Local
from kvroute.router.telemetry.config import TelemetryConfig, parse_telemetry
from kvroute.router.tls import ServerTls, UpstreamTls, parse_server_tls, parse_upstream_tls

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DISCOVERY_SOURCES = ("static", "dns", "k8s")
OVERLOAD_MODES = ("reject", "queue")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8080
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    request_timeout_s: float = 600.0
    connect_timeout_s: float = 5.0
    # Admission control (router/admission.py). The defaults change nothing below real
    # overload: no bound per worker, and a router bound far above what one replica serves.
    max_in_flight: int = 4096  # completion requests this replica serves at once
    max_in_flight_per_worker: int | None = None  # None: no bound; else busy workers are skipped
    overload: str = "reject"  # past a bound: reject (503 + Retry-After) or queue
    max_queued: int = 1024  # overload queue: requests waiting at most (then 503)
    queue_timeout_s: float = 30.0  # overload queue: the longest wait (then 503)
    # Graceful drain on SIGTERM (router/server.py): in-flight requests get this long to finish.
    drain_s: float = 30.0
    # Processes serving the port (router/procs.py); each has its own loop, bounds and views.
    procs: int = 1
    cors: CorsConfig | None = None  # None: no CORS headers, preflights get 405 (router/cors.py)
    tls: ServerTls | None = None  # None: plain HTTP (router/tls.py)


@dataclass(frozen=True)
class HealthConfig:
    interval_s: float = 2.0
    timeout_s: float = 2.0


@dataclass(frozen=True)
class ScrapeConfig:
    interval_s: float = 1.0
    timeout_s: float = 1.0


@dataclass(frozen=True)
class DiscoveryConfig:
    """Where workers come from (``source``). ``static`` uses ``models[].workers``."""

    source: str = "static"  # static | dns | k8s
    namespace: str = "default"
    label_selector: str = "app.kubernetes.io/component=worker"
    model_label: str = "kvroute.io/model"
    tier_label: str = "kvroute.io/tier"
    port: int = 8000
    resync_s: float = 30.0
    kubeconfig: str | None = None
    # dns: model name -> "host:port" of a headless Service
    services: Mapping[str, str] = field(default_factory=dict)
    interval_s: float = 10.0


@dataclass(frozen=True)
class Price:
    """Dollars per million tokens. A self-hosted model may be left at zero."""

    input_per_m: float = 0.0
    cached_input_per_m: float | None = None  # default: the input price
    output_per_m: float = 0.0


@dataclass(frozen=True)
class ClassifierConfig:
    """The tier classifier of a tiered model (see ``classifier/``)."""

    path: str | None = None  # artifact dir or pointer dir; None: the shipped default
    thresholds: tuple[float, ...] | None = None  # ascending, one per tier boundary
    reload_s: float = 10.0  # how often to look for a refreshed artifact
    batch_window_ms: float = 2.0  # wait this long to batch concurrent requests
    max_batch: int = 32
    online: OnlineCalibrationConfig | None = None  # target_strong_share set: hold it live (router/calibration.py)
    shadow: str | None = None  # a candidate artifact scored beside the live one, never routing


@dataclass(frozen=True)
class OnlineCalibrationConfig:
    """``classifier.target_strong_share`` + ``classifier.online``: the threshold follows live
    scores to hold the strong tier's share (``router/calibration.py``)."""

    target_strong_share: float
    step: float = 0.05  # logit units per routed prompt: logit(t) += step * (strong - target)
    window: int = 1000  # memory of the live strong-share metric, in prompts
    floor: float = 0.001  # the threshold never goes below ...
    ceiling: float = 0.999  # ... or above these
    shared: bool = False  # every replica moves one threshold in governance.redis
    sync_s: float = 1.0  # shared: how often a replica sends its moves and takes the fleet's threshold
    redis: RedisConfig | None = field(default=None, repr=False, compare=False)  # shared: resolved governance.redis


@dataclass(frozen=True)
class CascadeConfig:
    """``mode: cascade``: try the cheap tier, keep its answer if confident (``router/cascade.py``)."""

    threshold: float = 0.5  # keep the cheap answer when its confidence is at least this
    band: tuple[float, float] = (0.0, 1.0)  # classifier score: below lo cheap only, at or above hi strong only
    stream_policy: str = "buffer"  # buffer | first_tokens
    first_tokens: int = 32  # first_tokens: decide on this many tokens of the cheap answer
    answer_model: str | None = None  # answer-scorer artifact; None: shipped default; "rules": no model
    min_mean_logprob: float | None = None  # escalate when the answer's mean token logprob is lower
    verifiers: tuple[Mapping[str, Any], ...] = ()  # [{regex: ...}, {json_schema: {...}}]; a failure escalates


CASCADE_MODES = ("route", "cascade")
STREAM_POLICIES = ("buffer", "first_tokens")


@dataclass(frozen=True)
class KvEventsConfig:
    """Where a pool's workers publish vLLM KV events (exact mode). One of ``endpoints``
    (worker URL -> tcp://host:port), ``port`` (same port on every worker's host), or
    ``port_offset`` (worker HTTP port + offset) says where."""

    port: int | None = None
    port_offset: int = 0
    endpoints: Mapping[str, str] = field(default_factory=dict)
    replay_port: int | None = None
    replay_port_offset: int | None = None
    topic: str = "kv"
    speculative_ttl_s: float = 5.0


@dataclass(frozen=True)
class TimeoutsConfig:
    """How long one upstream call of a pool may take, phase by phase (``router/proxy.py``).
    ``server.connect_timeout_s`` and ``server.request_timeout_s`` bound them all."""

    connect_s: float | None = None  # None: server.connect_timeout_s
    # Streams only: response headers and the first SSE event, counted from the call's start.
    # A non-streaming answer's first byte is its last, so only request_timeout_s bounds it.
    first_byte_s: float = 60.0
    idle_s: float = 60.0  # streams: the longest gap between two SSE events


@dataclass(frozen=True)
class RetriesConfig:
    """Retries before the first byte (``router/retry.py``; the table is docs/reliability.md)."""

    max_attempts: int = 3  # tries per request, the first included
    backoff_base_s: float = 0.025  # full jitter: a retry waits uniform(0, min(max, base * 2**n))
    backoff_max_s: float = 0.25
    budget_ratio: float = 0.1  # retries may add this share of the pool's recent requests ...
    min_retries_per_s: float = 1.0  # ... plus this many per second, so a quiet pool can retry
    retry_after_max_s: float = 1.0  # a 429/503 Retry-After up to this is waited; a longer one ends the tries


@dataclass(frozen=True)
class BreakerConfig:
    """The circuit breaker of each worker (``router/upstream/breaker.py``)."""

    failures: int = 5  # consecutive failures that open it
    cooldown_s: float = 10.0  # open this long, then one probe request is let through


@dataclass(frozen=True)
class ModelConfig:
    """A model clients name; or, inside ``tiers``, one tier of it (``tier`` set)."""

    name: str
    workers: tuple[str, ...] = ()
    tokenizer: str | None = None
    block_size: int | None = None  # None: read from the worker's vllm:cache_config_info
    upstream_model: str | None = None  # model name the workers serve; default: name
    # The served name is a LoRA adapter (vLLM's --lora-modules NAME=PATH): vLLM keys its KV
    # blocks apart from the base model's and every other adapter's, and so does the router.
    lora: bool = False
    # Another pool's workers (a model's name, or model/tier): its static list, or what
    # discovery finds for it. For an adapter served by its base model's workers.
    workers_from: str | None = None
    # The chat template settings of the pool's vLLM servers (--chat-template, as a file or
    # the template itself; --default-chat-template-kwargs; --chat-template-content-format;
    # --trust-request-chat-template): the router renders prompts as they do.
    chat_template: str | None = None
    chat_template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    chat_template_content_format: str = "auto"
    trust_request_chat_template: bool = False
    policy: str = "prefix"
    policy_options: Mapping[str, Any] = field(default_factory=dict)
    kv_capacity_blocks: int = 4096  # per-worker bound of the speculative index
    approx_chunk_chars: int = 256  # approximate mode: characters per pseudo-block
    tier: str | None = None
    price: Price = Price()
    kv_events: KvEventsConfig | None = None  # None: speculative index
    tiers: tuple[ModelConfig, ...] = ()  # cheapest first; empty for a plain model
    classifier: ClassifierConfig | None = None
    mode: str = "route"  # route (classifier picks one tier) or cascade (escalate on low confidence)
    cascade: CascadeConfig | None = None  # set when mode is cascade
    api_key: str | None = field(default=None, repr=False)  # sent to workers as Authorization: Bearer
    tls: UpstreamTls | None = None  # how https:// workers are checked; None: the system's CAs
    timeouts: TimeoutsConfig = TimeoutsConfig()
    cache: ModelCache | None = None  # the response cache for this model (router/cache); None: off

    @property
    def served_name(self) -> str:
        return self.upstream_model or self.tier or self.name

    @property
    def key(self) -> str:
        """Unique per worker pool: ``model`` or ``model/tier``."""
        return f"{self.name}/{self.tier}" if self.tier else self.name

    @property
    def pools(self) -> tuple[ModelConfig, ...]:
        """The worker pools behind this model: its tiers, or itself."""
        return self.tiers or (self,)


@dataclass(frozen=True)
class RouterConfig:
    models: tuple[ModelConfig, ...]
    server: ServerConfig = ServerConfig()
    health: HealthConfig = HealthConfig()
    scrape: ScrapeConfig = ScrapeConfig()
    discovery: DiscoveryConfig = DiscoveryConfig()
    governance: GovernanceConfig | None = None  # None: no budgets, keys or kill switch
    retries: RetriesConfig = RetriesConfig()
    breaker: BreakerConfig = BreakerConfig()
    cache: CacheConfig | None = None  # the response cache's store and defaults (router/cache)
    telemetry: TelemetryConfig = TelemetryConfig()  # traces and prompt logs; off by default
    routes: RoutingTable = RoutingTable()  # tier or model per tag or model name (router/routing_table.py)


# ---- parsing (the checks themselves are router/validate.py) ----------------------------

_ROOT_KEYS = ("models", "server", "health", "scrape", "discovery", "governance", "retries", "breaker", "cache",
              "telemetry", "routes")
_TEMPLATE_KEYS = ("chat_template", "chat_template_kwargs", "chat_template_content_format",
                  "trust_request_chat_template")
_POOL_KEYS = ("workers", "workers_from", "tokenizer", "block_size", "upstream_model", "lora", "policy",
              "policy_options", "kv_capacity_blocks", "approx_chunk_chars", "price", "kv_events", "api_key",
              "timeouts", "tls", *_TEMPLATE_KEYS)
_TIERED_KEYS = ("name", "tiers", "classifier", "mode", "cascade", "cache")  # cache: parsed in config_from_dict


def _parse_server(raw: Any, key: str, local: Local) -> ServerConfig:
    raw = v.section(raw, ("host", "port", "max_body_bytes", "request_timeout_s", "connect_timeout_s",
                          "max_in_flight", "max_in_flight_per_worker", "overload", "max_queued",
                          "queue_timeout_s", "drain_s", "procs", "cors", "tls"), key)
    d = ServerConfig()
    return ServerConfig(
        host=v.get(raw, "host", str, key, d.host),
        port=v.get(raw, "port", int, key, d.port, positive=True),
        max_body_bytes=v.get(raw, "max_body_bytes", int, key, d.max_body_bytes, positive=True),
        request_timeout_s=v.get(raw, "request_timeout_s", float, key, d.request_timeout_s, positive=True),
        connect_timeout_s=v.get(raw, "connect_timeout_s", float, key, d.connect_timeout_s, positive=True),
        max_in_flight=v.get(raw, "max_in_flight", int, key, d.max_in_flight, positive=True),
        max_in_flight_per_worker=v.get(raw, "max_in_flight_per_worker", int, key, d.max_in_flight_per_worker,
                                       positive=True),
        overload=v.get(raw, "overload", str, key, d.overload, choices=OVERLOAD_MODES),
        max_queued=v.get(raw, "max_queued", int, key, d.max_queued, positive=True),
        queue_timeout_s=v.get(raw, "queue_timeout_s", float, key, d.queue_timeout_s, positive=True),
        drain_s=v.get(raw, "drain_s", float, key, d.drain_s, positive=True),
        procs=v.get(raw, "procs", int, key, d.procs, positive=True),
        cors=parse_cors(raw.get("cors"), v.join(key, "cors")),
        tls=parse_server_tls(raw.get("tls"), v.join(key, "tls"), local),
    )


def _share_calibration(m: ModelConfig, key: str, governance: GovernanceConfig | None) -> ModelConfig:
    """``online.shared``: the threshold lives in governance's Redis, under its prefix."""
    if m.classifier is None or m.classifier.online is None or not m.classifier.online.shared:
        return m
    online = m.classifier.online
    if governance is None or governance.redis is None:
        raise ConfigError(key, "needs governance.redis: the replicas share the threshold there")
    return replace(m, classifier=replace(m.classifier, online=replace(online, redis=governance.redis)))


def check_procs(cfg: RouterConfig, key: str = "server.procs") -> None:
    """State that lives in one process cannot be shared by several (``server.procs`` > 1):
    governance needs its Redis store, and a prompt- or access-log file would be rotated by each."""
    if cfg.server.procs == 1:
        return
    if cfg.governance is not None and cfg.governance.redis is None:
        raise ConfigError("governance.redis", f"required with {key} > 1: budgets, rate limits and the kill "
                          "switch must be shared by the processes (the in-memory store is per process)")
    if cfg.telemetry.prompt_logs.file is not None:
        raise ConfigError("telemetry.prompt_logs.file", f"not with {key} > 1: each process would write and "
                          "rotate the same file; log prompts on spans (span: true) or serve with one process")
    if cfg.telemetry.access_log.file is not None:
        raise ConfigError("telemetry.access_log.file", f"not with {key} > 1: each process would write and "
                          "rotate the same file; leave out 'file' to log to standard error")


def _parse_interval(cls: type[HealthConfig] | type[ScrapeConfig], raw: Any, key: str) -> Any:
    """``health`` and ``scrape``: how often to poll each worker, and for how long."""
    raw = v.section(raw, ("interval_s", "timeout_s"), key)
    d = cls()
    return cls(interval_s=v.get(raw, "interval_s", float, key, d.interval_s, positive=True),
               timeout_s=v.get(raw, "timeout_s", float, key, d.timeout_s, positive=True))


def _parse_kv_events(raw: Any, key: str) -> KvEventsConfig:
    raw = v.section(raw, ("port", "port_offset", "endpoints", "replay_port", "replay_port_offset", "topic",
                          "speculative_ttl_s"), key)
    d = KvEventsConfig()
    endpoints = dict(v.mapping(raw.get("endpoints"), v.join(key, "endpoints")))
    for url, ep in endpoints.items():
        if not isinstance(ep, str) or not ep.startswith(("tcp://", "ipc://")):
            raise ConfigError(f"{key}.endpoints.{url}", "expected a tcp:// or ipc:// ZMQ endpoint")
    port = v.get(raw, "port", int, key, d.port, positive=True)
    if port is None and raw.get("port_offset") is None and not endpoints:
        raise ConfigError(key, "say where events come from: port, port_offset or endpoints")
    return KvEventsConfig(
        port=port,
        port_offset=v.get(raw, "port_offset", int, key, d.port_offset),
        endpoints=endpoints,
        replay_port=v.get(raw, "replay_port", int, key, d.replay_port, positive=True),
        replay_port_offset=v.get(raw, "replay_port_offset", int, key, d.replay_port_offset),
        topic=v.get(raw, "topic", str, key, d.topic),
        speculative_ttl_s=v.get(raw, "speculative_ttl_s", float, key, d.speculative_ttl_s, positive=True),
    )


def _parse_timeouts(raw: Any, key: str) -> TimeoutsConfig:
    raw = v.section(raw, ("connect_s", "first_byte_s", "idle_s"), key)
    d = TimeoutsConfig()
    return TimeoutsConfig(
        connect_s=v.get(raw, "connect_s", float, key, d.connect_s, positive=True),
        first_byte_s=v.get(raw, "first_byte_s", float, key, d.first_byte_s, positive=True),
        idle_s=v.get(raw, "idle_s", float, key, d.idle_s, positive=True),
    )


def _check_timeouts(models_raw: list[Any], models: tuple[ModelConfig, ...], server: ServerConfig) -> None:
    """A pool's timeouts live inside the server's overall bounds: one set above its bound
    could never fire, and is an error. A default above it simply yields to the bound."""
    bounds = {"connect_s": ("server.connect_timeout_s", server.connect_timeout_s),
              "first_byte_s": ("server.request_timeout_s", server.request_timeout_s),
              "idle_s": ("server.request_timeout_s", server.request_timeout_s)}
    for i, (raw, m) in enumerate(zip(models_raw, models)):
        for j, (pool_raw, pool) in enumerate(zip(raw.get("tiers") or [raw], m.pools)):
            where = f"models[{i}].tiers[{j}].timeouts" if m.tiers else f"models[{i}].timeouts"
            for name in pool_raw.get("timeouts") or {}:
                value = getattr(pool.timeouts, name)
                bound_key, bound = bounds[name]
                if value is not None and value > bound:
                    raise ConfigError(f"{where}.{name}", f"{value:g} is above {bound_key} ({bound:g}), "
                                                         "the overall bound; raise that too")


def _parse_retries(raw: Any, key: str) -> RetriesConfig:
    raw = v.section(raw, ("max_attempts", "backoff_base_s", "backoff_max_s", "budget_ratio", "min_retries_per_s",
                          "retry_after_max_s"), key)
    d = RetriesConfig()
    cfg = RetriesConfig(
        max_attempts=v.get(raw, "max_attempts", int, key, d.max_attempts, positive=True),
        backoff_base_s=v.get(raw, "backoff_base_s", float, key, d.backoff_base_s, non_negative=True),
        backoff_max_s=v.get(raw, "backoff_max_s", float, key, d.backoff_max_s, non_negative=True),
        budget_ratio=v.get(raw, "budget_ratio", float, key, d.budget_ratio, non_negative=True),
        min_retries_per_s=v.get(raw, "min_retries_per_s", float, key, d.min_retries_per_s, non_negative=True),
        retry_after_max_s=v.get(raw, "retry_after_max_s", float, key, d.retry_after_max_s, non_negative=True),
    )
    if cfg.backoff_max_s < cfg.backoff_base_s:
        raise ConfigError(f"{key}.backoff_max_s", f"must be at least backoff_base_s ({cfg.backoff_base_s:g})")
    return cfg


def _parse_breaker(raw: Any, key: str) -> BreakerConfig:
    raw = v.section(raw, ("failures", "cooldown_s"), key)
    d = BreakerConfig()
    return BreakerConfig(failures=v.get(raw, "failures", int, key, d.failures, positive=True),
                         cooldown_s=v.get(raw, "cooldown_s", float, key, d.cooldown_s, positive=True))


def _parse_price(raw: Any, key: str) -> Price:
    raw = v.section(raw, ("input_per_m", "cached_input_per_m", "output_per_m"), key)
    d = Price()
    return Price(
        input_per_m=v.get(raw, "input_per_m", float, key, d.input_per_m, non_negative=True),
        cached_input_per_m=v.get(raw, "cached_input_per_m", float, key, d.cached_input_per_m, non_negative=True),
        output_per_m=v.get(raw, "output_per_m", float, key, d.output_per_m, non_negative=True),
    )


def _parse_classifier(raw: Any, key: str, n_tiers: int, local: Local) -> ClassifierConfig:
    raw = v.section(raw, ("path", "thresholds", "reload_s", "batch_window_ms", "max_batch",
                          "target_strong_share", "online", "shadow"), key)
    d = ClassifierConfig()
    path = v.get(raw, "path", str, key)
    if path is not None:
        local.path(path, f"{key}.path", "no such classifier artifact")
    shadow = v.get(raw, "shadow", str, key)
    if shadow is not None:
        local.path(shadow, f"{key}.shadow", "no such classifier artifact")
    online = _parse_online(raw, key, n_tiers)
    thresholds = None
    if raw.get("thresholds") is not None:
        thresholds = v.number_list(
            raw["thresholds"], f"{key}.thresholds",
            f"expected {n_tiers - 1} ascending numbers, one per boundary between tiers",
            lambda ts: len(ts) == n_tiers - 1 and list(ts) == sorted(ts))
    elif n_tiers > 2:
        raise ConfigError(f"{key}.thresholds", "required with more than two tiers")
    return ClassifierConfig(
        path=path,
        thresholds=thresholds,
        reload_s=v.get(raw, "reload_s", float, key, d.reload_s, positive=True),
        batch_window_ms=v.get(raw, "batch_window_ms", float, key, d.batch_window_ms, non_negative=True),
        max_batch=v.get(raw, "max_batch", int, key, d.max_batch, positive=True),
        online=online,
        shadow=shadow,
    )


def _parse_online(raw: Mapping[str, Any], key: str, n_tiers: int) -> OnlineCalibrationConfig | None:
    """``target_strong_share`` turns online calibration on; ``online`` tunes it."""
    share = v.get(raw, "target_strong_share", float, key)
    okey = v.join(key, "online")
    if share is None:
        if raw.get("online") is not None:
            raise ConfigError(okey, "set classifier.target_strong_share to use it")
        return None
    if not 0.0 < share < 1.0:
        raise ConfigError(v.join(key, "target_strong_share"), f"expected a share in (0, 1), got {share}")
    if n_tiers != 2 or raw.get("thresholds") is not None:
        raise ConfigError(v.join(key, "target_strong_share"),
                          "needs exactly two tiers and no classifier.thresholds (it sets the one threshold)")
    o = v.section(raw.get("online"), ("step", "window", "floor", "ceiling", "shared", "sync_s"), okey)
    d = OnlineCalibrationConfig(share)
    cfg = OnlineCalibrationConfig(
        target_strong_share=share,
        step=v.get(o, "step", float, okey, d.step, positive=True),
        window=v.get(o, "window", int, okey, d.window, positive=True),
        floor=v.get(o, "floor", float, okey, d.floor, positive=True),
        ceiling=v.get(o, "ceiling", float, okey, d.ceiling, positive=True),
        shared=v.get(o, "shared", bool, okey, d.shared),
        sync_s=v.get(o, "sync_s", float, okey, d.sync_s, positive=True),
    )
    if not cfg.floor < cfg.ceiling < 1.0:
        raise ConfigError(okey, f"expected 0 < floor < ceiling < 1, got floor {cfg.floor}, ceiling {cfg.ceiling}")
    return cfg


def _parse_cascade(raw: Any, key: str, local: Local) -> CascadeConfig:
    raw = v.section(raw, ("threshold", "band", "stream_policy", "first_tokens", "answer_model",
                          "min_mean_logprob", "verifiers"), key)
    d = CascadeConfig()
    threshold = v.get(raw, "threshold", float, key, d.threshold)
    if not 0 <= threshold <= 1:
        raise ConfigError(f"{key}.threshold", f"must be between 0 and 1, got {threshold}")
    answer_model = v.get(raw, "answer_model", str, key, d.answer_model)
    if answer_model not in (None, "rules"):
        local.path(answer_model, f"{key}.answer_model", "no such answer-scorer artifact (or 'rules')")
    band = d.band
    if raw.get("band") is not None:
        lo, hi = v.number_list(raw["band"], f"{key}.band",
                               "expected [lo, hi] with 0 <= lo <= hi <= 1 (classifier scores)",
                               lambda b: len(b) == 2 and 0 <= b[0] <= b[1] <= 1)
        band = (lo, hi)
    verifiers = v.items(raw.get("verifiers"), f"{key}.verifiers",
                        "expected a list of {regex: ...} or {json_schema: {...}}")
    for i, ver in enumerate(verifiers):
        _check_verifier(ver, f"{key}.verifiers[{i}]")
    return CascadeConfig(
        threshold=threshold,
        band=band,
        stream_policy=v.get(raw, "stream_policy", str, key, d.stream_policy, choices=STREAM_POLICIES),
        first_tokens=v.get(raw, "first_tokens", int, key, d.first_tokens, positive=True),
        answer_model=answer_model,
        min_mean_logprob=v.get(raw, "min_mean_logprob", float, key, d.min_mean_logprob),
        verifiers=tuple(dict(x) for x in verifiers),
    )


def _check_verifier(ver: Any, key: str) -> None:
    if not isinstance(ver, Mapping) or len(ver) != 1 or next(iter(ver)) not in ("regex", "json_schema"):
        raise ConfigError(key, "expected exactly one of {regex: PATTERN} or {json_schema: SCHEMA}")
    if "regex" in ver:
        try:
            re.compile(ver["regex"])
        except (re.error, TypeError) as exc:
            raise ConfigError(f"{key}.regex", f"not a valid regular expression: {exc}") from None
    elif not isinstance(ver["json_schema"], Mapping):
        raise ConfigError(f"{key}.json_schema", "expected a JSON schema object")


def _parse_model(raw: Any, key: str, local: Local) -> ModelConfig:
    raw = v.section(raw, _TIERED_KEYS + _POOL_KEYS, key)
    name = v.required(raw, "name", str, key, "the model name clients send")
    if "tiers" not in raw:
        for k in ("classifier", "mode", "cascade"):
            if k in raw:
                raise ConfigError(f"{key}.{k}", f"only a model with tiers has a {k}")
        return _parse_pool(raw, key, name, None, local)
    tiers_raw = v.items(raw["tiers"], f"{key}.tiers", "expected a non-empty list of tiers, cheapest first",
                        non_empty=True)
    for k in _POOL_KEYS:
        if k in raw:
            raise ConfigError(f"{key}.{k}", "a tiered model sets this per tier, under tiers[]")
    tiers: list[ModelConfig] = []
    for i, t in enumerate(tiers_raw):
        tkey = f"{key}.tiers[{i}]"
        t = v.section(t, ("name",) + _POOL_KEYS, tkey)
        tier_name = v.required(t, "name", str, tkey, "the tier name, e.g. small or large")
        if tier_name in [x.tier for x in tiers]:
            raise ConfigError(f"{tkey}.name", f"duplicate tier {tier_name!r}")
        tiers.append(_parse_pool(t, tkey, name, tier_name, local))
    mode = v.get(raw, "mode", str, key, "route", choices=CASCADE_MODES)
    if "cascade" in raw and mode != "cascade":
        raise ConfigError(f"{key}.cascade", "set mode: cascade to use it")
    if mode == "cascade" and len(tiers) < 2:
        raise ConfigError(f"{key}.mode", "a cascade needs at least two tiers")
    cascade = _parse_cascade(raw.get("cascade"), f"{key}.cascade", local) if mode == "cascade" else None
    classifier = None
    if len(tiers) > 1 and (mode == "route" or "classifier" in raw):  # a cascade uses it only when given
        classifier = _parse_classifier(raw.get("classifier"), f"{key}.classifier", len(tiers), local)
    return ModelConfig(name=name, tiers=tuple(tiers), classifier=classifier, mode=mode, cascade=cascade)


def _parse_pool(raw: Mapping[str, Any], key: str, name: str, tier: str | None, local: Local) -> ModelConfig:
    workers_raw = v.items(raw.get("workers"), f"{key}.workers", "expected a list of worker URLs")
    workers = tuple(v.http_url(w, f"{key}.workers[{i}]").rstrip("/") for i, w in enumerate(workers_raw))
    if len(set(workers)) != len(workers):
        raise ConfigError(f"{key}.workers", "lists the same URL twice")
    tokenizer = v.get(raw, "tokenizer", str, key)
    if tokenizer is not None:
        local.path(tokenizer, f"{key}.tokenizer", "not a local folder", folder=True)
    policy = v.get(raw, "policy", str, key, "prefix")
    # Imported here so that config stays importable without the policy modules.
    from kvroute.router.policies.registry import POLICIES

    if policy not in POLICIES:
        raise ConfigError(f"{key}.policy", f"unknown policy {policy!r}; valid: {', '.join(POLICIES)}")
    options = dict(v.mapping(raw.get("policy_options"), f"{key}.policy_options"))
    POLICIES[policy].validate_options(options, f"{key}.policy_options")
    kv_events = None
    if raw.get("kv_events") is not None:
        kv_events = _parse_kv_events(raw["kv_events"], f"{key}.kv_events")
        if tokenizer is None:
            raise ConfigError(f"{key}.kv_events", "exact mode needs the model's tokenizer (set tokenizer)")
    api_key = None
    if raw.get("api_key") is not None:
        api_key = local.secret(raw["api_key"], f"{key}.api_key", literal=False)
    d = ModelConfig(name)
    if tokenizer is None and (given := next((k for k in _TEMPLATE_KEYS if raw.get(k) is not None), None)):
        raise ConfigError(f"{key}.{given}", "the router renders chat templates only with the model's "
                          "tokenizer (set tokenizer)")
    template = v.get(raw, "chat_template", str, key)
    if template is not None:
        _check_chat_template(template, f"{key}.chat_template", local)
    template_kwargs = dict(v.mapping(raw.get("chat_template_kwargs"), f"{key}.chat_template_kwargs"))
    for reserved in RESERVED_KWARGS:
        if reserved in template_kwargs:
            raise ConfigError(f"{key}.chat_template_kwargs.{reserved}", "is not a template variable"
                              + (" (set chat_template)" if reserved == "chat_template" else ""))
    return ModelConfig(
        name=name,
        tier=tier,
        api_key=api_key,
        tls=parse_upstream_tls(raw.get("tls"), f"{key}.tls", local),
        kv_events=kv_events,
        price=_parse_price(raw.get("price"), f"{key}.price"),
        timeouts=_parse_timeouts(raw.get("timeouts"), f"{key}.timeouts"),
        workers=workers,
        tokenizer=tokenizer,
        block_size=v.get(raw, "block_size", int, key, d.block_size, positive=True),
        upstream_model=v.get(raw, "upstream_model", str, key),
        lora=v.get(raw, "lora", bool, key, d.lora),
        workers_from=v.get(raw, "workers_from", str, key),
        chat_template=template,
        chat_template_kwargs=template_kwargs,
        chat_template_content_format=v.get(raw, "chat_template_content_format", str, key,
                                           d.chat_template_content_format, choices=CONTENT_FORMATS),
        trust_request_chat_template=v.get(raw, "trust_request_chat_template", bool, key,
                                          d.trust_request_chat_template),
        policy=policy,
        policy_options=options,
        kv_capacity_blocks=v.get(raw, "kv_capacity_blocks", int, key, d.kv_capacity_blocks, positive=True),
        approx_chunk_chars=v.get(raw, "approx_chunk_chars", int, key, d.approx_chunk_chars, positive=True),
    )


def _check_chat_template(value: str, key: str, local: Local) -> None:
    """A template file must exist (when looking at this machine) and any template compile."""
    if not is_inline(value) and not local.check:
        return  # a path on the machine the config is for
    try:
        check_template(load_template(value))
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None
    except Exception as exc:  # jinja2's syntax errors name the line
        raise ConfigError(key, f"does not compile: {type(exc).__name__}: {exc}") from None


def _parse_discovery(raw: Any, key: str, local: Local) -> DiscoveryConfig:
    raw = v.section(raw, ("source", "namespace", "label_selector", "model_label", "tier_label", "port",
                          "resync_s", "kubeconfig", "services", "interval_s"), key)
    d = DiscoveryConfig()
    source = v.get(raw, "source", str, key, d.source, choices=DISCOVERY_SOURCES)
    if source == "k8s" and local.check and importlib.util.find_spec("kubernetes_asyncio") is None:
        raise ConfigError(f"{key}.source", "k8s discovery needs the Kubernetes client: pip install 'kvroute[k8s]'")
    services = dict(v.mapping(raw.get("services"), f"{key}.services"))
    for model, target in services.items():
        if not isinstance(target, str) or ":" not in target:
            raise ConfigError(f"{key}.services.{model}", "expected 'host:port'")
    return DiscoveryConfig(
        source=source,
        namespace=v.get(raw, "namespace", str, key, d.namespace),
        label_selector=v.get(raw, "label_selector", str, key, d.label_selector),
        model_label=v.get(raw, "model_label", str, key, d.model_label),
        tier_label=v.get(raw, "tier_label", str, key, d.tier_label),
        port=v.get(raw, "port", int, key, d.port, positive=True),
        resync_s=v.get(raw, "resync_s", float, key, d.resync_s, positive=True),
        kubeconfig=v.get(raw, "kubeconfig", str, key, d.kubeconfig),
        services=services,
        interval_s=v.get(raw, "interval_s", float, key, d.interval_s, positive=True),
    )


def _share_workers(models: tuple[ModelConfig, ...]) -> tuple[ModelConfig, ...]:
    """Pools with ``workers_from`` take the named pool's workers: its static list here, and
    discovery's members for it at run time (``ModelRoutes.apply_discovery``)."""
    pools = {p.key: p for m in models for p in m.pools}

    def fill(pool: ModelConfig, where: str) -> ModelConfig:
        if pool.workers_from is None:
            return pool
        target = pools.get(pool.workers_from)
        if target is None or target.key == pool.key:
            raise ConfigError(f"{where}.workers_from", f"names no other model or tier: {pool.workers_from!r} "
                              f"(a model's name, or model/tier; known: {', '.join(sorted(pools))})")
        if target.workers_from is not None:
            raise ConfigError(f"{where}.workers_from", f"{target.key!r} takes its workers from "
                              f"{target.workers_from!r}: name that one")
        if pool.workers:
            raise ConfigError(f"{where}.workers", "set workers or workers_from, not both")
        return replace(pool, workers=target.workers)

    return tuple(replace(m, tiers=tuple(fill(t, f"models[{i}].tiers[{j}]") for j, t in enumerate(m.tiers)))
                 if m.tiers else fill(m, f"models[{i}]") for i, m in enumerate(models))


def config_from_dict(raw: Any, *, local: Local = Local()) -> RouterConfig:
    """Validate a parsed YAML document into a ``RouterConfig``.

    ``local=Local(check=False)`` validates a config meant for another machine: named files,
    folders and secret references are checked in form only (``kvroute config check``)."""
    raw = v.mapping(raw, "<root>")
    v.only(raw, _ROOT_KEYS, "")
    models_raw = v.items(raw.get("models"), "models", "required: a non-empty list of models", non_empty=True)
    models = tuple(_parse_model(m, f"models[{i}]", local) for i, m in enumerate(models_raw))
    v.unique([m.name for m in models], lambda i: f"models[{i}].name", "model name")
    models = _share_workers(models)
    server = _parse_server(raw.get("server"), "server", local)
    health = _parse_interval(HealthConfig, raw.get("health"), "health")
    scrape = _parse_interval(ScrapeConfig, raw.get("scrape"), "scrape")
    discovery = _parse_discovery(raw.get("discovery"), "discovery", local)
    if discovery.source == "static":
        for i, m in enumerate(models):
            for j, pool in enumerate(m.pools):
                if not pool.workers:
                    where = f"models[{i}].tiers[{j}].workers" if m.tiers else f"models[{i}].workers"
                    raise ConfigError(where, "required with discovery.source static")
    _check_timeouts(models_raw, models, server)
    governance = parse_governance(raw["governance"], local=local) if "governance" in raw else None
    cache = None  # the store is set up when the top level or any model asks for a cache
    if raw.get("cache") is not None or any(isinstance(r, Mapping) and r.get("cache") for r in models_raw):
        cache = parse_cache(raw.get("cache"), "cache", local, governance.redis if governance else None)
    models = tuple(replace(m, cache=model_cache(r.get("cache"), f"models[{i}].cache", cache))
                   for i, (r, m) in enumerate(zip(models_raw, models)))
    models = tuple(_share_calibration(m, f"models[{i}].classifier.online.shared", governance)
                   for i, m in enumerate(models))
    cfg = RouterConfig(models=models, cache=cache, server=server, health=health, scrape=scrape, discovery=discovery,
                       governance=governance, retries=_parse_retries(raw.get("retries"), "retries"),
                       breaker=_parse_breaker(raw.get("breaker"), "breaker"),
                       telemetry=parse_telemetry(raw.get("telemetry"), local=local),
                       routes=parse_routes(raw.get("routes"), "routes",
                                           {m.name: tuple(t.tier for t in m.tiers if t.tier) for m in models}))
    check_procs(cfg)
    return cfg


def load_config(path: str | Path, *, local: Local = Local()) -> RouterConfig:
    """Read and validate a YAML config file."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError("<file>", f"cannot read {path}: {exc.strerror}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("<file>", f"invalid YAML in {path}: {exc}") from exc
    return config_from_dict(raw, local=local)
