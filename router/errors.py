"""One error hierarchy for kvroute.

Every error the router raises on purpose derives from ``KvrouteError``. HTTP-facing
errors carry the status and the OpenAI error fields, and one middleware turns them into
``{"error": {"message", "type", "param", "code"}}``.

    KvrouteError
    ├── ConfigError                 bad configuration, raised at start-up (names the key)
    ├── RequestError (4xx)
    │   ├── InvalidRequest          400 malformed JSON, wrong field types, missing fields
    │   ├── Unauthorized            401 missing or unknown API key (governance)
    │   ├── Forbidden               403 the key may not do or see this (governance)
    │   ├── NotFound                404 unknown route
    │   ├── ModelNotFound           404 unknown model
    │   ├── PayloadTooLarge         413 body over the configured limit
    │   ├── UnsupportedEncoding     415 a Content-Encoding the router cannot decode
    │   ├── HeadersTooLarge         431 a header line over the limit, or too many headers
    │   ├── BudgetExceeded          429 a hard budget is spent (names it and its reset time)
    │   │   └── LoopDetected        429 the session repeats itself and was halted
    │   └── RateLimited             429 a requests- or tokens-per-minute limit (x-ratelimit-* headers)
    └── ServiceError (5xx)
        ├── NoHealthyWorker         503 model configured but no worker can serve it
        ├── AgentHalted             503 a kill switch covers this request (code agent_halted)
        ├── GovernanceUnavailable   503 the budget store (Redis) cannot be reached
        │   └── StoreUnavailable    a store call failed, or was skipped while the store is down
        ├── Overloaded              503 past server.max_in_flight(_per_worker), queue full or timed out
        ├── ShuttingDown            503 the router is draining (SIGTERM); retry on another replica
        └── UpstreamError           502 a worker failed (e.g. a malformed or oversized answer)
            ├── UpstreamConnectError    502 no connection could be made
            │   └── UpstreamConnectionLost   the connection broke before the answer began
            ├── UpstreamTimeout         504 server.request_timeout_s spent
            │   ├── UpstreamConnectTimeout   connecting took over timeouts.connect_s
            │   ├── UpstreamFirstByteTimeout no first byte within timeouts.first_byte_s
            │   └── UpstreamIdleTimeout      a stream stalled for timeouts.idle_s
            ├── UpstreamRedirect        502 worker answered a redirect (3xx), never followed
            └── UpstreamStatusError     worker answered with an error status (passed through)

``aiohttp.ClientError`` is translated into ``UpstreamError`` at one boundary:
``router.proxy.map_client_errors``. Whether a failed upstream call is retried, and whether
it counts against the worker's circuit breaker, is one table: ``router.retry.RULES``.
"""

from __future__ import annotations

import orjson


class KvrouteError(Exception):
    """Base of every kvroute error."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None
    headers: dict[str, str] | None = None  # extra response headers, e.g. Retry-After
    close_connection: bool = False  # answer with Connection: close (the client should reconnect)

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


ANTHROPIC_PATH = "/v1/messages"  # its clients read errors as {"type": "error", "error": {type, message}}
COHERE_PREFIX = "/cohere/"  # Cohere's clients read an error's top-level "message"


def error_body(err: KvrouteError, path: str) -> dict:
    """The error's JSON body for a request to ``path``: OpenAI's shape, which Anthropic's
    clients read too once it says ``"type": "error"``, and Cohere's with the message on top."""
    body = err.to_body()
    if path == ANTHROPIC_PATH:
        return {"type": "error", **body}
    return {"message": err.message, **body} if path.startswith(COHERE_PREFIX) else body


def sse_error(err: KvrouteError, path: str) -> bytes:
    """A stream's final error event: ``data: {...}``, named ``event: error`` for Anthropic's
    clients, which skip events they do not know; for Cohere's, the ``message-end`` event
    their protocol ends a failed stream with (``finish_reason`` ERROR, the message as the
    delta's ``error``)."""
    body = error_body(err, path)
    if path.startswith(COHERE_PREFIX):
        body = {"type": "message-end", "delta": {"finish_reason": "ERROR", "error": err.message}, **body}
    data = b"data: " + orjson.dumps(body) + b"\n\n"
    return b"event: error\n" + data if path == ANTHROPIC_PATH else data


class ConfigError(KvrouteError):
    """Invalid configuration. The message names the offending key."""

    type = "config_error"

    def __init__(self, key: str, problem: str):
        super().__init__(f"config key '{key}': {problem}", param=key)
        self.key = key


class RequestError(KvrouteError):
    status = 400
    type = "invalid_request_error"


class InvalidRequest(RequestError):
    status = 400
    code = "invalid_request"


class Unauthorized(RequestError):
    status = 401
    code = "invalid_api_key"


class Forbidden(RequestError):
    status = 403
    code = "forbidden"


class NotFound(RequestError):
    status = 404
    code = "not_found"


class ModelNotFound(RequestError):
    status = 404
    code = "model_not_found"


class PayloadTooLarge(RequestError):
    status = 413
    code = "payload_too_large"


class UnsupportedEncoding(RequestError):
    status = 415
    code = "unsupported_content_encoding"


class HeadersTooLarge(RequestError):
    status = 431
    code = "headers_too_large"


class BudgetExceeded(RequestError):
    """A hard budget would be exceeded; ``param`` names the budget."""

    status = 429
    type = "insufficient_quota"
    code = "budget_exceeded"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message, param=param, code=code)
        if retry_after_s is not None:
            self.headers = {"retry-after": str(max(1, int(retry_after_s + 0.999)))}


class LoopDetected(BudgetExceeded):
    code = "loop_detected"


class RateLimited(RequestError):
    """A rate limit (governance.rate_limits) is reached; ``param`` names it. ``kind``
    (requests or tokens) is the OpenAI error type; ``headers`` carry Retry-After and the
    ``x-ratelimit-*`` headers."""

    status = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, param: str | None = None, kind: str = "requests",
                 headers: dict[str, str] | None = None):
        super().__init__(message, param=param)
        self.type = kind
        self.headers = headers or None


class ServiceError(KvrouteError):
    status = 503
    type = "server_error"


class NoHealthyWorker(ServiceError):
    status = 503
    code = "no_healthy_worker"


class AgentHalted(ServiceError):
    status = 503
    code = "agent_halted"


class GovernanceUnavailable(ServiceError):
    status = 503
    code = "governance_unavailable"


class StoreUnavailable(GovernanceUnavailable):
    """A governance store call failed, or was not tried because the store is known to be
    down (``router/governance/guard.py``). ``op`` names the call; ``sent``: the command may
    have reached the store (and may still run there once it answers again)."""

    def __init__(self, op: str, *, sent: bool):
        super().__init__("Cost governance is unavailable; retry later.")
        self.op = op
        self.sent = sent


class Overloaded(ServiceError):
    """Admission control refused the request (``router/admission.py``); ``param`` names the
    bound. Retry-After asks the client to come back shortly, here or on another replica."""

    status = 503
    code = "overloaded"

    def __init__(self, message: str, *, param: str | None = None, retry_after_s: int = 1):
        super().__init__(message, param=param)
        self.headers = {"retry-after": str(retry_after_s)}


class ShuttingDown(ServiceError):
    """The router is draining: in-flight requests finish, new ones go elsewhere."""

    status = 503
    code = "shutting_down"
    # A keep-alive client reconnects (through the Service, to another replica) instead of
    # sending its retry down the same connection to this one again.
    close_connection = True

    def __init__(self, message: str = "The router is shutting down; retry the request.", *,
                 retry_after_s: int = 1):
        super().__init__(message)
        self.headers = {"retry-after": str(retry_after_s)}


class UpstreamError(ServiceError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"


class UpstreamConnectError(UpstreamError):
    status = 502
    code = "upstream_unavailable"


class UpstreamConnectionLost(UpstreamConnectError):
    """A connection to the worker broke before its answer began, most often a keep-alive
    connection the worker closed as we reused it: the worker is up, so it is not ejected
    and the request is retried on it once."""


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamConnectTimeout(UpstreamTimeout):
    """No connection within the pool's ``timeouts.connect_s``: most often a host that is gone
    without a reset (a deleted pod's IP)."""


class UpstreamFirstByteTimeout(UpstreamTimeout):
    """A stream's headers or first SSE event did not come within ``timeouts.first_byte_s``."""


class UpstreamIdleTimeout(UpstreamTimeout):
    """A stream went ``timeouts.idle_s`` without an SSE event."""


class UpstreamRedirect(UpstreamError):
    """The worker answered with a redirect (3xx). kvroute follows none: a redirect means the
    worker's URL is wrong (plain http to an https ingress, a moved path), and following it
    would send the prompt where the config does not say, turned into a GET for 301 and 302."""


class UpstreamStatusError(UpstreamError):
    """The worker answered with an error status; its body is passed through unchanged."""

    def __init__(self, status: int, body: bytes, content_type: str | None, retry_after: str | None = None):
        super().__init__(f"upstream returned HTTP {status}")
        self.status = status
        self.body = body
        self.content_type = content_type or "application/json"
        self.retry_after = retry_after  # the worker's Retry-After header, passed on to the client
        if retry_after is not None:
            self.headers = {"retry-after": retry_after}
