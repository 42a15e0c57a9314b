"""One exception hierarchy for the API and the CLI.

Each class carries the HTTP status and the OpenAI error ``type``/``code``;
:func:`error_body` renders any of them to the OpenAI error shape.
"""

from __future__ import annotations

import math
from typing import Any


class VergeError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}
        self.extra = extra or {}


class StateError(VergeError):
    """The state directory holds something we cannot read or may not write."""

    status = 500
    type = "server_error"
    code = "state_error"


class NotFound(VergeError):
    """A path the API does not have."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"


class InvalidRequest(VergeError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request_error"


class Unsupported(InvalidRequest):
    code = "unsupported_parameter"


class ContextOverflow(InvalidRequest):
    type = "exceed_context_size_error"
    code = "exceed_context_size_error"


class AuthenticationError(VergeError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"

    def __init__(self, reason: str = "no-token", user: str | None = None, key: str | None = None):
        # the client only ever reads "Login Required"; why, and whose key, are for the log
        super().__init__("Login Required")
        self.reason = reason
        self.user = user
        self.key = key


class PermissionDenied(VergeError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class ModelNotFound(VergeError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class BodyTooLarge(VergeError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RequestTimeout(VergeError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class Unavailable(VergeError):
    """503; always with a Retry-After (seconds), 60 unless the raiser knows better."""

    status = 503
    type = "unavailable_error"
    code = "model_unavailable"

    def __init__(self, message: str, *, retry_after: int = 60, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers.setdefault("Retry-After", str(retry_after))


class QueueFull(Unavailable):
    code = "queue_full"


class RateLimited(VergeError):
    """429 over a per-minute or concurrency limit; Retry-After when waiting helps."""

    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float | None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        if retry_after is None:  # waiting cannot help: clients should not retry
            self.headers["x-should-retry"] = "false"
        else:
            wait = max(retry_after, 0.001)
            self.headers["Retry-After"] = str(math.ceil(wait))
            self.headers["retry-after-ms"] = str(math.ceil(wait * 1000))


class QuotaExceeded(VergeError):
    """429 for a day's or month's tokens used up: no retrying until the quota renews."""

    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"

    def __init__(self, message: str, *, retry_after: int, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers["Retry-After"] = str(max(1, retry_after))
        self.headers["x-should-retry"] = "false"


class UpstreamFailed(VergeError):
    """502: an upstream server failed the request (after the retry, or past the first token)."""

    status = 502
    type = "server_error"
    code = "upstream_error"


class UpstreamRefused(InvalidRequest):
    """An upstream server's 4xx for the request as the client sent it, relayed."""

    code = "upstream_refused"

    def __init__(self, message: str, *, status: int = 400, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.status = status


def error_body(err: VergeError) -> dict[str, Any]:
    inner: dict[str, Any] = {
        "message": err.message,
        "type": err.type,
        "param": err.param,
        "code": err.code,
    }
    inner.update(err.extra)
    return {"error": inner}
