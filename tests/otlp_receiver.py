"""A real OTLP/HTTP trace receiver for tests: an aiohttp app on its own thread that decodes
``ExportTraceServiceRequest`` (protobuf) with ``opentelemetry-proto`` and keeps the spans."""

from __future__ import annotations

import asyncio
import gzip
import threading
import time
from dataclasses import dataclass, field

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


@dataclass
class Span:
    service: str
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict
    events: list[tuple[str, dict]]
    status_code: int


def _value(v: AnyValue):
    which = v.WhichOneof("value")
    if which == "array_value":
        return tuple(_value(x) for x in v.array_value.values)
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which) if which else None


def _attrs(kvs) -> dict:
    return {kv.key: _value(kv.value) for kv in kvs}


@dataclass
class OtlpReceiver:
    port: int = 0
    spans: list[Span] = field(default_factory=list)
    posts: int = 0

    def start(self) -> OtlpReceiver:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def traces(request: web.Request) -> web.Response:
            raw = await request.read()
            if request.headers.get("content-encoding") == "gzip":
                raw = gzip.decompress(raw)
            msg = ExportTraceServiceRequest()
            msg.ParseFromString(raw)
            self.posts += 1
            for rs in msg.resource_spans:
                service = _attrs(rs.resource.attributes).get("service.name", "")
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append(Span(service, s.name, KINDS.get(s.kind, str(s.kind)), s.trace_id.hex(),
                                               s.span_id.hex(), s.parent_span_id.hex(), _attrs(s.attributes),
                                               [(e.name, _attrs(e.attributes)) for e in s.events], s.status.code))
            return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                                content_type="application/x-protobuf")

        async def serve() -> None:
            app = web.Application(client_max_size=64 * 2**20)
            app.router.add_post("/v1/traces", traces)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", self.port)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            ready.set()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(serve())
            self._loop.run_forever()
            self._loop.run_until_complete(self._runner.cleanup())
            self._loop.close()

        self._thread = threading.Thread(target=run, daemon=True, name="otlp-receiver")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the OTLP receiver did not start")
        return self

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def wait_for(self, predicate, timeout_s: float = 20.0) -> list[Span]:
        """Spans, once ``predicate(spans)`` holds (exports arrive in batches)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            spans = list(self.spans)
            if predicate(spans):
                return spans
            time.sleep(0.1)
        raise AssertionError(f"spans never matched; got {[(s.service, s.name) for s in self.spans]}")
