"""Proxy one request to one worker and account for it.

Non-streaming responses are read whole and passed through byte for byte. Streams are
relayed event by event as they arrive; the client response is only started once the
first upstream event is in hand, so a worker that fails before that can be retried
transparently on another worker. The router always asks the worker for a final usage
chunk (``stream_options.include_usage``) and strips it again when the client did not
ask for it.

Each call runs within its pool's ``timeouts``: ``connect_s`` to connect; for a stream,
``first_byte_s`` until the response headers and the first SSE event are in, then
``idle_s`` between events; and the request's overall deadline (``server.request_timeout_s``,
across its retries) for all of it.

``map_client_errors`` is the one boundary where aiohttp's exceptions become kvroute's
before the first byte; ``_fail_stream`` is the one boundary after it: whatever fails once
the client has bytes ends the stream with a final SSE error event, and is accounted. Each
call's outcome is reported to the worker's circuit breaker (``router.retry.RULES`` says
which outcomes count as failures).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from kvroute.router import keys
from kvroute.router.errors import (
    KvrouteError,
    UpstreamConnectError,
    UpstreamConnectionLost,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamFirstByteTimeout,
    UpstreamIdleTimeout,
    UpstreamRedirect,
    UpstreamStatusError,
    UpstreamTimeout,
    sse_error,
)
from kvroute.router.policies.base import RequestContext
from kvroute.router.requests import (
    CHAT,
    COHERE_CHAT,
    COHERE_EMBED,
    COMPLETION,
    GENERATE,
    MESSAGES,
    RENDERED,
    REQUEST_ID,
    RESPONSES,
    ParsedRequest,
)
from kvroute.router.retry import classify
from kvroute.router.routes import ModelRoute
from kvroute.router.upstream.breaker import Outcome
from kvroute.router.upstream.workers import Worker

if TYPE_CHECKING:
    from kvroute.router.telemetry.record import Capture

log = logging.getLogger(__name__)

WORKER_HEADER = "x-kvroute-worker"
TIER_HEADER = "x-kvroute-tier"
# prompt tokens the router expected the worker to have cached; against the response's
# usage.prompt_tokens_details.cached_tokens it shows where the prefix index was wrong
PREDICTED_HEADER = "x-kvroute-predicted-cached-tokens"


# The largest SSE event relayed; a larger one ends the stream as a bad response. It bounds
# what one stream buffers. A vLLM delta is usually a few tokens, but a tool call's
# arguments or logprobs can make one event large: aiohttp's own line limit (512 KiB)
# once turned a 700 KB delta into an unhandled error.
MAX_EVENT_BYTES = 16 * 2**20

# aiohttp's failures while talking to a worker (HttpProcessingError: a malformed answer)
CLIENT_ERRORS = (TimeoutError, aiohttp.ClientError, HttpProcessingError)


def upstream_error(exc: BaseException, worker: Worker) -> UpstreamError:
    """One of ``CLIENT_ERRORS`` as kvroute's error (an ``UpstreamError`` as it is)."""
    if isinstance(exc, UpstreamError):
        return exc
    what = f"{type(exc).__name__}: {exc}".rstrip(": ")
    if isinstance(exc, aiohttp.ConnectionTimeoutError):  # timeouts.connect_s
        return UpstreamConnectTimeout(f"Worker {worker.url}: no connection in time ({what})")
    if isinstance(exc, TimeoutError):  # aiohttp's total: the request's overall deadline
        return UpstreamTimeout(f"Worker {worker.url} timed out (server.request_timeout_s)")
    if isinstance(exc, aiohttp.ClientConnectorError):  # no connection could be made: down
        return UpstreamConnectError(f"Worker {worker.url} failed: {what}")
    if isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
        return UpstreamConnectionLost(f"Worker {worker.url} failed: {what}")
    return UpstreamError(f"Worker {worker.url} sent a bad response: {what}")


@contextlib.contextmanager
def map_client_errors(worker: Worker) -> Iterator[None]:
    try:
        yield
    except CLIENT_ERRORS as exc:
        raise upstream_error(exc, worker) from exc


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
    usage: dict | None = None  # under the chat names, whatever the API
    raw_usage: dict | None = None  # an Anthropic stream's usage so far, as its events give it
    status: str = "error"
    started_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    meter: StreamMeter | None = None  # governance: counts the stream and may cut it
    extra_headers: dict[str, str] = field(default_factory=dict)  # e.g. the cascade's x-kvroute-escalated
    usage_add: dict | None = None  # cascade: earlier tries' usage, added to the usage the client sees
    predicted_cached: int = 0  # prompt tokens the policy expected ``worker`` to have cached
    deadline: float | None = None  # loop time when server.request_timeout_s is spent; None: from now
    probe: bool = False  # this call is the worker's half-open breaker probe
    failed: UpstreamError | None = None  # why the stream failed after its first byte
    on_response_id: Callable[[str], None] | None = None  # a Responses answer's id (router/stored_responses.py)
    capture: Capture | None = None  # telemetry: gathers the answer's text and finish reasons
    trace_headers: dict[str, str] | None = None  # traceparent/tracestate of this try's span; None: pass through
    # The request's first try only: when the request reached the router (None on later tries
    # and escalations, whose time before the call includes earlier tries). With ``sent_at`` it
    # gives the time the request spent in kvroute itself: a stream's with ``relay_s``
    # (account()), a whole answer's when the server starts writing it (on_response_prepare).
    arrived_at: float | None = None
    sent_at: float | None = None  # when the call to the worker began
    relay_s: float = 0.0  # a stream's: from the worker's first event to the client's
    # Awaited once a stream has all its events, before the client sees its end ([DONE], or
    # the end of the response): the response cache stores the answer there, so a client that
    # asks again at once finds it. Never raises.
    before_end: Callable[[], Awaitable[None]] | None = None


def upstream_body(d: Dispatch) -> bytes:
    body = dict(d.req.body)
    body["model"] = d.route.cfg.served_name
    if d.req.stream and d.req.kind in (CHAT, COMPLETION, GENERATE):  # other APIs' streams carry their usage anyway
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    return orjson.dumps(body)


async def forward(request: web.Request, d: Dispatch) -> web.StreamResponse:
    if d.arrived_at is None:  # a later try (an escalation): the first try's answer is not the client's
        request.pop(keys.ROUTER_ADDED, None)
    if d.meter is not None:
        d.meter.check()  # e.g. the kill switch, before every upstream call
    app = request.app
    policy = d.route.policy
    worker = d.worker
    predicted = d.predicted_cached = policy.predicted_cached_tokens(worker, d.ctx)
    load_tokens = max(0, d.ctx.prompt_tokens - predicted) + d.ctx.max_tokens
    policy.on_dispatch(worker, d.ctx)
    d.probe = worker.breaker.on_dispatch()
    worker.in_flight_requests += 1
    worker.in_flight_tokens += load_tokens
    metrics = app[keys.METRICS]
    series = metrics.worker_series(d.route.cfg.name, worker.url)
    series.in_flight.inc()
    outcome = Outcome.IGNORED  # for the breaker; e.g. the client left before the answer began
    try:
        with map_client_errors(worker):
            async with contextlib.AsyncExitStack() as stack:
                resp, first_byte_at = await _open(request, stack, d)
                if resp.status >= 400:
                    body = await resp.read()
                    d.status = str(resp.status)
                    raise UpstreamStatusError(resp.status, body, resp.headers.get("content-type"),
                                              resp.headers.get("retry-after"))
                if resp.status >= 300:
                    d.status = str(resp.status)
                    raise UpstreamRedirect(
                        f"Worker {worker.url} answered HTTP {resp.status} to "
                        f"{resp.headers.get('location', 'no location')}; kvroute follows no "
                        "redirect: set the worker's URL to the address it should be called at")
                if d.req.stream:
                    response = await _relay_stream(request, resp, d, first_byte_at)
                else:
                    response = await _relay_whole(resp, d)
        if d.status == "error":  # not already cut, abandoned or failed mid-stream
            d.status = "ok"
            if not d.req.stream and d.arrived_at is not None and d.sent_at is not None:
                # kvroute's time runs on until the server writes the answer (on_response_prepare)
                request[keys.ROUTER_ADDED] = (series.router_added, d.sent_at - d.arrived_at, d.first_token_at)
        if d.failed is not None:
            outcome = _breaker_outcome(d.failed, client_started=True)
        elif d.status == "ok":
            outcome = Outcome.SUCCESS
        series.predicted_cached_tokens.inc(predicted)
        return response
    except asyncio.CancelledError:  # the client hung up (server.py), or the drain cut the request
        if d.status == "error" and (request.transport is None or request.transport.is_closing()):
            d.status = "client_disconnected"
        raise
    except UpstreamError as exc:
        outcome = _breaker_outcome(exc, client_started=d.client_started)
        # A lost connection is not ejected: ejection drops the worker's prefix-index
        # entries, and a keep-alive race once moved four agents off their histories.
        if (isinstance(exc, UpstreamConnectError) and not d.client_started
                and not isinstance(exc, UpstreamConnectionLost)):
            app[keys.HEALTH].eject(worker, exc.message)
        raise
    finally:
        worker.in_flight_requests -= 1
        worker.in_flight_tokens -= load_tokens
        series.in_flight.dec()  # a worker's series outlive its last request (request_accounted)
        policy.on_complete(worker, d.ctx, d.status == "ok")
        worker.breaker.record(outcome, probe=d.probe)
        account(app, d)
        worker.request_accounted()  # the last request of a worker that left: its series go now


def _breaker_outcome(exc: UpstreamError, *, client_started: bool) -> Outcome:
    rule = classify(exc, client_started=client_started)
    return rule.breaker if rule is not None else Outcome.IGNORED


async def _open(request: web.Request, stack: contextlib.AsyncExitStack,
                d: Dispatch) -> tuple[aiohttp.ClientResponse, float | None]:
    """Connect, send the request and wait for the response headers, within the pool's
    timeouts. Returns the response and, for a stream, when its first event is due."""
    server = request.app[keys.CONFIG].server
    timeouts = d.route.cfg.timeouts
    loop = asyncio.get_running_loop()
    now = loop.time()
    remaining = d.deadline - now if d.deadline is not None else server.request_timeout_s
    if remaining <= 0:
        raise UpstreamTimeout(f"Worker {d.worker.url} not tried: server.request_timeout_s is spent")
    client_timeout = aiohttp.ClientTimeout(total=remaining, sock_connect=timeouts.connect_s or server.connect_timeout_s)
    first_byte_at = now + timeouts.first_byte_s if d.req.stream else None
    timer = asyncio.timeout_at(first_byte_at)
    body = upstream_body(d)
    headers = {"content-type": "application/json", **_trace_headers(d), **d.worker.upstream_headers}
    if (rid := d.req.headers.get(REQUEST_ID)) is not None:
        headers[REQUEST_ID] = rid
    d.sent_at = time.perf_counter()
    try:
        async with timer:
            resp = await stack.enter_async_context(request.app[keys.SESSION].post(
                d.worker.url + d.req.path, data=body, headers=headers, timeout=client_timeout,
                allow_redirects=False, ssl=d.worker.ssl))
    except TimeoutError as exc:
        if timer.expired():
            raise _stalled(d, first=True) from exc
        raise
    return resp, first_byte_at


def _stalled(d: Dispatch, *, first: bool) -> UpstreamTimeout:
    t = d.route.cfg.timeouts
    if first:
        return UpstreamFirstByteTimeout(f"Worker {d.worker.url} sent nothing within "
                                        f"timeouts.first_byte_s ({t.first_byte_s:g}s)")
    return UpstreamIdleTimeout(f"Worker {d.worker.url} stalled for timeouts.idle_s ({t.idle_s:g}s)")


async def _relay_whole(resp: aiohttp.ClientResponse, d: Dispatch) -> web.Response:
    raw = await resp.read()
    d.first_token_at = time.perf_counter()
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        parsed = None
    if d.req.kind in RENDERED and resp.status == 200:
        return _relay_render(parsed, resp, d)
    if not isinstance(parsed, dict):  # e.g. an ingress's HTML page: not a completion to pass on
        raise UpstreamError(f"Worker {d.worker.url} answered HTTP {resp.status} with a body that is "
                            f"not a JSON object (content-type {resp.content_type})")
    if d.meter is not None:
        d.meter.on_response(parsed)
    if d.capture is not None:
        d.capture.whole(parsed)
    if d.req.kind == RESPONSES:
        d.usage = responses_usage(parsed.get("usage"))
        if d.on_response_id is not None and resp.status == 200 and isinstance(parsed.get("id"), str):
            d.on_response_id(parsed["id"])
    elif d.req.kind == MESSAGES:
        d.usage = anthropic_usage(parsed.get("usage"))
    elif d.req.kind == COHERE_EMBED:
        d.usage = cohere_usage(parsed.get("meta"))
    elif d.req.kind == COHERE_CHAT:
        d.usage = cohere_chat_usage(parsed.get("usage"))
    else:
        d.usage = parsed.get("usage")
    return web.Response(body=raw, status=resp.status, content_type="application/json",
                        headers=response_headers(d))


def _relay_render(parsed: object, resp: aiohttp.ClientResponse, d: Dispatch) -> web.Response:
    """A render's answer: a generate request's body (a list of them for a completion), under
    the model name the client used, so it can be sent back through this router as it is."""
    bodies: list[Any] = parsed if isinstance(parsed, list) else [parsed]
    if not bodies or not all(isinstance(b, dict) for b in bodies):
        raise UpstreamError(f"Worker {d.worker.url} answered a render with a body that is not a generate "
                            f"request (content-type {resp.content_type})")
    for b in bodies:
        b["model"] = d.req.model
    return web.Response(body=orjson.dumps(parsed), status=resp.status, content_type="application/json",
                        headers=response_headers(d))


class _SseEvents:
    """A worker's stream cut into SSE events: each event's lines, without the blank line
    that ends it. Events are bounded by ``MAX_EVENT_BYTES``, not by aiohttp's line limit."""

    def __init__(self, content: aiohttp.StreamReader, d: Dispatch):
        self._content = content
        self._d = d
        self._buf = bytearray()
        self._scanned = 0  # _buf holds no newline before this
        self._lines: list[bytes] = []
        self._size = 0  # bytes in _lines
        self._ready: collections.deque[bytes] = collections.deque()
        self._eof = False

    async def next(self, deadline: float | None, *, first: bool) -> bytes | None:
        """The next event, or None at the end of the stream. Raises the first-byte (or idle)
        timeout when nothing comes by ``deadline`` (loop time)."""
        while not self._ready:
            if self._eof:
                return None  # an unterminated last event is dropped, as the SSE spec says
            timer = asyncio.timeout_at(deadline)
            try:
                async with timer:
                    chunk = await self._content.readany()
            except TimeoutError as exc:
                if timer.expired():
                    raise _stalled(self._d, first=first) from exc
                raise
            if chunk:
                self._feed(chunk)
            else:
                self._eof = True
        return self._ready.popleft()

    def _feed(self, chunk: bytes) -> None:
        buf = self._buf
        buf += chunk
        start = 0
        while (end := buf.find(b"\n", self._scanned)) != -1:
            line = bytes(buf[start:end + 1])
            start = self._scanned = end + 1
            if line in (b"\n", b"\r\n"):
                if self._lines:
                    self._ready.append(b"".join(self._lines))
                    self._lines, self._size = [], 0
            else:
                self._lines.append(line)
                self._size += len(line)
                self._check(0)
        del buf[:start]
        self._scanned = len(buf)
        self._check(len(buf))  # an event still arriving

    def _check(self, pending: int) -> None:
        if self._size + pending > MAX_EVENT_BYTES:
            raise UpstreamError(f"Worker {self._d.worker.url} sent an SSE event over {MAX_EVENT_BYTES} bytes")


async def _relay_stream(request: web.Request, resp: aiohttp.ClientResponse, d: Dispatch,
                        first_byte_at: float | None) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
    idle_s = d.route.cfg.timeouts.idle_s
    events = _SseEvents(resp.content, d)
    out: web.StreamResponse | None = None
    deadline, first = first_byte_at, True
    received: float | None = None
    try:
        while (data := await events.next(deadline, first=first)) is not None:
            if _ERROR_EVENT.match(data):  # vLLM failed the request inside its stream
                _stream_error(data, d, before_client=out is None)
            if first:
                received = time.perf_counter()
            first = False
            if d.capture is not None:
                d.capture.event(data)
            if _keep_event(data, d):
                if d.usage_add and b'"usage"' in data:
                    data = _with_usage_added(data, d.usage_add)
                if d.meter is not None and not d.meter.on_stream_event(data):
                    return await _cut_stream(request, out, d)
                if out is None:
                    out = await _start_stream(request, d)
                if d.first_token_at is None:
                    d.first_token_at = time.perf_counter()
                if d.before_end is not None and data.startswith(b"data: [DONE]"):
                    await _before_end(d)  # the client stops reading at [DONE]
                if not await _send(out, d, data + b"\n"):
                    return out  # the client left; stop reading the worker
                if received is not None:  # the client's first event is out
                    d.relay_s, received = time.perf_counter() - received, None
            deadline = loop.time() + idle_s  # from here: the worker's gap, not a slow client's
        if out is None:
            if first:  # vLLM's streams always have events: this is not one (an ingress's page?)
                raise UpstreamError(f"Worker {d.worker.url} ended its stream without an SSE event "
                                    f"(content-type {resp.content_type})")
            out = await _start_stream(request, d)  # every event was the router's: still well-formed SSE
        if d.before_end is not None:
            await _before_end(d)
        await _send(out, d, None)
    except Exception as exc:
        if out is None:
            raise  # nothing sent yet: the retry table decides (router/retry.py)
        await _fail_stream(out, d, exc)
    return out


_ERROR_EVENT = re.compile(rb'data: \{\s*"error"')


def _stream_error(data: bytes, d: Dispatch, *, before_client: bool) -> None:
    """A worker's error event (vLLM's ``{"error": {..., "code": status}}``, then ``[DONE]``).
    Before the client's stream began it is the worker's error status, which the retry table
    judges (a 500 goes to another worker, a 400 to the client). After, the client gets the
    event as sent, and a 5xx counts as the try's failure, against the worker's breaker."""
    try:
        err = orjson.loads(data[6:]).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        err = None
    if not isinstance(err, dict):
        return
    code = err.get("code")
    status = code if isinstance(code, int) and 400 <= code < 600 else 500
    if before_client:
        d.status = str(status)
        raise UpstreamStatusError(status, orjson.dumps({"error": err}), "application/json")
    if status < 500:  # the request's fault, found late (vLLM checks some fields as it generates)
        d.status = str(status)
        return
    d.status = "upstream_error"
    d.failed = UpstreamError(f"Worker {d.worker.url} failed the stream: {err.get('message')}")


async def _before_end(d: Dispatch) -> None:
    hook, d.before_end = d.before_end, None
    if hook is not None:
        await hook()


async def _send(out: web.StreamResponse, d: Dispatch, data: bytes | None) -> bool:
    """Write to the client (None: end the response); False when the client has left.

    A client that leaves while the response ends had every event: the openai client closes
    the connection at ``[DONE]``, before the chunked body's last bytes."""
    try:
        if data is None:
            await out.write_eof()
        else:
            await out.write(data)
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        if data is not None:
            d.status = "client_disconnected"
        return False
    return True


async def _fail_stream(out: web.StreamResponse, d: Dispatch, exc: Exception) -> None:
    """The one error boundary after the first byte: too late to retry, so whatever failed,
    the stream ends with a clean, final SSE error event (OpenAI's error JSON)."""
    err: KvrouteError
    if isinstance(exc, (UpstreamError, *CLIENT_ERRORS)):
        err = d.failed = upstream_error(exc, d.worker)
        d.status = "upstream_timeout" if isinstance(err, UpstreamTimeout) else "upstream_error"
        log.warning("stream %s from %s failed after its first byte: %s", d.req.headers.get(REQUEST_ID, "-"),
                    d.worker.url, err.message)
    else:  # the router's own fault; the worker is not blamed
        log.error("stream from %s failed in the router", d.worker.url, exc_info=exc)
        err = KvrouteError("Internal router error")
        d.status = "internal_error"
    with contextlib.suppress(ConnectionResetError, aiohttp.ClientConnectionResetError):
        await out.write(sse_error(err, d.req.path))
        await out.write_eof()


async def _cut_stream(request: web.Request, out: web.StreamResponse | None, d: Dispatch) -> web.StreamResponse:
    """A governance limit was crossed mid-stream: end with a clean, final SSE error event."""
    if out is None:
        out = await _start_stream(request, d)
    with contextlib.suppress(ConnectionResetError, aiohttp.ClientConnectionResetError):
        cut = d.meter.cut if d.meter is not None else None
        await out.write(sse_error(cut or KvrouteError("Stream stopped"), d.req.path))
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


def responses_usage(usage: object) -> dict | None:
    """A Responses ``usage`` under the chat names that accounting reads."""
    if not isinstance(usage, dict):
        return None
    details = usage.get("input_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return {"prompt_tokens": usage.get("input_tokens"), "completion_tokens": usage.get("output_tokens"),
            "total_tokens": usage.get("total_tokens"), "prompt_tokens_details": {"cached_tokens": cached}}


def cohere_usage(meta: object) -> dict:
    """A Cohere embed answer's billed input tokens (in ``meta``) as chat usage: prompt tokens only."""
    billed = (meta.get("billed_units") if isinstance(meta, dict) else None) or {}
    tokens = _int(billed.get("input_tokens")) + _int(billed.get("image_tokens"))
    return {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens}


def cohere_chat_usage(usage: object) -> dict | None:
    """A Cohere chat's ``usage`` (its ``tokens``, else its ``billed_units``) under the chat names."""
    if not isinstance(usage, dict):
        return None
    tokens = usage.get("tokens") if isinstance(usage.get("tokens"), dict) else usage.get("billed_units")
    if not isinstance(tokens, dict):
        return None
    prompt, output = _int(tokens.get("input_tokens")), _int(tokens.get("output_tokens"))
    return {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output,
            "prompt_tokens_details": {"cached_tokens": _int(usage.get("cached_tokens"))}}


def anthropic_usage(usage: object) -> dict | None:
    """An Anthropic ``usage`` under the chat names: its ``input_tokens`` leave out the cache's
    reads and writes, which the prompt's tokens include."""
    if not isinstance(usage, dict):
        return None
    read = _int(usage.get("cache_read_input_tokens"))
    prompt = _int(usage.get("input_tokens")) + _int(usage.get("cache_creation_input_tokens")) + read
    output = _int(usage.get("output_tokens"))
    return {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output,
            "prompt_tokens_details": {"cached_tokens": read}}


# The last event of a Responses stream: the whole response, with its usage.
_RESPONSE_END = re.compile(rb"event: response\.(completed|incomplete|failed)\r?\ndata: ")
# Its first: the response's id.
_RESPONSE_START = re.compile(rb"event: response\.created\r?\ndata: ")
# The last event of a Cohere chat stream, which carries its usage (a JSON string's quotes are
# escaped, so no text inside one matches).
_COHERE_END = b'"type":"message-end"'
# The events of an Anthropic stream that carry usage: message_start (the input), message_delta (all of it).
_MESSAGE_USAGE = re.compile(rb"event: message_(start|delta)\r?\ndata: ")


def _keep_event(data: bytes, d: Dispatch) -> bool:
    """Record usage; drop the usage-only chunk unless the client asked for it."""
    if (end := _RESPONSE_END.match(data)) is not None:
        try:
            response = orjson.loads(data[end.end():]).get("response")
        except (orjson.JSONDecodeError, AttributeError):
            return True
        if isinstance(response, dict) and (usage := responses_usage(response.get("usage"))) is not None:
            d.usage = usage
        return True
    if d.on_response_id is not None and (start := _RESPONSE_START.match(data)) is not None:
        with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
            response_id = orjson.loads(data[start.end():]).get("response", {}).get("id")
            if isinstance(response_id, str):
                d.on_response_id(response_id)
        return True
    if (found := _MESSAGE_USAGE.match(data)) is not None:
        try:
            event = orjson.loads(data[found.end():])
        except orjson.JSONDecodeError:
            return True
        usage = (event.get("message") or {}).get("usage") if found.group(1) == b"start" else event.get("usage")
        if isinstance(usage, dict):  # message_delta's counts are the running totals: later keys win
            d.raw_usage = {**(d.raw_usage or {}), **usage}
            d.usage = anthropic_usage(d.raw_usage)
        return True
    if d.req.kind == COHERE_CHAT:
        if data.startswith(b"data: {") and _COHERE_END in data:  # message-end: the usage, as a delta
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                d.usage = cohere_chat_usage(orjson.loads(data[6:]).get("delta", {}).get("usage")) or d.usage
        return True
    # A generate stream's events carry "usage":null but the last: nothing to parse there.
    if not data.startswith(b"data: {") or b'"usage"' not in data or b'"usage":null' in data:
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


def _trace_headers(d: Dispatch) -> dict[str, str]:
    """The W3C trace context for the worker: this try's span when tracing, else the caller's."""
    if d.trace_headers is not None:
        return d.trace_headers
    headers = d.req.headers
    tp = headers.get("traceparent")
    if not tp:
        return {}
    ts = headers.get("tracestate")
    return {"traceparent": tp, "tracestate": ts} if ts else {"traceparent": tp}


def account(app: web.Application, d: Dispatch) -> None:
    """Per-worker token and latency metrics from the response's own usage."""
    m = app[keys.METRICS].worker_series(d.route.cfg.name, d.worker.url)
    m.requests(d.status).inc()
    now = time.perf_counter()
    if d.first_token_at is not None:
        m.ttft.observe(d.first_token_at - d.started_at)
    if d.status == "ok":
        m.latency.observe(now - d.started_at)
        if d.req.stream and d.arrived_at is not None and d.sent_at is not None:  # whole: on_response_prepare
            m.router_added.observe(d.sent_at - d.arrived_at + d.relay_s)
    usage = d.usage or {}
    if not isinstance(usage, dict):
        return
    m.prompt_tokens.inc(_int(usage.get("prompt_tokens")))
    m.completion_tokens.inc(_int(usage.get("completion_tokens")))
    details = usage.get("prompt_tokens_details") or {}
    if isinstance(details, dict):
        m.cached_tokens.inc(_int(details.get("cached_tokens")))


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer names its request's id. A whole answer's time in kvroute ends as the
    server starts writing it, so what runs after the worker's answer is read (accounting,
    telemetry, the response cache) counts."""
    if (rid := request.get(keys.REQUEST_ID)) is not None:
        response.headers[REQUEST_ID] = rid
    pending = request.pop(keys.ROUTER_ADDED, None)
    if pending is not None and response.status < 400:
        histogram, before_call, received = pending
        histogram.observe(before_call + time.perf_counter() - received)


def _int(value: object) -> int:
    """A token count; a whole float counts too (Cohere's usage writes 27.0)."""
    if isinstance(value, float) and value.is_integer() and value > 0:
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


async def relay_as_is(request: web.Request, session: aiohttp.ClientSession, worker: Worker, path: str,
                      request_id: str) -> web.StreamResponse:
    """``request`` (a stored response's retrieval or cancel) sent on to ``path`` on the
    worker that holds it (router/stored_responses.py), and its answer relayed: whole, or as
    it comes for ``?stream=true``."""
    headers = {**worker.upstream_headers, REQUEST_ID: request_id}
    with map_client_errors(worker):
        async with session.request(request.method, f"{worker.url}{path}", params=request.query, headers=headers,
                                   ssl=worker.ssl) as resp:
            kind = resp.headers.get("Content-Type", "application/json")
            if not kind.startswith("text/event-stream"):
                return web.Response(body=await resp.read(), status=resp.status, headers={
                    "Content-Type": kind, WORKER_HEADER: worker.url})
            out = web.StreamResponse(status=resp.status, headers={"Content-Type": kind, WORKER_HEADER: worker.url})
            await out.prepare(request)
            try:
                async for chunk in resp.content.iter_any():
                    await out.write(chunk)
            except CLIENT_ERRORS as exc:  # past the first byte: the client sees the stream end early
                log.warning("stored response stream from %s failed: %s", worker.url, exc)
                return out
            await out.write_eof()
            return out
