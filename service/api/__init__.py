"""HTTP surfaces of the gateway, one router module each; ``include_routers`` mounts them all."""

from __future__ import annotations

from fastapi import FastAPI


def include_routers(app: FastAPI) -> None:
    from service.api import completions, health, models

    app.include_router(completions.router)
    app.include_router(models.router)
    app.include_router(health.router)
