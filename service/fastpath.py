"""A direct route for the two hot endpoints, past FastAPI's per-request machinery.

``POST /v1/chat/completions`` and ``POST /v1/completions`` are the gateway's whole load. Innermost of
the middleware (after bookkeeping, auth, body and in-flight limits), this ASGI layer calls their
handlers itself, skipping the router, the exception middleware, the exit stack and dependency
solving, and maps exceptions through the same :func:`service.errors.exception_response`. The
FastAPI routes stay registered: they document the endpoints in OpenAPI and serve every other method.
Measured with ``loadtest/gateway_bench.py``; see docs/benchmarks.md.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from service.errors import GatewayError, exception_response

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

Handler = Callable[[Request], Awaitable[Response]]
HANDLED = (GatewayError, RequestValidationError, HTTPException)


class FastPathMiddleware:
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
            response = await handler(request)
        except HANDLED as exc:  # the one error mapping, as FastAPI's handlers would apply it
            response = exception_response(request, exc)
        # anything else propagates as it would from a route: outer middleware may own it (the body
        # limit's 413), and Starlette's server-error handler answers the rest through the same mapping
        await response(scope, receive, send)
