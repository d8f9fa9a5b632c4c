"""Proxy one request to one worker and account for it.

Non-streaming responses are read whole and passed through byte for byte. Streams are
relayed event by event as they arrive; the client response is only started once the
first upstream event is in hand, so a worker that fails before that can be retried
transparently on another worker. The router always asks the worker for a final usage
chunk (``stream_options.include_usage``) and strips it again when the client did not
ask for it.

``map_client_errors`` is the one boundary where aiohttp's exceptions become kvroute's.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
import orjson
from aiohttp import web

from kvroute.router import keys
from kvroute.router.errors import (
    KvrouteError,
    UpstreamConnectError,
    UpstreamConnectionLost,
    UpstreamStatusError,
    UpstreamTimeout,
)
from kvroute.router.policies.base import RequestContext
from kvroute.router.requests import ParsedRequest
from kvroute.router.routes import ModelRoute
from kvroute.router.upstream.workers import Worker

WORKER_HEADER = "x-kvroute-worker"
TIER_HEADER = "x-kvroute-tier"
# prompt tokens the router expected the worker to have cached; against the response's
# usage.prompt_tokens_details.cached_tokens it shows where the prefix index was wrong
PREDICTED_HEADER = "x-kvroute-predicted-cached-tokens"


@contextlib.contextmanager
def map_client_errors(worker: Worker) -> Iterator[None]:
    try:
        yield
    except TimeoutError as exc:
        raise UpstreamTimeout(f"Worker {worker.url} timed out") from exc
    except aiohttp.ClientConnectorError as exc:  # no connection could be made: down
        raise UpstreamConnectError(f"Worker {worker.url} failed: {type(exc).__name__}: {exc}") from exc
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
        raise UpstreamConnectionLost(
            f"Worker {worker.url} failed: {type(exc).__name__}: {exc}") from exc


class StreamMeter(Protocol):
    """What watches a response on its way to the client (governance's grant): it counts
    what the worker produced, and can stop the request before a call or cut its stream."""

    cut: KvrouteError | None  # why the stream was cut, once it was

    def check(self) -> None:
        """Before each upstream call; raises to stop the request."""

    def on_stream_event(self, data: bytes) -> bool:
        """One SSE event; False: cut the stream before it."""

    def on_response(self, body: object) -> None:
        """A whole (non-streaming) response body."""


@dataclass
class Dispatch:
    route: ModelRoute
    worker: Worker
    ctx: RequestContext
    req: ParsedRequest
    client_started: bool = False  # bytes were sent to the client: no retry from here on
    usage: dict | None = None
    status: str = "error"
    started_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    meter: StreamMeter | None = None  # governance: counts the stream and may cut it
    extra_headers: dict[str, str] = field(default_factory=dict)  # e.g. the cascade's x-kvroute-escalated
    usage_add: dict | None = None  # cascade: earlier tries' usage, added to the usage the client sees
    predicted_cached: int = 0  # prompt tokens the policy expected ``worker`` to have cached


def upstream_body(d: Dispatch) -> bytes:
    body = dict(d.req.body)
    body["model"] = d.route.cfg.served_name
    if d.req.stream:
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    return orjson.dumps(body)


async def forward(request: web.Request, d: Dispatch) -> web.StreamResponse:
    if d.meter is not None:
        d.meter.check()  # e.g. the kill switch, before every upstream call
    app = request.app
    session = app[keys.SESSION]
    policy = d.route.policy
    worker = d.worker
    predicted = d.predicted_cached = policy.predicted_cached_tokens(worker, d.ctx)
    load_tokens = max(0, d.ctx.prompt_tokens - predicted) + d.ctx.max_tokens
    policy.on_dispatch(worker, d.ctx)
    worker.in_flight_requests += 1
    worker.in_flight_tokens += load_tokens
    metrics = app[keys.METRICS]
    labels = (d.route.cfg.name, worker.url)
    metrics.in_flight.labels(*labels).inc()
    try:
        with map_client_errors(worker):
            async with session.post(
                worker.url + d.req.path,
                data=upstream_body(d),
                headers={"content-type": "application/json", **_trace_headers(d.req), **worker.upstream_headers},
            ) as resp:
                if resp.status >= 400:
                    body = await resp.read()
                    d.status = str(resp.status)
                    raise UpstreamStatusError(resp.status, body, resp.headers.get("content-type"))
                if d.req.stream:
                    response = await _relay_stream(request, resp, d)
                else:
                    response = await _relay_whole(resp, d)
        if d.status == "error":  # not already cut, abandoned or failed mid-stream
            d.status = "ok"
        metrics.predicted_cached_tokens.labels(*labels).inc(predicted)
        return response
    except UpstreamConnectError as exc:
        # A lost connection is not ejected: ejection drops the worker's prefix-index
        # entries, and a keep-alive race once moved four agents off their histories.
        if not d.client_started and not isinstance(exc, UpstreamConnectionLost):
            app[keys.HEALTH].eject(worker, exc.message)
        raise
    finally:
        worker.in_flight_requests -= 1
        worker.in_flight_tokens -= load_tokens
        metrics.in_flight.labels(*labels).dec()
        policy.on_complete(worker, d.ctx, d.status == "ok")
        account(app, d)


async def _relay_whole(resp: aiohttp.ClientResponse, d: Dispatch) -> web.Response:
    raw = await resp.read()
    d.first_token_at = time.perf_counter()
    with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
        parsed = orjson.loads(raw)
        if d.meter is not None:
            d.meter.on_response(parsed)
        d.usage = parsed.get("usage")
    return web.Response(body=raw, status=resp.status, content_type="application/json",
                        headers=response_headers(d))


async def _relay_stream(request: web.Request, resp: aiohttp.ClientResponse, d: Dispatch) -> web.StreamResponse:
    out: web.StreamResponse | None = None
    event: list[bytes] = []
    try:
        async for line in resp.content:
            if line not in (b"\n", b"\r\n"):
                event.append(line)
                continue
            if not event:
                continue
            data = b"".join(event)
            event = []
            if not _keep_event(data, d):
                continue
            if d.usage_add and b'"usage"' in data:
                data = _with_usage_added(data, d.usage_add)
            if d.meter is not None and not d.meter.on_stream_event(data):
                return await _cut_stream(request, out, d)
            if out is None:
                out = await _start_stream(request, d)
            if d.first_token_at is None:
                d.first_token_at = time.perf_counter()
            try:
                await out.write(data + b"\n")
            except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                d.status = "client_disconnected"
                return out  # the client left; stop reading the worker
    except (TimeoutError, aiohttp.ClientError) as exc:
        if out is None:
            raise  # nothing sent yet: map_client_errors makes it retryable
        # Too late to retry: end the stream with a clean, final SSE error event.
        d.status = "upstream_error"
        err = UpstreamConnectError(f"Worker {d.worker.url} failed mid-stream: {type(exc).__name__}")
        with contextlib.suppress(ConnectionResetError, aiohttp.ClientConnectionResetError):
            await out.write(b"data: " + orjson.dumps(err.to_body()) + b"\n\n")
            await out.write_eof()
        return out
    if out is None:  # an empty stream: still answer well-formed SSE
        out = await _start_stream(request, d)
    await out.write_eof()
    return out


async def _cut_stream(request: web.Request, out: web.StreamResponse | None, d: Dispatch) -> web.StreamResponse:
    """A governance limit was crossed mid-stream: end with a clean, final SSE error event."""
    if out is None:
        out = await _start_stream(request, d)
    with contextlib.suppress(ConnectionResetError, aiohttp.ClientConnectionResetError):
        cut = d.meter.cut if d.meter is not None else None
        await out.write(b"data: " + orjson.dumps((cut or KvrouteError("Stream stopped")).to_body()) + b"\n\n")
        await out.write_eof()
    return out


async def _start_stream(request: web.Request, d: Dispatch) -> web.StreamResponse:
    out = web.StreamResponse(
        status=200,
        headers={"content-type": "text/event-stream", "cache-control": "no-cache", **response_headers(d)},
    )
    await out.prepare(request)
    d.client_started = True
    return out


def response_headers(d: Dispatch) -> dict[str, str]:
    headers = {WORKER_HEADER: d.worker.url, PREDICTED_HEADER: str(d.predicted_cached)}
    if d.route.cfg.tier:
        headers[TIER_HEADER] = d.route.cfg.tier
    headers.update(d.extra_headers)
    return headers


def add_usage(a: dict | None, b: dict | None) -> dict:
    """Token counts of two usage objects summed (the cascade reports every try's tokens)."""
    out = dict(b or {})
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        out[key] = _int((a or {}).get(key)) + _int((b or {}).get(key))
    return out


def _with_usage_added(data: bytes, extra: dict) -> bytes:
    try:
        chunk = orjson.loads(data[6:])
    except orjson.JSONDecodeError:
        return data
    if not isinstance(chunk, dict) or not isinstance(chunk.get("usage"), dict):
        return data
    chunk["usage"] = add_usage(extra, chunk["usage"])
    return b"data: " + orjson.dumps(chunk) + b"\n"


def _keep_event(data: bytes, d: Dispatch) -> bool:
    """Record usage; drop the usage-only chunk unless the client asked for it."""
    if not data.startswith(b"data: {") or b'"usage"' not in data:
        return True
    try:
        chunk = orjson.loads(data[6:])
    except orjson.JSONDecodeError:
        return True
    usage = chunk.get("usage") if isinstance(chunk, dict) else None
    if usage:
        d.usage = usage
        if not chunk.get("choices") and not d.req.wants_usage_chunk:
            return False
    return True


def _trace_headers(req: ParsedRequest) -> dict[str, str]:
    tp = req.headers.get("traceparent")
    return {"traceparent": tp} if tp else {}


def account(app: web.Application, d: Dispatch) -> None:
    """Per-worker token and latency metrics from the response's own usage."""
    m = app[keys.METRICS]
    labels = (d.route.cfg.name, d.worker.url)
    m.requests.labels(*labels, d.status).inc()
    now = time.perf_counter()
    if d.first_token_at is not None:
        m.ttft.labels(*labels).observe(d.first_token_at - d.started_at)
    if d.status == "ok":
        m.latency.labels(*labels).observe(now - d.started_at)
    usage = d.usage or {}
    if not isinstance(usage, dict):
        return
    m.prompt_tokens.labels(*labels).inc(_int(usage.get("prompt_tokens")))
    m.completion_tokens.labels(*labels).inc(_int(usage.get("completion_tokens")))
    details = usage.get("prompt_tokens_details") or {}
    if isinstance(details, dict):
        m.cached_tokens.labels(*labels).inc(_int(details.get("cached_tokens")))


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
