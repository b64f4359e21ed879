"""HTTP surfaces of the gateway, one router module each; ``include_routers`` mounts them all."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI


def include_routers(app: FastAPI) -> None:
    from service.api import completions, health, models

    app.include_router(completions.router)
    app.include_router(models.router)
    app.include_router(health.router)
    _document_request_bodies(app, completions.openapi_components())


def _document_request_bodies(app: FastAPI, schemas: dict[str, Any]) -> None:
    """Add the schemas of bodies that handlers parse themselves to the generated OpenAPI document."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()
            document.setdefault("components", {}).setdefault("schemas", {}).update(schemas)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
