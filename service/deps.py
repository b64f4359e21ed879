"""Dependencies of the handlers as ``Annotated`` aliases: the app's backend, metrics and settings."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.backends.base import Backend
from service.metrics import GatewayMetrics
from service.settings import Settings


def get_backend(request: Request) -> Backend:
    return request.app.state.backend


def get_metrics(request: Request) -> GatewayMetrics:
    return request.app.state.metrics


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


BackendDep = Annotated[Backend, Depends(get_backend)]
MetricsDep = Annotated[GatewayMetrics, Depends(get_metrics)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
