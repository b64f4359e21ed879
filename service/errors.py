"""Every error the gateway answers, in OpenAI's shape, from one place.

Domain code raises a :class:`GatewayError` subclass; :func:`register_exception_handlers` turns it (and
FastAPI's validation errors, Starlette's HTTP errors and anything unexpected) into
``{"error": {"message", "type", "param", "code"}}`` with OpenAI's status, type and code. After a
stream's 200 has gone out an error can only travel as one more event: :func:`error_event`.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

logger = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


class GatewayError(Exception):
    """An error with an OpenAI-shaped body. Subclasses fix status, type and code."""

    status: int = 500
    type: str = SERVER_ERROR
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str] | None:
        return None


class InvalidRequest(GatewayError):
    status = 400
    type = INVALID_REQUEST


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class AuthenticationError(GatewayError):
    status = 401
    type = INVALID_REQUEST
    code = "invalid_api_key"


class ModelNotFound(GatewayError):
    status = 404
    type = INVALID_REQUEST
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        message = f"The model `{model}` does not exist or you do not have access to it."
        super().__init__(message, param="model")


class RequestTooLarge(GatewayError):
    status = 413
    type = INVALID_REQUEST
    code = "request_too_large"


class RateLimited(GatewayError):
    """Too many requests queued or in flight; ``retry_after`` seconds go into ``Retry-After``."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(max(1, round(self.retry_after)))}


class BackendUnavailable(GatewayError):
    """No backend could take the request. ``retryable``: another backend may succeed."""

    status = 503
    type = SERVER_ERROR
    code = "service_unavailable"

    def __init__(self, message: str, *, retryable: bool = True, upstream_status: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.upstream_status = upstream_status


class ShuttingDown(BackendUnavailable):
    """The server reached its shutdown deadline before it could answer: another replica can."""

    def __init__(self) -> None:
        super().__init__("The server is shutting down; retry the request.")

    def headers(self) -> dict[str, str]:
        return {"retry-after": "1"}


SHUTDOWN = ShuttingDown()


class BackendTimeout(GatewayError):
    status = 504
    type = SERVER_ERROR
    code = "timeout"


class InternalError(GatewayError):
    status = 500
    type = SERVER_ERROR
    code = "internal_error"


_CONTEXT_RE = re.compile(r"context length|context window|maximum context|too long", re.IGNORECASE)
_TYPE_BY_STATUS = {
    400: INVALID_REQUEST,
    401: INVALID_REQUEST,
    403: INVALID_REQUEST,
    404: INVALID_REQUEST,
    413: INVALID_REQUEST,
    422: INVALID_REQUEST,
    429: "requests",
}


class UpstreamError(GatewayError):
    """The upstream engine rejected the request (4xx): relayed with its status, never retried.

    SGLang answers ``{"object": "error", "message", "type": "BadRequestError", "param", "code": 400}``
    (vLLM's shape); :meth:`from_response` turns that, or an OpenAI-shaped body, into OpenAI's shape.
    """

    def __init__(self, status: int, message: str, *, type_: str, param: str | None, code: str | None):
        super().__init__(message, param=param, code=code)
        self.status = 400 if status == 422 else status
        self.type = type_

    @classmethod
    def from_response(cls, status: int, raw: bytes) -> UpstreamError:
        try:
            data = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            data = {}
        err = data.get("error") if isinstance(data, dict) else None
        if not isinstance(err, dict):
            err = data if isinstance(data, dict) else {}
        message = err.get("message") or err.get("detail")
        if not message:  # no readable message: say what happened; the raw body goes to the log only
            logger.warning("upstream answered %d: %s", status, raw[:500].decode("utf-8", "replace"))
            message = f"The model server rejected the request (status {status})."
        message = str(message)
        code = err.get("code")
        code = code if isinstance(code, str) else None
        if status == 400 and code is None and _CONTEXT_RE.search(message):
            code = ContextLengthExceeded.code
        type_ = err.get("type")
        if not isinstance(type_, str) or (type_.endswith("Error") and "_" not in type_):
            type_ = _TYPE_BY_STATUS.get(status, SERVER_ERROR)  # SGLang's "BadRequestError" etc.
        param = err.get("param")
        return cls(status, message, type_=type_, param=param if isinstance(param, str) else None, code=code)


def error_response(err: GatewayError) -> Response:
    """The JSON answer of ``err``. No ``x-request-id``: the bookkeeping layer adds it to every answer."""
    return Response(
        orjson.dumps(err.body()), status_code=err.status, headers=err.headers(), media_type="application/json"
    )


def status_of_code(code: str) -> int:
    """The HTTP status the gateway answers an error ``code`` with before a response began (500 for a
    code it does not know): how a stream that failed after its 200 is counted."""
    for kind in (BackendUnavailable, BackendTimeout, RateLimited, InternalError, ContextLengthExceeded):
        if kind.code == code:
            return kind.status
    return InternalError.status


def error_event(err: GatewayError) -> bytes:
    """One SSE event carrying an OpenAI error: how a stream that already began reports a failure."""
    return b"data: " + orjson.dumps(err.body()) + b"\n\n"


def _validation_error(exc: RequestValidationError) -> InvalidRequest:
    errors = exc.errors()
    if not errors:
        return InvalidRequest("Invalid request body.")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return InvalidRequest(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
            "your HTTP library correctly. The OpenAI API expects a JSON payload.)"
        )
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    message = str(first.get("msg", "invalid value"))
    if first.get("type") == "missing" and not loc:
        message = "The request body is missing or is not a JSON object."
    return InvalidRequest(f"{message}: {param!r}" if param else message, param=param)


_STATUS_ERRORS: dict[int, tuple[str, str | None]] = {
    404: (INVALID_REQUEST, "unknown_url"),
    405: (INVALID_REQUEST, "method_not_allowed"),
    413: (INVALID_REQUEST, "request_too_large"),
}


class RoutingError(GatewayError):
    """Starlette's HTTP errors (unknown path 404, wrong method 405), with their headers (``Allow``)."""

    def __init__(self, exc: StarletteHTTPException) -> None:
        super().__init__(str(exc.detail))
        self.status = exc.status_code
        self.type, self.code = _STATUS_ERRORS.get(
            exc.status_code, (INVALID_REQUEST if exc.status_code < 500 else SERVER_ERROR, None)
        )
        self._headers = dict(exc.headers) if exc.headers else None

    def headers(self) -> dict[str, str] | None:
        return self._headers


def _as_gateway_error(exc: BaseException, request_id: str | None) -> GatewayError:
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, RequestValidationError):
        return _validation_error(exc)
    if isinstance(exc, StarletteHTTPException):
        return RoutingError(exc)
    logger.error("unhandled error in request %s", request_id, exc_info=exc)
    return InternalError(f"The server had an error while processing your request (request id {request_id}).")


def exception_response(request: Request, exc: BaseException) -> Response:
    """The OpenAI-shaped response for any exception a handler raised (noted for the access log)."""
    state = request.scope.get("state", {})
    rid = state.get("request_id")
    err = _as_gateway_error(exc, rid)
    record = state.get("dflare")
    if record is not None:
        record.error_code = err.code or err.type
    return error_response(err)


def register_exception_handlers(app: FastAPI) -> None:
    """Install the one mapping from exceptions to OpenAI-shaped responses (:func:`exception_response`)."""

    async def handler(request: Request, exc: Exception) -> Response:
        return exception_response(request, exc)

    for kind in (GatewayError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, handler)
