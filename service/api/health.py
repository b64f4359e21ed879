"""Liveness (``/health``), readiness (``/ready``: a backend can take a request) and ``/metrics``."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from starlette.responses import JSONResponse, Response

from service.deps import BackendDep, MetricsDep
from service.errors import BackendUnavailable, error_response
from service.metrics import CONTENT_TYPE

router = APIRouter(tags=["operations"])
READY_TIMEOUT_S = 5.0


@router.get("/health", summary="Liveness: the gateway process answers")
async def health() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get(
    "/ready",
    summary="Readiness: a backend can take a request",
    response_model=None,
    responses={503: {"description": "No backend is usable"}},
)
async def ready(backend: BackendDep) -> Response:
    """``dflare_backend_up`` is kept by whoever watches health (the pool's prober), not by this probe."""
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            usable = await backend.health()
    except TimeoutError:
        usable = False
    if not usable:
        return error_response(BackendUnavailable(f"Backend {backend.name} is not ready."))
    return JSONResponse({"status": "ready", "backend": backend.name})


@router.get("/metrics", summary="Prometheus metrics of the gateway", response_class=Response)
async def metrics_endpoint(metrics: MetricsDep) -> Response:
    return Response(metrics.exposition(), media_type=CONTENT_TYPE)
