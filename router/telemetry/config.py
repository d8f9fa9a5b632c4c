"""The ``telemetry:`` section of the router config: OpenTelemetry traces and prompt logs.

Traces follow the OpenTelemetry SDK's own switches. Setting ``OTEL_EXPORTER_OTLP_ENDPOINT``
(or ``..._TRACES_ENDPOINT``) alone turns them on, as in every OTel SDK; each key of
``telemetry.traces`` maps onto one standard variable and wins over it when set:

  ================  =========================================================
  key               environment variable
  ================  =========================================================
  enabled           (on when an endpoint is set; ``OTEL_SDK_DISABLED=true`` or
                    ``OTEL_TRACES_EXPORTER=none`` turn it off)
  endpoint          OTEL_EXPORTER_OTLP_ENDPOINT (http: ``/v1/traces`` is added)
  protocol          OTEL_EXPORTER_OTLP_PROTOCOL: ``http/protobuf`` or ``grpc``
  headers           OTEL_EXPORTER_OTLP_HEADERS
  timeout_s         OTEL_EXPORTER_OTLP_TIMEOUT
  service_name      OTEL_SERVICE_NAME (default ``kvroute``)
  sampler           OTEL_TRACES_SAMPLER
  sample_ratio      OTEL_TRACES_SAMPLER_ARG
  ================  =========================================================

Prompt logs are off unless ``telemetry.prompt_logs`` turns them on for every request
(``enabled``), for some models or for some tenants; see ``promptlog.py``. The access log
(``telemetry.access_log``, off by default) writes one JSON line per API request, with no
prompt text, to a file or to standard error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvroute.router import validate as v
from kvroute.router.errors import ConfigError
from kvroute.router.secrets import Local

PROTOCOLS = ("http/protobuf", "grpc")
SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on", "parentbased_always_off",
            "parentbased_traceidratio")
SINKS = ("file", "span")


@dataclass(frozen=True)
class TracesConfig:
    enabled: bool | None = None  # None: on when an OTLP endpoint is configured here or in the environment
    endpoint: str | None = None
    protocol: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)  # often carry a token
    timeout_s: float | None = None
    service_name: str | None = None
    sampler: str | None = None
    sample_ratio: float | None = None


@dataclass(frozen=True)
class Redaction:
    pattern: re.Pattern[str]
    replace: str
    check: Callable[[str], bool] | None = None  # replace a match only when this says yes


def luhn(text: str) -> bool:
    """The card-number checksum: long numbers that are not cards (ids, timestamps) stay."""
    digits = [int(c) for c in text if c.isdigit()]
    total = sum(d if i % 2 == 0 else (d * 2 - 9 if d > 4 else d * 2) for i, d in enumerate(reversed(digits)))
    return total % 10 == 0


# What is replaced before any prompt or answer is written (``redact.defaults``).
DEFAULT_REDACTIONS = (
    Redaction(re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"), "[EMAIL]"),
    # API keys and tokens: sk-..., Bearer ..., AWS access key IDs, GitHub and Slack tokens
    Redaction(re.compile(r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{16,}"), "[API_KEY]"),
    Redaction(re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{16,}"), "Bearer [API_KEY]"),
    Redaction(re.compile(r"\bAKIA[0-9A-Z]{16}\b"), "[API_KEY]"),
    Redaction(re.compile(r"\b(?:ghp|gho|ghs|github_pat|xox[abpr])_?[A-Za-z0-9_-]{20,}"), "[API_KEY]"),
    # 13 to 19 digits, optionally grouped by spaces or dashes: card numbers
    Redaction(re.compile(r"\b(?:\d[ -]?){12,18}\d\b"), "[CARD]", luhn),
)


@dataclass(frozen=True)
class FileSink:
    path: str
    max_bytes: int = 100 * 2**20  # rotate when the file reaches this size
    backups: int = 5  # rotated files kept: prompts.jsonl.1 ... .N


@dataclass(frozen=True)
class PromptLogConfig:
    enabled: bool = False  # every request
    models: tuple[str, ...] = ()  # or: only these served models
    tenants: tuple[str, ...] = ()  # or: only these tenants (governance)
    sample_rate: float = 1.0
    file: FileSink | None = None
    span: bool = False  # gen_ai.input.messages / gen_ai.output.messages on the request's span
    redactions: tuple[Redaction, ...] = DEFAULT_REDACTIONS
    max_chars: int = 65536  # per message or answer; longer text is cut and marked

    @property
    def on(self) -> bool:
        return bool(self.enabled or self.models or self.tenants)


@dataclass(frozen=True)
class AccessLogConfig:
    enabled: bool = False
    file: FileSink | None = None  # None: standard error


@dataclass(frozen=True)
class TelemetryConfig:
    traces: TracesConfig = TracesConfig()
    prompt_logs: PromptLogConfig = PromptLogConfig()
    access_log: AccessLogConfig = AccessLogConfig()


def _parse_traces(raw: Any, key: str, local: Local) -> TracesConfig:
    raw = v.section(raw, ("enabled", "endpoint", "protocol", "headers", "timeout_s", "service_name", "sampler",
                          "sample_ratio"), key)
    headers = v.mapping(raw.get("headers") or {}, v.join(key, "headers"))
    ratio = v.get(raw, "sample_ratio", float, key, non_negative=True)
    if ratio is not None and ratio > 1:
        raise ConfigError(v.join(key, "sample_ratio"), f"must be between 0 and 1, got {ratio}")
    endpoint = v.get(raw, "endpoint", str, key)
    protocol = v.get(raw, "protocol", str, key)
    if protocol is not None and protocol not in PROTOCOLS:
        raise ConfigError(v.join(key, "protocol"), f"must be one of {', '.join(PROTOCOLS)}")
    if endpoint is not None and protocol != "grpc":
        v.http_url(endpoint, v.join(key, "endpoint"))
    sampler = v.get(raw, "sampler", str, key)
    if sampler is not None and sampler not in SAMPLERS:
        raise ConfigError(v.join(key, "sampler"), f"must be one of {', '.join(SAMPLERS)}")
    return TracesConfig(
        enabled=v.get(raw, "enabled", bool, key),
        endpoint=endpoint,
        protocol=protocol,
        headers={str(k): local.secret(h, v.join(v.join(key, "headers"), str(k))) for k, h in headers.items()},
        timeout_s=v.get(raw, "timeout_s", float, key, positive=True),
        service_name=v.get(raw, "service_name", str, key),
        sampler=sampler,
        sample_ratio=ratio,
    )


def _parse_redact(raw: Any, key: str) -> tuple[Redaction, ...]:
    raw = v.section(raw, ("defaults", "rules"), key)
    rules = list(DEFAULT_REDACTIONS) if v.get(raw, "defaults", bool, key, True) else []
    for i, rule in enumerate(v.items(raw.get("rules"), v.join(key, "rules"), "expected a list of {pattern, replace}")):
        rkey = v.join(v.join(key, "rules"), i)
        rule = v.section(rule, ("pattern", "replace"), rkey)
        pattern = v.required(rule, "pattern", str, rkey, "a regular expression")
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise ConfigError(v.join(rkey, "pattern"), f"not a valid regular expression: {exc}") from None
        rules.append(Redaction(compiled, v.get(rule, "replace", str, rkey, "[REDACTED]")))
    return tuple(rules)


def _parse_prompt_logs(raw: Any, key: str, local: Local) -> PromptLogConfig:
    raw = v.section(raw, ("enabled", "models", "tenants", "sample_rate", "file", "span", "redact", "max_chars"), key)
    rate = v.get(raw, "sample_rate", float, key, 1.0, non_negative=True)
    if rate > 1:
        raise ConfigError(v.join(key, "sample_rate"), f"must be between 0 and 1, got {rate}")
    sink = _parse_file(raw.get("file"), v.join(key, "file"), local, "prompt log")
    cfg = PromptLogConfig(
        enabled=v.get(raw, "enabled", bool, key, False),
        models=v.str_list(raw.get("models"), v.join(key, "models")),
        tenants=v.str_list(raw.get("tenants"), v.join(key, "tenants")),
        sample_rate=rate,
        file=sink,
        span=v.get(raw, "span", bool, key, False),
        redactions=_parse_redact(raw.get("redact") or {}, v.join(key, "redact")),
        max_chars=v.get(raw, "max_chars", int, key, PromptLogConfig.max_chars, positive=True),
    )
    if cfg.on and cfg.file is None and not cfg.span:
        raise ConfigError(key, "prompt logs are on but have nowhere to go: set 'file' and/or 'span: true'")
    return cfg


def _parse_file(raw: Any, key: str, local: Local, what: str) -> FileSink | None:
    if raw is None:
        return None
    f = v.section(raw, ("path", "max_bytes", "backups"), key)
    path = v.required(f, "path", str, key, "the JSONL file to write")
    local.path(str(Path(path).parent), v.join(key, "path"), f"no such folder for the {what}", folder=True)
    return FileSink(path=path, max_bytes=v.get(f, "max_bytes", int, key, FileSink.max_bytes, positive=True),
                    backups=v.get(f, "backups", int, key, FileSink.backups, non_negative=True))


def _parse_access_log(raw: Any, key: str, local: Local) -> AccessLogConfig:
    raw = v.section(raw, ("enabled", "file"), key)
    return AccessLogConfig(enabled=v.get(raw, "enabled", bool, key, False),
                           file=_parse_file(raw.get("file"), v.join(key, "file"), local, "access log"))


def parse_telemetry(raw: Any, key: str = "telemetry", *, local: Local = Local()) -> TelemetryConfig:
    raw = v.section(raw if raw is not None else {}, ("traces", "prompt_logs", "access_log"), key)
    return TelemetryConfig(
        traces=_parse_traces(raw.get("traces") or {}, v.join(key, "traces"), local),
        prompt_logs=_parse_prompt_logs(raw.get("prompt_logs") or {}, v.join(key, "prompt_logs"), local),
        access_log=_parse_access_log(raw.get("access_log") or {}, v.join(key, "access_log"), local),
    )
