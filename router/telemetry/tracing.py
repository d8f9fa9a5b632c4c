"""OpenTelemetry tracing: one TracerProvider per router app, exporting over OTLP.

The provider is the app's own object, never the process-wide global, so two apps in one
process (tests, ``--procs``) keep their traces apart. Spans leave through the SDK's
``BatchSpanProcessor``, on its own thread: the event loop only fills a queue. The SDK is
imported only when tracing is on.

``traceparent`` and ``tracestate`` are read and written with the W3C propagator. With
tracing off the router passes both to the worker untouched, so a trace started by the
client still reaches vLLM's own spans.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kvroute.router.telemetry.config import TracesConfig

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

TRUE = ("1", "true", "yes", "on")


def tracing_on(cfg: TracesConfig, env: Mapping[str, str]) -> bool:
    """As the OTel SDKs do: an OTLP endpoint turns traces on, unless something turns them off."""
    if cfg.enabled is not None:
        return cfg.enabled
    if env.get("OTEL_SDK_DISABLED", "").lower() in TRUE or env.get("OTEL_TRACES_EXPORTER", "").lower() == "none":
        return False
    return bool(cfg.endpoint or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def _protocol(cfg: TracesConfig, env: Mapping[str, str]) -> str:
    return (cfg.protocol or env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf")


def _exporter(cfg: TracesConfig, env: Mapping[str, str]) -> Any:
    """The OTLP span exporter; what the config leaves unset, the SDK reads from the environment."""
    kwargs: dict[str, Any] = {}
    if cfg.headers:
        kwargs["headers"] = dict(cfg.headers)
    if cfg.timeout_s is not None:
        kwargs["timeout"] = cfg.timeout_s
    if _protocol(cfg, env) == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        if cfg.endpoint:
            kwargs["endpoint"] = cfg.endpoint
        return GrpcExporter(**kwargs)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    if cfg.endpoint:  # a base URL, like OTEL_EXPORTER_OTLP_ENDPOINT
        base = cfg.endpoint.rstrip("/")
        kwargs["endpoint"] = base if base.endswith("/v1/traces") else base + "/v1/traces"
    return HttpExporter(**kwargs)


def _sampler(cfg: TracesConfig) -> Any:
    """The configured sampler, or None to let the SDK read OTEL_TRACES_SAMPLER."""
    if cfg.sampler is None and cfg.sample_ratio is None:
        return None
    from opentelemetry.sdk.trace import sampling

    name = cfg.sampler or "parentbased_traceidratio"
    ratio = 1.0 if cfg.sample_ratio is None else cfg.sample_ratio
    root = {"always_on": sampling.ALWAYS_ON, "always_off": sampling.ALWAYS_OFF,
            "traceidratio": sampling.TraceIdRatioBased(ratio)}
    if name.startswith("parentbased_"):
        return sampling.ParentBased(root[name.removeprefix("parentbased_")])
    return root[name]


class Tracing:
    """The app's tracer, its propagator and its provider's lifecycle."""

    def __init__(self, provider: TracerProvider):
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer: Tracer = provider.get_tracer("kvroute")
        self.propagator = TraceContextTextMapPropagator()

    @classmethod
    def create(cls, cfg: TracesConfig, env: Mapping[str, str] | None = None, *,
               exporter: Any = None) -> Tracing | None:
        """None when tracing is off. ``exporter``: a span exporter to use instead of OTLP's."""
        env = os.environ if env is None else env
        if exporter is None and not tracing_on(cfg, env):
            return None
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        attrs = {"service.name": cfg.service_name} if cfg.service_name else {}
        resource = Resource.create(attrs)
        if not cfg.service_name and not env.get("OTEL_SERVICE_NAME") and \
                str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": "kvroute"}))
        sampler = _sampler(cfg)
        provider = TracerProvider(resource=resource, **({"sampler": sampler} if sampler is not None else {}))
        provider.add_span_processor(BatchSpanProcessor(exporter or _exporter(cfg, env)))
        return cls(provider)

    def extract(self, headers: Mapping[str, str]) -> Context:
        """The caller's trace context (``traceparent``, ``tracestate``), if any."""
        return self.propagator.extract(headers)

    def inject(self, span: Span) -> dict[str, str]:
        """``traceparent`` (and ``tracestate``) naming ``span`` as the parent."""
        from opentelemetry import trace

        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=trace.set_span_in_context(span))
        return carrier

    def start(self, name: str, parent: Span | Context | None, kind: str = "internal",
              attributes: Mapping[str, Any] | None = None, start_time: int | None = None) -> Span:
        from opentelemetry import trace

        context = trace.set_span_in_context(parent) if isinstance(parent, trace.Span) else parent
        return self.tracer.start_span(name, context=context, kind=getattr(trace.SpanKind, kind.upper()),
                                      attributes=attributes, start_time=start_time)

    def shutdown(self) -> None:
        """Export what is queued, then stop (blocking: run it off the loop)."""
        self.provider.shutdown()
