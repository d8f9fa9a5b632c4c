"""One error hierarchy for kvroute.

Every error the router raises on purpose derives from ``KvrouteError``. HTTP-facing
errors carry the status and the OpenAI error fields, and one middleware turns them into
``{"error": {"message", "type", "param", "code"}}``.

    KvrouteError
    ├── ConfigError                 bad configuration, raised at start-up (names the key)
    ├── RequestError (4xx)
    │   ├── InvalidRequest          400 malformed JSON, wrong field types, missing fields
    │   ├── NotFound                404 unknown route
    │   ├── ModelNotFound           404 unknown model
    │   └── PayloadTooLarge         413 body over the configured limit
    └── ServiceError (5xx)
        ├── NoHealthyWorker         503 model configured but no worker can serve it
        └── UpstreamError           a worker failed
            ├── UpstreamConnectError    502 connect/transport failure (retryable before first byte)
            ├── UpstreamTimeout         504
            └── UpstreamStatusError     worker answered with an error status (passed through)

``aiohttp.ClientError`` is translated into ``UpstreamError`` at one boundary:
``router.proxy.map_client_errors``.
"""

from __future__ import annotations


class KvrouteError(Exception):
    """Base of every kvroute error."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

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


class NotFound(RequestError):
    status = 404
    code = "not_found"


class ModelNotFound(RequestError):
    status = 404
    code = "model_not_found"


class PayloadTooLarge(RequestError):
    status = 413
    code = "payload_too_large"


class ServiceError(KvrouteError):
    status = 503
    type = "server_error"


class NoHealthyWorker(ServiceError):
    status = 503
    code = "no_healthy_worker"


class UpstreamError(ServiceError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"
    retryable = False


class UpstreamConnectError(UpstreamError):
    status = 502
    code = "upstream_unavailable"
    retryable = True


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamStatusError(UpstreamError):
    """The worker answered with an error status; its body is passed through unchanged."""

    def __init__(self, status: int, body: bytes, content_type: str | None):
        super().__init__(f"upstream returned HTTP {status}")
        self.status = status
        self.body = body
        self.content_type = content_type or "application/json"
