"""Per-request bookkeeping: request id, request metrics and the one JSON access-log line.

A pure ASGI middleware (no ``BaseHTTPMiddleware``: it would buffer streams and cost a task per
request) wraps the whole app, so refusals made by inner middleware (401, 413, 429) are counted and
logged like everything else. Handlers fill the :class:`RequestRecord` found in
``scope["state"]["dflare"]``; the middleware reads it once the last byte (stream included) is sent.
Prompt and completion text are logged only with ``log_prompts``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import orjson

from service.backends.base import Endpoint

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from service.backends.base import Usage
    from service.metrics import GatewayMetrics

ACCESS_LOGGER = "dflare.access"
access_logger = logging.getLogger(ACCESS_LOGGER)

API_PATHS = frozenset({e.value for e in Endpoint} | {"/v1/models"})
QUIET_PATHS = frozenset({"/health", "/ready", "/metrics"})
NO_MODEL = "none"  # model / backend label before a request reached a backend (bounded cardinality)
CLIENT_CLOSED = "client_closed"  # the access line's error when the client left before its answer ended
CLIENT_CLOSED_STATUS = 499  # nginx's status for it: a request whose client left before any answer


class RequestRecord:
    """What the handler learnt about one request (filled as it goes)."""

    __slots__ = (
        "backend",
        "choices",
        "completion_text",
        "error_code",
        "failed_status",
        "first_chunk_at",
        "last_chunk_at",
        "model",
        "prompt_text",
        "request_id",
        "route_reason",
        "start",
        "stream",
        "usage",
    )

    def __init__(self, request_id: str, start: float) -> None:
        self.request_id = request_id
        self.start = start
        self.model: str | None = None
        self.backend: str | None = None
        self.stream = False
        self.choices = 1  # OpenAI's ``n``: usage counts the tokens of all of them
        self.usage: Usage | None = None
        self.first_chunk_at: float | None = None
        self.last_chunk_at: float | None = None
        self.route_reason: str | None = None
        self.error_code: str | None = None
        self.failed_status: int | None = None  # a stream that broke after its 200: the failure's status
        self.prompt_text: str | None = None
        self.completion_text: str | None = None


def request_id(scope: Scope) -> str:
    """The client's ``x-request-id`` if sane, else 32 random hex digits (``os.urandom``: a third of
    ``uuid.uuid4().hex``'s cost, same shape)."""
    for name, value in scope["headers"]:
        if name == b"x-request-id" and 0 < len(value) <= 128 and value.isascii():
            return value.decode()
    return os.urandom(16).hex()


def begin_request(scope: Scope) -> RequestRecord:
    """Open the books of one request: its id and record, kept in the scope state where the routes
    fill the record and the access log reads it."""
    rid = request_id(scope)
    record = RequestRecord(rid, time.perf_counter())
    state = scope.setdefault("state", {})
    state["dflare"] = record
    state["request_id"] = rid
    return record


def bare_line_stream(logger: logging.Logger) -> logging.StreamHandler | None:
    """The one handler of ``logger`` when logging a line through it would write exactly the line and
    a newline to its stream: the configuration ``dflare serve`` installs (a non-propagating logger
    with one plain ``StreamHandler`` formatting ``%(message)s``, no filters). ``None`` otherwise.

    The access line is the gateway's most frequent log call, and a ``LogRecord`` (thread, process
    and time fields) plus the handler chain cost about 90k CPU instructions per request, a tenth of
    a completion's (callgrind); writing the same bytes under the handler's lock costs a fraction.
    """
    if logger.propagate or logger.filters or logger.disabled or len(logger.handlers) != 1:
        return None
    handler = logger.handlers[0]
    if type(handler) is not logging.StreamHandler or handler.filters or handler.level > logging.INFO:
        return None
    fmt = handler.formatter
    if type(fmt) is not logging.Formatter or type(fmt._style) is not logging.PercentStyle:
        return None
    if fmt._fmt != "%(message)s":
        return None
    return handler


def write_line(handler: logging.StreamHandler, line: str) -> None:
    """What ``handler.handle`` of a record of ``line`` does, as ``StreamHandler.emit`` and
    ``Handler.handleError`` would: under the handler's lock, write, flush; errors are reported the
    logging way (to stderr), never raised into the request."""
    with handler.lock:  # type: ignore[union-attr]
        try:
            handler.stream.write(line + handler.terminator)
            handler.stream.flush()
        except Exception:
            record = logging.LogRecord(ACCESS_LOGGER, logging.INFO, "", 0, line, (), None)
            handler.handleError(record)


class ObservabilityMiddleware:
    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, *, access_log: bool = True) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in QUIET_PATHS:
            await self.app(scope, receive, send)
            return
        record = begin_request(scope)
        start, rid = record.start, record.request_id
        status = 0
        rid_header = (b"x-request-id", rid.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), rid_header]
            await send(message)

        in_flight = self.metrics.in_flight
        in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            in_flight.dec()
            if status == 0:  # nothing was sent: the client left, or an error escaped every handler
                status = CLIENT_CLOSED_STATUS if record.error_code == CLIENT_CLOSED else 500
            self._finish(scope, record, status, time.perf_counter() - start)

    def _finish(self, scope: Scope, record: RequestRecord, status: int, duration: float) -> None:
        path = scope["path"]
        endpoint = path if path in API_PATHS else "other"
        model = record.model or NO_MODEL
        usage = record.usage
        backend = record.backend or NO_MODEL
        m = self.metrics
        # a stream that broke after its 200 counts as the failure it was (the access line keeps 200)
        m.observe_request(model, backend, endpoint, record.failed_status or status, duration)
        itl = None
        if usage is not None:
            m.observe_usage(model, backend, usage.prompt_tokens, usage.completion_tokens, usage.speculative)
        if record.first_chunk_at is not None:
            ttft = record.first_chunk_at - record.start
            n = record.choices
            if usage is not None and usage.completion_tokens > n and record.last_chunk_at is not None:
                # the n choices stream side by side: per choice (tokens / n - 1) gaps in the same span
                itl = (record.last_chunk_at - record.first_chunk_at) * n / (usage.completion_tokens - n)
            m.observe_stream_timing(model, backend, ttft, itl)
        if self.access_log and access_logger.isEnabledFor(logging.INFO):
            line = self._line(scope, record, status, duration, backend, itl)
            stream = bare_line_stream(access_logger)
            if stream is not None:
                write_line(stream, line)
            else:
                # a record handed straight to the logger's handlers: ``Logger.info`` would also walk
                # the stack for the caller's file and line, which the bare-JSON format never prints
                record_ = access_logger.makeRecord(ACCESS_LOGGER, logging.INFO, "", 0, line, (), None)
                access_logger.handle(record_)

    @staticmethod
    def _line(
        scope: Scope, record: RequestRecord, status: int, duration: float, backend: str, itl: float | None
    ) -> str:
        usage = record.usage
        stats = usage.speculative if usage is not None else None
        client = scope.get("client")
        line: dict[str, Any] = {
            "ts": round(time.time(), 3),
            "request_id": record.request_id,
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "model": record.model,
            "backend": backend,
            "stream": record.stream,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
            "latency_ms": round(duration * 1000, 2),
            "ttft_ms": (
                round((record.first_chunk_at - record.start) * 1000, 2)
                if record.first_chunk_at is not None
                else None
            ),
            "itl_ms": round(itl * 1000, 3) if itl is not None else None,
            "speculative": None
            if stats is None
            else {
                "verify_steps": stats.verify_steps,
                "accepted_tokens": stats.accepted_tokens,
                "draft_tokens": stats.draft_tokens,
                "plain_decode_steps": stats.plain_steps,
                "acceptance_length": round(stats.acceptance_length, 4),
            },
            "route": record.route_reason,
            "error": record.error_code,
            "client": client[0] if client else None,
        }
        if record.prompt_text is not None:
            line["prompt"] = record.prompt_text
        if record.completion_text is not None:
            line["completion"] = record.completion_text
        return orjson.dumps(line).decode()
