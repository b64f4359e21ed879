"""OpenAI request bodies (shared with ``dflare engine-server``), and the documented responses.

The response models only document the answers in the OpenAPI schema (the gateway relays what the
backend sent and never validates it on the hot path); fields beyond them are allowed, as OpenAI's
own clients allow them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from sglang_ext.engine_server.protocol import ChatCompletionRequest, CompletionRequest

__all__ = [
    "ERROR_RESPONSES",
    "ChatCompletion",
    "ChatCompletionRequest",
    "CompletionRequest",
    "ErrorBody",
    "ErrorResponse",
    "ModelCard",
    "ModelList",
    "TextCompletion",
    "completion_responses",
]


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


class _Documented(BaseModel):
    model_config = ConfigDict(extra="allow")


class SpeculativeUsage(_Documented):
    """``usage.speculative``: the request's speculative-decoding stats (``SpecStats.to_usage``)."""

    block_size: int
    verify_steps: int
    draft_tokens: int
    accepted_tokens: int
    acceptance_length: float
    acceptance_rate: float
    accepted_per_position: list[int]
    histogram: list[int]
    plain_decode_steps: int = 0  # decode steps without speculation (absent from older engines: 0)


class CompletionUsage(_Documented):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int | None = None
    speculative: SpeculativeUsage | None = None


class AssistantMessage(_Documented):
    role: Literal["assistant"]
    content: str | None = None


class ChatChoice(_Documented):
    index: int
    message: AssistantMessage
    finish_reason: str | None = None


class ChatCompletion(_Documented):
    """A non-streamed chat answer (``stream: false``)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage


class TextChoice(_Documented):
    index: int
    text: str
    finish_reason: str | None = None


class TextCompletion(_Documented):
    """A non-streamed text completion (``stream: false``)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: CompletionUsage


class ModelCard(_Documented):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Documented):
    object: Literal["list"]
    data: list[ModelCard]


SSE_SCHEMA = {
    "type": "object",
    "description": "One server-sent event: `data` holds a chunk as JSON, `[DONE]` last; a failure after "
    'the 200 arrives as one `{"error": ...}` event before `[DONE]`.',
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
    "required": ["data"],
}


def completion_responses(answer: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The documented answers of a completion endpoint: JSON, or an event stream with ``stream: true``."""
    return {
        200: {
            "model": answer,
            "description": "The completion: JSON, or with `stream: true` an event stream",
            "content": {"text/event-stream": {"schema": SSE_SCHEMA}},
        },
        **ERROR_RESPONSES,
    }
