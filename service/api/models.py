"""``/v1/models``: the models the backend serves, in OpenAI's list shape."""

from __future__ import annotations

import time

import orjson
from fastapi import APIRouter
from starlette.responses import Response

from service.api.protocol import ERROR_RESPONSES, ModelCard, ModelList
from service.deps import BackendDep
from service.errors import ModelNotFound

router = APIRouter(tags=["models"], responses=ERROR_RESPONSES)
_STARTED = int(time.time())


def _card(model: str) -> dict[str, object]:
    return {"id": model, "object": "model", "created": _STARTED, "owned_by": "dflare"}


@router.get(
    "/v1/models",
    response_model=None,
    summary="List models (OpenAI)",
    responses={200: {"model": ModelList, "description": "The served models"}},
)
async def list_models(backend: BackendDep) -> Response:
    data = [_card(m) for m in await backend.models()]
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")


@router.get(
    "/v1/models/{model:path}",
    response_model=None,
    summary="Retrieve a model (OpenAI)",
    responses={200: {"model": ModelCard, "description": "The model"}},
)
async def retrieve_model(model: str, backend: BackendDep) -> Response:
    if model not in await backend.models():
        raise ModelNotFound(model)
    return Response(orjson.dumps(_card(model)), media_type="application/json")
