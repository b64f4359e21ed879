"""The gateway's one ASGI layer: the hot endpoints served in one pass, everything else by the chain.

``POST /v1/chat/completions`` and ``POST /v1/completions`` are the gateway's whole load. For them
this layer (the outermost of the app's middleware) does in one frame what the middleware chain does
in five: request id and bookkeeping (:class:`~service.observability.ObservabilityMiddleware`), API
keys, body limit, in-flight limit, then it calls the handler itself, skipping the router, the
exception middleware, the exit stack and dependency solving, and maps exceptions through the same
:func:`service.errors.exception_response`. No ``send`` or ``receive`` wrapper is stacked per request:
the request id header and the status are taken from the response object, and ``receive`` is wrapped
to count body bytes only when no ``Content-Length`` bounds the body. Every other request (and the hot
ones when CORS is configured) goes through the chain of separate middlewares, which behave the same.
The FastAPI routes stay registered: they document the endpoints in OpenAPI and serve every other
method. Measured with ``loadtest/gateway_bench.py``; see docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from service.errors import (
    SHUTDOWN,
    AuthenticationError,
    GatewayError,
    RateLimited,
    RequestTooLarge,
    exception_response,
)
from service.observability import (
    CLIENT_CLOSED,
    CLIENT_CLOSED_STATUS,
    ObservabilityMiddleware,
    begin_request,
)
from service.routing.admission import InFlightLimiter
from service.security import (
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    KeyChecker,
    _BodyTooLarge,
    _presented_key,
    limited_receive,
    send_error,
)
from sglang_ext.engine_server.client_watch import ClientGone, ClientWatch

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

    from service.metrics import GatewayMetrics

logger = logging.getLogger(__name__)
Handler = Callable[[Request], Awaitable[Response]]
HANDLED = (GatewayError, RequestValidationError, HTTPException)


class FastPathMiddleware:
    """Innermost of the chain: the two handlers called directly (requests the hot path did not take)."""

    def __init__(self, app: ASGIApp, routes: dict[str, Handler]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if handler is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            await request.body()  # the watch reads receive from here on
            with ClientWatch(receive, scope):
                try:
                    response = await handler(request)
                except HANDLED as exc:  # the one error mapping, as FastAPI's handlers would apply it
                    response = exception_response(request, exc)
        except (ClientGone, ClientDisconnect):  # nothing to answer; the backend call was cancelled
            scope["state"]["dflare"].error_code = CLIENT_CLOSED
            return
        except asyncio.CancelledError:  # the shutdown deadline, as in serve_watched
            current = asyncio.current_task()
            assert current is not None
            current.uncancel()
            logger.warning("request %s cancelled at the shutdown deadline", scope["state"]["request_id"])
            response = exception_response(request, SHUTDOWN)
        # anything else propagates as it would from a route: outer middleware may own it (the body
        # limit's 413), and Starlette's server-error handler answers the rest through the same mapping
        await response(scope, receive, send)


class GatewayMiddleware:
    """Builds the chain (bookkeeping > CORS > keys > body limit > in-flight > direct route) and
    serves the two hot endpoints through an equivalent single pass."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: dict[str, Handler],
        metrics: GatewayMetrics,
        access_log: bool,
        checker: KeyChecker,
        metrics_require_auth: bool,
        metrics_checker: KeyChecker | None = None,
        max_body_bytes: int,
        max_in_flight: int,
        cors_origins: list[str],
    ) -> None:
        self.routes = routes
        self.limiter = InFlightLimiter(
            FastPathMiddleware(app, routes),
            max_in_flight=max_in_flight,
            on_reject=lambda reason: metrics.rejected.labels(reason).inc(),
        )
        chain: ASGIApp = BodyLimitMiddleware(self.limiter, max_bytes=max_body_bytes)
        scrape_tokens = metrics_checker if metrics_require_auth and metrics_checker else None
        if checker or scrape_tokens:
            chain = ApiKeyMiddleware(
                chain,
                checker=checker,
                metrics_require_auth=metrics_require_auth,
                metrics_checker=scrape_tokens,
            )
        if cors_origins:
            from starlette.middleware.cors import CORSMiddleware

            chain = CORSMiddleware(
                chain,
                allow_origins=cors_origins,
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["authorization", "content-type", "x-api-key"],
            )
        self.observability = ObservabilityMiddleware(chain, metrics, access_log=access_log)
        self.in_flight_gauge = metrics.in_flight
        self.checker = checker if checker else None
        self.max_body_bytes = max_body_bytes
        self.hot = not cors_origins  # CORS rewrites responses: keep the chain then

    def hot_handler(self, scope: Scope) -> Handler | None:
        """The handler this layer serves ``scope`` with in one pass, or ``None``: the chain serves it."""
        if not self.hot or scope["type"] != "http" or scope["method"] != "POST":
            return None
        return self.routes.get(scope["path"])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self.hot_handler(scope)
        if handler is None:
            await self.observability(scope, receive, send)
            return
        await self.serve_hot(scope, receive, send, handler)

    async def serve_hot(self, scope: Scope, receive: Receive, send: Send, handler: Handler) -> None:
        """One hot request: bookkeeping, then keys, limits and the handler (:meth:`_serve`)."""
        # bookkeeping, as ObservabilityMiddleware
        record = begin_request(scope)
        start, rid = record.start, record.request_id
        status = 500
        gauge = self.in_flight_gauge
        gauge.inc()
        try:
            status = await self._serve(scope, receive, send, handler, rid)
        finally:
            gauge.dec()
            self.observability._finish(scope, record, status, time.perf_counter() - start)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, handler: Handler, rid: str) -> int:
        """Keys, body limit, in-flight limit and the handler; returns the status sent."""
        rid_headers = {"x-request-id": rid}
        if self.checker is not None:  # as ApiKeyMiddleware
            presented = _presented_key(scope)
            if not self.checker.check(presented):
                message = "Missing API key" if presented is None else "Invalid API key"
                err: GatewayError = AuthenticationError(f"{message}: send 'Authorization: Bearer <key>'.")
                await send_error(send, err, {"www-authenticate": "Bearer", **rid_headers})
                return err.status
        # as BodyLimitMiddleware: by Content-Length up front; counted only when nothing bounds the body
        max_bytes = self.max_body_bytes
        bounded = False
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit():
                if int(value) > max_bytes:
                    return await self._too_large(send, rid_headers)
                bounded = True
            elif name == b"transfer-encoding":
                bounded = False
                break
        if not bounded:
            receive = limited_receive(receive, max_bytes)

        limiter = self.limiter  # as InFlightLimiter, sharing its count with the chain
        if limiter.in_flight >= limiter.max_in_flight:
            if limiter.on_reject is not None:
                limiter.on_reject("overload")
            limit = limiter.max_in_flight
            message = f"The gateway is at its limit of {limit} concurrent requests; retry later."
            err = RateLimited(message, retry_after=limiter.retry_after_s)
            await send_error(send, err, rid_headers)
            return err.status
        limiter.in_flight += 1
        try:  # as FastPathMiddleware
            return await serve_watched(scope, receive, send, handler, rid)
        except _BodyTooLarge:  # raised from receive outside the handler, before anything was sent
            return await self._too_large(send, rid_headers)
        finally:
            limiter.in_flight -= 1

    async def _too_large(self, send: Send, headers: dict[str, str]) -> int:
        err = RequestTooLarge(f"Request body larger than {self.max_body_bytes} bytes.")
        await send_error(send, err, headers)
        return err.status


async def serve_watched(scope: Scope, receive: Receive, send: Send, handler: Handler, rid: str) -> int:
    """Read the body, then run the handler and send its answer while watching the client.

    A client that leaves, before the first byte or during a stream, cancels the work at once
    (:class:`ClientWatch`): the backend call's cancellation closes the upstream connection or aborts
    the engine request, and the caller frees the in-flight slot. A cancellation that is not the
    client's is the server's shutdown deadline: a request that got no answer yet gets a retryable 503.
    Returns the status for the books (499 when the client left before its answer).
    """
    request = Request(scope, receive)
    record = scope["state"]["dflare"]
    started = False
    try:
        await request.body()  # the watch reads receive from here on; the handler gets the cached body
        with ClientWatch(receive, scope):
            try:
                response = await handler(request)
            except HANDLED as exc:
                response = exception_response(request, exc)
            except Exception as exc:  # as Starlette's ServerErrorMiddleware: the 500 answer, then re-raised
                started = True
                await send_response(exception_response(request, exc), send)
                raise
            response.raw_headers.append((b"x-request-id", rid.encode()))
            started = True
            await send_response(response, send)
            return response.status_code
    except (ClientGone, ClientDisconnect):
        record.error_code = CLIENT_CLOSED
        return 200 if started else CLIENT_CLOSED_STATUS
    except asyncio.CancelledError:
        current = asyncio.current_task()
        assert current is not None
        current.uncancel()  # answered here: uvicorn would log the cancellation as a traceback
        logger.warning("request %s cancelled at the shutdown deadline", rid)
        if started:
            record.error_code = SHUTDOWN.code
            return 200
        return await shutdown_answer(request, send, rid)


async def shutdown_answer(request: Request, send: Send, rid: str) -> int:
    """The retryable 503 of a request the shutdown deadline cut before it was answered."""
    response = exception_response(request, SHUTDOWN)
    response.raw_headers.append((b"x-request-id", rid.encode()))
    await send_response(response, send)
    return SHUTDOWN.status


async def send_response(response: Response, send: Send) -> None:
    """Send a response of the hot path: what ``response(scope, receive, send)`` sends, leaner."""
    if isinstance(response, StreamingResponse):
        await stream_response(response, send)
    elif type(response) in (Response, JSONResponse) and response.background is None:
        await send(
            {"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers}
        )
        await send({"type": "http.response.body", "body": response.body})
    else:  # pragma: no cover - the handlers answer with the types above
        raise TypeError(f"unexpected response type {type(response).__name__}")


async def stream_response(response: StreamingResponse, send: Send) -> None:
    """Stream ``response`` until its iterator ends; the caller's :class:`ClientWatch` interrupts it
    when the client goes away (uvicorn's httptools protocol reports ASGI spec 2.3: its ``send`` drops
    data silently after a disconnect). However it ends, the iterator is closed, and the relay's
    ``finally`` closes the upstream connection (SGLang aborts the request)."""
    body = response.body_iterator
    try:
        await send(
            {"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers}
        )
        async for chunk in body:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        aclose = getattr(body, "aclose", None)
        if aclose is not None:
            await aclose()


class GatewayApp(FastAPI):
    """The FastAPI app, with the two completion endpoints served before Starlette's outer stack.

    FastAPI puts three layers in front of user middleware (``ServerErrorMiddleware`` with a ``send``
    wrapper, exception telemetry, an app body limit) and Starlette sets up per request before them.
    :meth:`__call__` hands a hot request straight to the app's :class:`GatewayMiddleware`
    (:meth:`GatewayMiddleware.serve_hot`), which answers unexpected errors as
    ``ServerErrorMiddleware`` would (the 500 in OpenAI's shape, then re-raised for the server's log).
    Everything else goes through the whole stack as before.
    """

    gateway: GatewayMiddleware | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        layer: object = stack
        while layer is not None and not isinstance(layer, GatewayMiddleware):
            layer = getattr(layer, "app", None)
        self.gateway = layer
        return stack

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.middleware_stack is None:
            self.middleware_stack = self.build_middleware_stack()
        gateway = self.gateway
        handler = gateway.hot_handler(scope) if gateway is not None else None
        if handler is None:
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self  # as Starlette.__call__ (the handlers read app.state)
        if self.root_path:  # as FastAPI.__call__
            scope["root_path"] = self.root_path
        await gateway.serve_hot(scope, receive, send, handler)
