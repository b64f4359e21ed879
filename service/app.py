"""The gateway's app factory: ``create_app(settings)``; no module-level app, no globals.

The lifespan owns, in order: the one pooled ``aiohttp`` session, the backend (embedded engine when
no backend URL and no discovery is configured, else the routed pool of SGLang URLs), and closes them
in reverse. Middleware, outermost first: request bookkeeping (metrics, access log, request id), CORS,
API keys, body limit, in-flight limit, the direct route of the two completion endpoints; all built by
one :class:`~service.fastpath.GatewayMiddleware`, which serves the completion endpoints in one pass.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI

from service.api import include_routers
from service.backends.base import Endpoint
from service.errors import register_exception_handlers
from service.fastpath import GatewayApp, GatewayMiddleware
from service.metrics import GatewayMetrics
from service.security import KeyChecker
from service.settings import Settings

if TYPE_CHECKING:
    import aiohttp

    from service.backends.base import Backend

logger = logging.getLogger(__name__)

# FastAPI >= 0.16x wraps every request in OpenTelemetry spans, metrics and logs unless told not to:
# about 0.1 ms per request even with no provider configured. The gateway has its own metrics and
# access log, so it is turned off where that FastAPI option exists.
_NO_NATIVE_TELEMETRY = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters
    else {}
)


def build_backend(settings: Settings, session: aiohttp.ClientSession, metrics: GatewayMetrics) -> Backend:
    """The embedded engine, or a routed pool of single-URL SGLang backends sharing ``session``."""
    if settings.uses_embedded_engine:
        from service.backends.embedded import EmbeddedBackend

        return EmbeddedBackend(settings)
    from service.backends.sglang_http import SGLangHTTPBackend
    from service.routing.routed import RoutedBackend

    def make_client(url: str) -> Backend:
        return SGLangHTTPBackend.from_settings(url, session, settings)

    return RoutedBackend.from_settings(settings, make_client, metrics)


def create_app(settings: Settings | None = None, backend: Backend | None = None) -> FastAPI:
    """Build the gateway. ``backend`` replaces the one ``settings`` would build (tests, embedding)."""
    settings = settings if settings is not None else Settings()
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from service.backends.sglang_http import new_session

        session = new_session(settings.connect_timeout_s)
        chosen = backend if backend is not None else build_backend(settings, session, metrics)
        app.state.backend = chosen
        try:
            await chosen.start()
            if settings.uses_embedded_engine and backend is None:
                metrics.backend_up.labels(chosen.name).set(1)
                metrics.set_backend_counts(1, 1)
            logger.info("gateway ready: backend %s", chosen.name)
            yield
        finally:
            await chosen.close()
            await session.close()

    app = GatewayApp(
        title="DFlare Serve gateway",
        summary="OpenAI-compatible API with per-request speculative decoding stats",
        version="0.1.0",
        lifespan=lifespan,
        **_NO_NATIVE_TELEMETRY,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    register_exception_handlers(app)
    include_routers(app)
    # One layer: it builds the middleware chain (bookkeeping > CORS > API keys > body limit >
    # in-flight limit > direct route) and serves the two completion endpoints in one pass.
    from service.api import completions

    checker = KeyChecker.from_sources(settings.api_keys, settings.api_keys_file, settings.api_keys_reload_s)
    if checker:
        logger.info("API keys required (%d configured)", len(checker))
    metrics_checker = None
    if settings.metrics_tokens_file is not None:
        metrics_checker = KeyChecker.from_sources(
            [], settings.metrics_tokens_file, settings.api_keys_reload_s
        )
    app.add_middleware(
        GatewayMiddleware,
        routes={
            Endpoint.CHAT.value: completions.chat_completions,
            Endpoint.COMPLETIONS.value: completions.completions,
        },
        metrics=metrics,
        access_log=settings.access_log,
        checker=checker,
        metrics_require_auth=settings.metrics_require_auth,
        metrics_checker=metrics_checker,
        max_body_bytes=settings.max_body_bytes,
        max_in_flight=settings.max_in_flight,
        cors_origins=settings.cors_origins,
    )
    return app


def app_from_env() -> FastAPI:
    """uvicorn factory (``service.app:app_from_env``): settings from ``DFLARE_*`` / the config file."""
    return create_app(Settings())
