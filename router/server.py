"""The HTTP server around the app, for ``kvroute serve``: aiohttp's AppRunner, changed so:

* Requests aiohttp rejects before any handler runs (a header line over 8190 bytes, more
  than 128 headers, a malformed request line, a Content-Encoding it cannot decode) get an
  OpenAI-shaped JSON error like every other error, not aiohttp's plain text.
* SIGTERM (or SIGINT) drains instead of stopping at once: the listening socket stays open so
  ``/readyz`` and new requests answer 503 (Retry-After) while in-flight requests get
  ``server.drain_s`` to finish (``Admission.drain``); then the server closes. A second
  signal cuts what still runs.
* A client that hangs up cancels its request, and with it the call to the worker.
* One of ``kvroute serve --procs N``'s processes (``slot``, router/siblings.py) shares the
  port (SO_REUSEPORT), merges its siblings' metrics into ``/metrics``, and drains too when
  its supervisor (router/procs.py) goes away.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Any

from aiohttp import web, web_protocol
from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError, LineTooLong

from kvroute.router import keys, siblings
from kvroute.router.config import ServerConfig
from kvroute.router.errors import HeadersTooLarge, InvalidRequest, KvrouteError, UnsupportedEncoding
from kvroute.router.reload import reload, watch_secrets
from kvroute.router.siblings import Slot
from kvroute.router.tls import server_context, server_refresher

log = logging.getLogger(__name__)

# After the drain every completion request has ended; this bounds the others (/metrics, ...).
CLOSE_TIMEOUT_S = 5.0
KEEPALIVE_S = 75.0  # idle keep-alive connections, as web.run_app (which kvroute serve used) had it


class _Protocol(web_protocol.RequestHandler):
    """One connection. Only its error responses differ from aiohttp's."""

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:
            super().handle_error(request, status, exc, message)  # logs it; refuses if output began
            err = KvrouteError("Internal router error")
            err.status = status
        else:
            # The client's mistake (or a scanner): no traceback in the router's log.
            log.debug("refused a malformed request from %s: %s", request.remote, exc or message)
            if request.writer.output_size > 0:
                raise ConnectionError("Response is sent already, cannot send another response")
            err = self._client_error(status, exc, message)
        resp = web.json_response(err.to_body(), status=err.status)
        resp.force_close()  # the parser's state is unknown after a malformed request
        return resp

    def log_exception(self, *args: Any, **kw: Any) -> None:
        # A body that fails to decode (Content-Encoding: gzip over plain bytes) was answered
        # 400 by read_body; aiohttp meets the error again discarding the rest: not news.
        if isinstance(kw.get("exc_info"), web.RequestPayloadError):
            log.debug("discarded the rest of an undecodable request body: %s", kw["exc_info"])
            return
        super().log_exception(*args, **kw)

    def _client_error(self, status: int, exc: BaseException | None, message: str | None) -> KvrouteError:
        if isinstance(exc, LineTooLong):
            return HeadersTooLarge(f"A request header (or the request line) is over {self.max_field_size} bytes")
        text = exc.message if isinstance(exc, HttpProcessingError) else (message or "Bad request")
        if "too many headers" in text.lower():
            return HeadersTooLarge(f"The request has more than {self.max_headers} headers")
        if isinstance(exc, ContentEncodingError):
            return UnsupportedEncoding("The router cannot decode this Content-Encoding; send the body "
                                       "unencoded, or gzip or deflate", param="content-encoding")
        err = InvalidRequest(f"Malformed HTTP request: {text}")
        err.status = status
        return err


class _Server(web.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        return _Protocol(self, loop=self._loop, **self._kwargs)


class AppRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer aiohttp's own errors OpenAI-shaped, and
    whose handlers are cancelled when their client hangs up (``handler_cancellation``): the
    worker's request closes with it, and vLLM stops a generation nobody will read, whole
    answers included (a stream's end is found at its next write)."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        super().__init__(app, **{"handler_cancellation": True, **kwargs})

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # starts the app (cleanup contexts included)
        return _Server(plain.request_handler, request_factory=plain.request_factory,
                       handler_cancellation=plain.handler_cancellation, loop=plain._loop, **plain._kwargs)


async def serve(app: web.Application, cfg: ServerConfig, slot: Slot | None = None) -> None:
    """Serve ``app`` on ``cfg.host:cfg.port`` until a signal, then drain and close.
    ``slot``: this is one of ``--procs N`` processes."""
    if slot is not None:
        siblings.install(app, slot)  # before setup freezes the app
    runner = AppRunner(app, access_log=None, keepalive_timeout=KEEPALIVE_S, shutdown_timeout=CLOSE_TIMEOUT_S)
    await runner.setup()
    private: web.AppRunner | None = None
    refresh: asyncio.Task | None = None
    try:
        tls = None
        if cfg.tls is not None:  # renewed certificates are picked up (router/tls.py)
            tls = server_context(cfg.tls)
            refresh = asyncio.create_task(server_refresher(tls, cfg.tls).run(cfg.tls.reload_s))
        await web.TCPSite(runner, cfg.host, cfg.port, reuse_port=slot is not None, ssl_context=tls).start()
        if slot is None:
            log.info("======== Running on %s://%s:%d ========\n(Press CTRL+C to quit)",
                     "https" if tls else "http", cfg.host, cfg.port)
        else:
            private = await siblings.start_private(app, slot)
        await _until_signal_then_drain(app, slot)
    finally:
        if refresh is not None:
            refresh.cancel()
        if private is not None:
            await private.cleanup()
        await runner.cleanup()  # stop listening, close connections, then the app's cleanup contexts


async def _until_signal_then_drain(app: web.Application, slot: Slot | None = None) -> None:
    admission = app[keys.ADMISSION]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(why: str) -> None:
        if not stop.is_set():
            log.info("%s: draining: /readyz and new requests answer 503, in-flight ones get up to "
                     "server.drain_s (%gs)", why, admission.cfg.drain_s)
            stop.set()
        else:
            log.warning("%s again: cutting the requests still in flight", why)
            admission.cut()

    # SIGHUP, or a change to a secret file the config names, reloads it (router/reload.py).
    config_path = app.get(keys.CONFIG_PATH)
    reloads: set[asyncio.Task] = set()

    def on_hangup() -> None:
        if config_path is None:
            log.warning("SIGHUP: started without --config, there is no file to reload")
            return
        task = loop.create_task(reload(app, config_path))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    watcher = loop.create_task(watch_secrets(app, config_path)) if config_path is not None else None

    sigs = (signal.SIGTERM, signal.SIGINT)
    for sig in sigs:
        loop.add_signal_handler(sig, on_signal, sig.name)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)  # without it, SIGHUP would end the process
    unwatch = None
    if slot is not None:  # ready only now: a SIGHUP passed on from here on reloads, never kills
        siblings.tell_ready(slot)
        unwatch = siblings.watch_supervisor(slot, lambda: on_signal("supervisor gone"))
    try:
        await stop.wait()
        await admission.drain()
    finally:
        if watcher is not None:
            watcher.cancel()
        for sig in (*sigs, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if unwatch is not None:
            unwatch()


def run(app: web.Application, cfg: ServerConfig, *,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None, slot: Slot | None = None) -> None:
    """``kvroute serve``: run ``serve`` on a new loop until it has drained and closed."""
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve(app, cfg, slot))
    except KeyboardInterrupt:  # Ctrl-C during start-up, before the signal handlers are in place
        pass
