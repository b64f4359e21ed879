"""OpenAI request bodies (shared with ``dflare engine-server``) and the documented error responses."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from sglang_ext.engine_server.protocol import ChatCompletionRequest, CompletionRequest

__all__ = ["ERROR_RESPONSES", "ChatCompletionRequest", "CompletionRequest", "ErrorBody", "ErrorResponse"]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


_ERROR = {"model": ErrorResponse}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {**_ERROR, "description": "Invalid request (also malformed JSON, wrong types, context too long)"},
    401: {**_ERROR, "description": "Missing or invalid API key"},
    404: {**_ERROR, "description": "Unknown model"},
    413: {**_ERROR, "description": "Request body too large"},
    429: {**_ERROR, "description": "Queue full or too many requests in flight"},
    500: {**_ERROR, "description": "Internal error"},
    503: {**_ERROR, "description": "No backend available"},
    504: {**_ERROR, "description": "Backend timed out"},
}
