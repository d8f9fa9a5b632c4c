"""What the response cache sees of a miss: the last upstream call and the SSE events it relayed.

The cache stage opens a ``Capture`` in a context variable around the rest of the request
path; ``pipeline`` hands each ``Dispatch`` it makes to ``watch``, which keeps the latest and
wraps its stream meter (governance's grant, or nothing) so that every event relayed to
the client is copied here too. Outside a cacheable request ``watch`` does nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

log = logging.getLogger(__name__)

CAPTURE: ContextVar[Capture | None] = ContextVar("kvroute_cache_capture", default=None)


class Capture:
    def __init__(self, max_bytes: int, on_end: Callable[[], Awaitable[bool]] | None = None):
        self.max_bytes = max_bytes
        self.dispatch: Any = None  # router.proxy.Dispatch of the last upstream call
        self.events: list[bytes] = []
        self.size = 0
        self.overflow = False  # over max_bytes: not stored
        self.on_end = on_end  # stores a finished stream's answer; True when it did
        self.stored = False

    def watch(self, dispatch: Any) -> None:
        self.dispatch = dispatch
        self.events, self.size, self.overflow = [], 0, False
        dispatch.meter = _Tap(dispatch.meter, self)
        dispatch.before_end = self._before_end

    async def _before_end(self) -> None:
        """A stream has all its events and its client has not seen the end yet: store now,
        so a client that asks again the moment it has the answer gets a hit."""
        if self.on_end is None:
            return
        try:
            self.stored = await self.on_end()
        except Exception:  # the cache must never cost the stream its end
            log.exception("storing a streamed answer in the response cache failed")

    def add(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_bytes:
            self.overflow, self.events = True, []
        elif not self.overflow:
            self.events.append(data)


def watch(dispatch: Any) -> None:
    """``pipeline``: a ``Dispatch`` whose answer the response cache may store."""
    capture = CAPTURE.get()
    if capture is not None:
        capture.watch(dispatch)


class _Tap:
    """A ``proxy.StreamMeter`` that copies the events its inner meter lets through."""

    def __init__(self, inner: Any, capture: Capture):
        self.inner = inner
        self.capture = capture

    @property
    def cut(self) -> Any:
        return self.inner.cut if self.inner is not None else None

    def check(self) -> None:
        if self.inner is not None:
            self.inner.check()

    def on_stream_event(self, data: bytes) -> bool:
        ok = self.inner.on_stream_event(data) if self.inner is not None else True
        if ok:
            self.capture.add(data)
        return ok

    def on_response(self, body: object) -> None:
        if self.inner is not None:
            self.inner.on_response(body)
