"""Dependencies of the handlers as ``Annotated`` aliases: the app's backend, metrics and settings.

All ``async def``: FastAPI runs a plain ``def`` dependency in a worker thread, which measured as the
largest single cost of a proxied request.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.backends.base import Backend
from service.metrics import GatewayMetrics
from service.settings import Settings


async def get_backend(request: Request) -> Backend:
    return request.app.state.backend


async def get_metrics(request: Request) -> GatewayMetrics:
    return request.app.state.metrics


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


BackendDep = Annotated[Backend, Depends(get_backend)]
MetricsDep = Annotated[GatewayMetrics, Depends(get_metrics)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
