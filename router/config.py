"""Typed, validated configuration.

The config is YAML (or the same shape built from ``kvroute serve`` flags). It is parsed
once into frozen dataclasses; every validation error names the key, e.g.
``config key 'models[0].workers[1]': not an http(s) URL``. Nothing here is global: the
``RouterConfig`` is passed to ``create_app`` explicitly.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from kvroute.router.errors import ConfigError
from kvroute.router.governance.config import GovernanceConfig, parse_governance
from kvroute.router.secrets import Local

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DISCOVERY_MODES = ("static", "dns", "k8s")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8080
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    request_timeout_s: float = 600.0
    connect_timeout_s: float = 5.0


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
    """Where workers come from. ``static`` uses ``models[].workers``."""

    mode: str = "static"
    namespace: str = "default"
    label_selector: str = "app.kubernetes.io/component=worker"
    model_label: str = "kvroute.io/model"
    tier_label: str = "kvroute.io/tier"
    port: int = 8000
    resync_s: float = 30.0
    kubeconfig: str | None = None
    # dns mode: model name -> "host:port" of a headless Service
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
class ModelConfig:
    """A model clients name; or, inside ``tiers``, one tier of it (``tier`` set)."""

    name: str
    workers: tuple[str, ...] = ()
    tokenizer: str | None = None
    block_size: int | None = None  # None: read from the worker's vllm:cache_config_info
    upstream_model: str | None = None  # model name the workers serve; default: name
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
    log_prompts: bool = False
    governance: GovernanceConfig | None = None  # None: no budgets, keys or kill switch

    def model(self, name: str) -> ModelConfig | None:
        for m in self.models:
            if m.name == name:
                return m
        return None


# ---- parsing -------------------------------------------------------------------------


def _expect_mapping(value: Any, key: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"expected a mapping, got {type(value).__name__}")
    return value


def _reject_unknown(raw: Mapping[str, Any], allowed: set[str], key: str) -> None:
    for k in raw:
        if k not in allowed:
            where = f"{key}.{k}" if key else str(k)
            raise ConfigError(where, f"unknown key; valid keys: {', '.join(sorted(allowed))}")


def _typed(raw: Mapping[str, Any], name: str, kind: type | tuple, key: str, default: Any) -> Any:
    if name not in raw or raw[name] is None:
        return default
    value = raw[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise ConfigError(f"{key}.{name}" if key else name, f"expected {_kind_name(kinds)}, got bool")
    if float in kinds and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kinds):
        where = f"{key}.{name}" if key else name
        raise ConfigError(where, f"expected {_kind_name(kinds)}, got {type(value).__name__}")
    return value


def _kind_name(kinds: tuple) -> str:
    return " or ".join(k.__name__ for k in kinds)


def _positive(value: float | int, key: str) -> None:
    if value <= 0:
        raise ConfigError(key, f"must be positive, got {value}")


def _parse_url(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a URL string, got {type(value).__name__}")
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(key, f"not an http(s) URL: {value!r}")
    return value.rstrip("/")


def _parse_dataclass(cls: type, raw: Any, key: str, kinds: Mapping[str, type | tuple]) -> Any:
    raw = _expect_mapping(raw, key)
    _reject_unknown(raw, set(kinds), key)
    values = {}
    defaults = cls()
    for name, kind in kinds.items():
        value = _typed(raw, name, kind, key, getattr(defaults, name))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            _positive(value, f"{key}.{name}")
        values[name] = value
    return cls(**values)


_POOL_KEYS = {
    "workers", "tokenizer", "block_size", "upstream_model", "policy", "policy_options",
    "kv_capacity_blocks", "approx_chunk_chars", "price", "kv_events", "api_key",
}


def _parse_kv_events(raw: Any, key: str, workers: tuple[str, ...]) -> KvEventsConfig:
    raw = _expect_mapping(raw, key)
    kinds = {"port": int, "port_offset": int, "replay_port": int, "replay_port_offset": int,
             "topic": str, "speculative_ttl_s": float}
    _reject_unknown(raw, set(kinds) | {"endpoints"}, key)
    values = {k: _typed(raw, k, kind, key, getattr(KvEventsConfig(), k)) for k, kind in kinds.items()}
    endpoints = dict(_expect_mapping(raw.get("endpoints"), f"{key}.endpoints"))
    for url, ep in endpoints.items():
        if not isinstance(ep, str) or not ep.startswith(("tcp://", "ipc://")):
            raise ConfigError(f"{key}.endpoints.{url}", "expected a tcp:// or ipc:// ZMQ endpoint")
    if values["port"] is None and "port_offset" not in raw and not endpoints:
        raise ConfigError(key, "say where events come from: port, port_offset or endpoints")
    if values["speculative_ttl_s"] <= 0:
        raise ConfigError(f"{key}.speculative_ttl_s", "must be positive")
    return KvEventsConfig(**values, endpoints=endpoints)


def _parse_price(raw: Any, key: str) -> Price:
    raw = _expect_mapping(raw, key)
    _reject_unknown(raw, {"input_per_m", "cached_input_per_m", "output_per_m"}, key)
    values = {k: _typed(raw, k, float, key, getattr(Price(), k))
              for k in ("input_per_m", "cached_input_per_m", "output_per_m")}
    for k, v in values.items():
        if v is not None and v < 0:
            raise ConfigError(f"{key}.{k}", f"must not be negative, got {v}")
    return Price(**values)


def _parse_classifier(raw: Any, key: str, n_tiers: int, local: Local) -> ClassifierConfig:
    raw = _expect_mapping(raw, key)
    _reject_unknown(raw, {"path", "thresholds", "reload_s", "batch_window_ms", "max_batch"}, key)
    path = _typed(raw, "path", str, key, None)
    if path is not None:
        local.path(path, f"{key}.path", "no such classifier artifact")
    thresholds = raw.get("thresholds")
    if thresholds is not None:
        if (not isinstance(thresholds, list) or len(thresholds) != n_tiers - 1
                or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in thresholds)
                or sorted(thresholds) != thresholds):
            raise ConfigError(f"{key}.thresholds", f"expected {n_tiers - 1} ascending numbers, "
                              "one per boundary between tiers")
        thresholds = tuple(float(t) for t in thresholds)
    elif n_tiers > 2:
        raise ConfigError(f"{key}.thresholds", "required with more than two tiers")
    cfg = ClassifierConfig(path=path, thresholds=thresholds)
    reload_s = _typed(raw, "reload_s", float, key, cfg.reload_s)
    window = _typed(raw, "batch_window_ms", float, key, cfg.batch_window_ms)
    max_batch = _typed(raw, "max_batch", int, key, cfg.max_batch)
    for name, value in (("reload_s", reload_s), ("max_batch", max_batch)):
        _positive(value, f"{key}.{name}")
    if window < 0:
        raise ConfigError(f"{key}.batch_window_ms", "must not be negative")
    return ClassifierConfig(path, thresholds, reload_s, window, max_batch)


def _parse_cascade(raw: Any, key: str, local: Local) -> CascadeConfig:
    raw = _expect_mapping(raw, key)
    kinds = {"threshold": float, "stream_policy": str, "first_tokens": int, "answer_model": str,
             "min_mean_logprob": float}
    _reject_unknown(raw, set(kinds) | {"band", "verifiers"}, key)
    d = CascadeConfig()
    v = {k: _typed(raw, k, kind, key, getattr(d, k)) for k, kind in kinds.items()}
    if not 0 <= v["threshold"] <= 1:
        raise ConfigError(f"{key}.threshold", f"must be between 0 and 1, got {v['threshold']}")
    if v["stream_policy"] not in STREAM_POLICIES:
        raise ConfigError(f"{key}.stream_policy", f"must be one of {', '.join(STREAM_POLICIES)}")
    _positive(v["first_tokens"], f"{key}.first_tokens")
    path = v["answer_model"]
    if path not in (None, "rules"):
        local.path(path, f"{key}.answer_model", "no such answer-scorer artifact (or 'rules')")
    band = raw.get("band", list(d.band))
    if (not isinstance(band, list) or len(band) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in band)
            or not 0 <= band[0] <= band[1] <= 1):
        raise ConfigError(f"{key}.band", "expected [lo, hi] with 0 <= lo <= hi <= 1 (classifier scores)")
    verifiers = raw.get("verifiers") or []
    if not isinstance(verifiers, list):
        raise ConfigError(f"{key}.verifiers", "expected a list of {regex: ...} or {json_schema: {...}}")
    for i, ver in enumerate(verifiers):
        _check_verifier(ver, f"{key}.verifiers[{i}]")
    return CascadeConfig(v["threshold"], (float(band[0]), float(band[1])), v["stream_policy"], v["first_tokens"],
                         path, v["min_mean_logprob"], tuple(dict(x) for x in verifiers))


def _check_verifier(ver: Any, key: str) -> None:
    if not isinstance(ver, Mapping) or len(ver) != 1 or next(iter(ver)) not in ("regex", "json_schema"):
        raise ConfigError(key, "expected exactly one of {regex: PATTERN} or {json_schema: SCHEMA}")
    if "regex" in ver:
        import re

        try:
            re.compile(ver["regex"])
        except (re.error, TypeError) as exc:
            raise ConfigError(f"{key}.regex", f"not a valid regular expression: {exc}") from None
    elif not isinstance(ver["json_schema"], Mapping):
        raise ConfigError(f"{key}.json_schema", "expected a JSON schema object")


def _parse_model(raw: Any, key: str, local: Local) -> ModelConfig:
    raw = _expect_mapping(raw, key)
    _reject_unknown(raw, {"name", "tiers", "classifier", "mode", "cascade"} | _POOL_KEYS, key)
    name = _typed(raw, "name", str, key, None)
    if not name:
        raise ConfigError(f"{key}.name", "required: the model name clients send")
    if "tiers" not in raw:
        for k in ("classifier", "mode", "cascade"):
            if k in raw:
                raise ConfigError(f"{key}.{k}", f"only a model with tiers has a {k}")
        return _parse_pool(raw, key, name, None, local)
    tiers_raw = raw["tiers"]
    if not isinstance(tiers_raw, list) or not tiers_raw:
        raise ConfigError(f"{key}.tiers", "expected a non-empty list of tiers, cheapest first")
    for k in _POOL_KEYS & set(raw):
        raise ConfigError(f"{key}.{k}", "a tiered model sets this per tier, under tiers[]")
    tiers = []
    for i, t in enumerate(tiers_raw):
        tkey = f"{key}.tiers[{i}]"
        t = _expect_mapping(t, tkey)
        _reject_unknown(t, {"name"} | _POOL_KEYS, tkey)
        tier_name = _typed(t, "name", str, tkey, None)
        if not tier_name:
            raise ConfigError(f"{tkey}.name", "required: the tier name, e.g. small or large")
        if tier_name in [x.tier for x in tiers]:
            raise ConfigError(f"{tkey}.name", f"duplicate tier {tier_name!r}")
        tiers.append(_parse_pool(t, tkey, name, tier_name, local))
    mode = _typed(raw, "mode", str, key, "route")
    if mode not in CASCADE_MODES:
        raise ConfigError(f"{key}.mode", f"must be one of {', '.join(CASCADE_MODES)}")
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
    workers_raw = raw.get("workers") or []
    if not isinstance(workers_raw, list):
        raise ConfigError(f"{key}.workers", "expected a list of worker URLs")
    workers = tuple(_parse_url(w, f"{key}.workers[{i}]") for i, w in enumerate(workers_raw))
    if len(set(workers)) != len(workers):
        raise ConfigError(f"{key}.workers", "lists the same URL twice")
    tokenizer = _typed(raw, "tokenizer", str, key, None)
    if tokenizer is not None:
        local.path(tokenizer, f"{key}.tokenizer", "not a local folder", folder=True)
    block_size = _typed(raw, "block_size", int, key, None)
    if block_size is not None:
        _positive(block_size, f"{key}.block_size")
    policy = _typed(raw, "policy", str, key, "prefix")
    # Imported here so that config stays importable without the policy modules.
    from kvroute.router.policies.registry import POLICIES

    if policy not in POLICIES:
        raise ConfigError(f"{key}.policy", f"unknown policy {policy!r}; valid: {', '.join(POLICIES)}")
    options = dict(_expect_mapping(raw.get("policy_options"), f"{key}.policy_options"))
    POLICIES[policy].validate_options(options, f"{key}.policy_options")
    capacity = _typed(raw, "kv_capacity_blocks", int, key, 4096)
    _positive(capacity, f"{key}.kv_capacity_blocks")
    chunk = _typed(raw, "approx_chunk_chars", int, key, 256)
    _positive(chunk, f"{key}.approx_chunk_chars")
    kv_events = None
    if raw.get("kv_events") is not None:
        kv_events = _parse_kv_events(raw["kv_events"], f"{key}.kv_events", workers)
        if tokenizer is None:
            raise ConfigError(f"{key}.kv_events", "exact mode needs the model's tokenizer (set tokenizer)")
    api_key = None
    if raw.get("api_key") is not None:
        api_key = local.secret(raw["api_key"], f"{key}.api_key", literal=False)
    return ModelConfig(
        name=name,
        tier=tier,
        api_key=api_key,
        kv_events=kv_events,
        price=_parse_price(raw.get("price"), f"{key}.price"),
        workers=workers,
        tokenizer=tokenizer,
        block_size=block_size,
        upstream_model=_typed(raw, "upstream_model", str, key, None),
        policy=policy,
        policy_options=options,
        kv_capacity_blocks=capacity,
        approx_chunk_chars=chunk,
    )


def _parse_discovery(raw: Any, local: Local) -> DiscoveryConfig:
    raw = _expect_mapping(raw, "discovery")
    kinds: dict[str, type | tuple] = {
        "mode": str, "namespace": str, "label_selector": str, "model_label": str,
        "tier_label": str, "port": int, "resync_s": float, "kubeconfig": str,
        "interval_s": float,
    }
    _reject_unknown(raw, set(kinds) | {"services"}, "discovery")
    values = {k: _typed(raw, k, kind, "discovery", getattr(DiscoveryConfig(), k)) for k, kind in kinds.items()}
    if values["mode"] not in DISCOVERY_MODES:
        raise ConfigError("discovery.mode", f"must be one of {', '.join(DISCOVERY_MODES)}")
    if values["mode"] == "k8s" and local.check and importlib.util.find_spec("kubernetes_asyncio") is None:
        raise ConfigError("discovery.mode", "k8s discovery needs the Kubernetes client: pip install 'kvroute[k8s]'")
    services = dict(_expect_mapping(raw.get("services"), "discovery.services"))
    for model, target in services.items():
        if not isinstance(target, str) or ":" not in target:
            raise ConfigError(f"discovery.services.{model}", "expected 'host:port'")
    return DiscoveryConfig(**values, services=services)


def config_from_dict(raw: Any, *, local: Local = Local()) -> RouterConfig:
    """Validate a parsed YAML document into a ``RouterConfig``.

    ``local=Local(check=False)`` validates a config meant for another machine: named files,
    folders and secret references are checked in form only (``kvroute config check``)."""
    raw = _expect_mapping(raw, "<root>")
    _reject_unknown(raw, {"models", "server", "health", "scrape", "discovery", "log_prompts", "governance"}, "")
    models_raw = raw.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise ConfigError("models", "required: a non-empty list of models")
    models = tuple(_parse_model(m, f"models[{i}]", local) for i, m in enumerate(models_raw))
    names = [m.name for m in models]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise ConfigError(f"models[{i}].name", f"duplicate model name {n!r}")
    server = _parse_dataclass(
        ServerConfig, raw.get("server"), "server",
        {"host": str, "port": int, "max_body_bytes": int, "request_timeout_s": float,
         "connect_timeout_s": float},
    )
    health = _parse_dataclass(HealthConfig, raw.get("health"), "health",
                              {"interval_s": float, "timeout_s": float})
    scrape = _parse_dataclass(ScrapeConfig, raw.get("scrape"), "scrape",
                              {"interval_s": float, "timeout_s": float})
    discovery = _parse_discovery(raw.get("discovery"), local)
    if discovery.mode == "static":
        for i, m in enumerate(models):
            for j, pool in enumerate(m.pools):
                if not pool.workers:
                    where = f"models[{i}].tiers[{j}].workers" if m.tiers else f"models[{i}].workers"
                    raise ConfigError(where, "required with discovery.mode static")
    log_prompts = _typed(raw, "log_prompts", bool, "", False)
    governance = parse_governance(raw["governance"], local=local) if "governance" in raw else None
    return RouterConfig(models=models, server=server, health=health, scrape=scrape,
                        discovery=discovery, log_prompts=log_prompts, governance=governance)


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
