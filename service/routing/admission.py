"""Overload protection: a bound on requests in flight in this gateway process.

Past ``max_in_flight`` concurrent API requests the gateway answers 429 with ``Retry-After`` at
once instead of queueing: a queue in front of a saturated fleet only adds latency and memory, while
a fast 429 lets the client (or a load balancer) back off or go elsewhere. The bound is per process:
with N uvicorn workers the gateway admits up to N x ``max_in_flight``. A request counts from its
arrival until its response (stream included) has been sent, so memory stays flat under any load.
Health, readiness and metrics are never counted or refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from service.errors import RateLimited
from service.security import send_error

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

EXEMPT_PATHS = frozenset({"/health", "/ready", "/metrics"})


class InFlightLimiter:
    """Pure ASGI middleware; ``on_reject(reason)`` feeds ``dflare_rejected_requests_total``."""

    def __init__(
        self,
        app: ASGIApp,
        max_in_flight: int,
        retry_after_s: int = 1,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.retry_after_s = retry_after_s
        self.on_reject = on_reject
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            if self.on_reject is not None:
                self.on_reject("overload")
            message = f"The gateway is at its limit of {self.max_in_flight} concurrent requests; retry later."
            await send_error(send, RateLimited(message, retry_after=self.retry_after_s))
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
