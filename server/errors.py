"""One exception tree for everything a client may be told, in OpenAI's error shape.

Code anywhere raises an `APIError`; `server.api.app` turns it into a response (and the streaming relay into
an SSE error event) with `error_body`. Messages are written for the client: never a stack trace, a key,
a file path or another tenant's name.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any


class APIError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = "internal_error"
    reason: str = "internal"  # the rejection reason in metrics: a fixed, small set
    default_retry_after: float | None = None

    def __init__(
        self, message: str, *, code: str | None = None, param: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.retry_after = retry_after if retry_after is not None else self.default_retry_after

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class BadRequest(APIError):
    status, type, code = 400, "invalid_request_error", None
    reason = "validation"


class Unauthorized(APIError):
    status, type, code = 401, "authentication_error", "invalid_api_key"
    reason = "auth"


class Forbidden(APIError):
    status, type, code = 403, "permission_error", "permission_denied"
    reason = "auth"


class NotFound(APIError):
    status, type, code = 404, "invalid_request_error", "not_found"
    reason = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, model: str):
        # The same words whether the name is unknown or another tenant's: nothing leaks.
        super().__init__(
            f"The model '{model}' does not exist or you do not have access to it.", param="model"
        )


class Conflict(APIError):
    status, type, code = 409, "invalid_request_error", "conflict"
    reason = "validation"


class PayloadTooLarge(APIError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"
    reason = "validation"


class Unprocessable(APIError):
    status, type, code = 422, "invalid_request_error", "unprocessable_entity"
    reason = "validation"


class RateLimited(APIError):
    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"
    reason = "limit"


class EngineUnavailable(APIError):
    status, type, code = 503, "server_error", "engine_unavailable"
    reason = "engine_unavailable"
    default_retry_after = 5.0


class EngineUnreachable(EngineUnavailable):
    """No connection to the engine, or it went away before answering: safe to try another engine,
    since no output was produced for the client."""


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def api_error_body(exc: APIError) -> dict[str, Any]:
    return error_body(exc.message, exc.type, exc.code, exc.param)


class Missing(LookupError):
    """Raised by the storage layer: the tenant, key, adapter or version does not exist (404); `param`, the
    request field that named it, where one did."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class StateConflict(ValueError):
    """Raised by the storage layer: the change contradicts the current state, a duplicate or deleting what
    is in use (409)."""


@cache
def domain_errors() -> dict[type[Exception], Callable[[Exception], APIError]]:
    """How the lower layers' own exceptions read to a client. Their messages are written for users."""
    from adapters.archive import ArchiveRefused
    from adapters.basemodel import BaseModelError
    from adapters.names import InvalidName
    from adapters.validate import AdapterInvalid

    return {
        Missing: lambda e: NotFound(_text(e), param=e.param),
        StateConflict: lambda e: Conflict(_text(e)),
        InvalidName: lambda e: BadRequest(_text(e), code="invalid_name"),
        AdapterInvalid: lambda e: Unprocessable(_text(e), code="invalid_adapter"),
        ArchiveRefused: lambda e: Unprocessable(_text(e), code="invalid_archive"),
        # The server's own base model is unusable: not the client's fault, and its path stays private.
        BaseModelError: lambda e: EngineUnavailable("The base model is not available on this server."),
    }


def as_api_error(exc: Exception) -> APIError | None:
    if isinstance(exc, APIError):
        return exc
    for kind, convert in domain_errors().items():
        if isinstance(exc, kind):
            return convert(exc)
    return None


def _text(exc: Exception) -> str:
    text = str(exc.args[0]) if exc.args else str(exc)
    return text[:1].upper() + text[1:]
