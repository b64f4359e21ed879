"""``/v1/chat/completions`` and ``/v1/completions``: validate, pick the model, hand to the backend.

Both surfaces share one path (:func:`serve`): the model must be one the backend serves (404), the
request goes to the backend as a dict, non-streamed answers gain ``x-dflare-*`` headers from
``usage.speculative``, and streams are relayed chunk by chunk with first/last chunk times recorded
for TTFT and inter-token latency. A failure after the 200 ends the stream with an error event.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.responses import Response, StreamingResponse

from service.api.protocol import (
    ERROR_RESPONSES,
    ChatCompletion,
    ChatCompletionRequest,
    CompletionRequest,
    TextCompletion,
    completion_responses,
)
from service.backends.base import BackendRequest, Endpoint
from service.errors import (
    GatewayError,
    InternalError,
    InvalidRequest,
    ModelNotFound,
    RateLimited,
    error_event,
    status_of_code,
)

if TYPE_CHECKING:
    from service.backends.base import Backend, Stream
    from service.observability import RequestRecord
    from service.settings import Settings

logger = logging.getLogger(__name__)
RequestT = TypeVar("RequestT", bound=BaseModel)

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
AFFINITY_CHARS = 512
ERROR_EVENT_PREFIX = b'data: {"error"'


def _check_content_type(request: Request) -> None:
    """OpenAI takes JSON only; a body sent as a form or text is refused with a clear message."""
    # the raw header list (names are lower case): no Headers object on the hot path
    ctype = next((v for k, v in request.scope["headers"] if k == b"content-type"), None)
    if ctype is None:
        return
    media = ctype.decode("latin-1").split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise InvalidRequest(f"Unsupported Content-Type {media!r}: send the body as application/json.")


async def parse_body(request: Request, model: type[RequestT]) -> RequestT:
    """Content type, JSON and the model checked in one pass.

    Done here rather than by FastAPI's body parameter: ``orjson`` plus one ``model_validate`` costs a
    fraction of FastAPI's generic body handling on the hot path. Errors take the same route (400).
    """
    _check_content_type(request)
    try:
        data = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. The OpenAI API expects a JSON payload."
        ) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body of a route that parses its own body (see ``openapi_components``)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def openapi_components() -> dict[str, Any]:
    """JSON schemas of the request models, for ``components.schemas`` of the OpenAPI document."""
    schemas: dict[str, Any] = {}
    for model in (ChatCompletionRequest, CompletionRequest):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return schemas


router = APIRouter(tags=["completions"], responses=ERROR_RESPONSES)


@router.post(
    "/v1/chat/completions",
    response_model=None,
    summary="Chat completion (OpenAI)",
    responses=completion_responses(ChatCompletion),
    openapi_extra=_body_doc(ChatCompletionRequest),
)
async def chat_completions(request: Request) -> Response:
    body = await parse_body(request, ChatCompletionRequest)
    return await serve(request, request.app.state.backend, Endpoint.CHAT, body)


@router.post(
    "/v1/completions",
    response_model=None,
    summary="Text completion (OpenAI)",
    responses=completion_responses(TextCompletion),
    openapi_extra=_body_doc(CompletionRequest),
)
async def completions(request: Request) -> Response:
    body = await parse_body(request, CompletionRequest)
    return await serve(request, request.app.state.backend, Endpoint.COMPLETIONS, body)


def _prompt_text(body: ChatCompletionRequest | CompletionRequest) -> str:
    if isinstance(body, ChatCompletionRequest):
        return "\n".join(m.text() for m in body.messages)
    prompt = body.prompt_value()
    return prompt if isinstance(prompt, str) else " ".join(map(str, prompt))


async def serve(
    request: Request, backend: Backend, endpoint: Endpoint, body: ChatCompletionRequest | CompletionRequest
) -> Response:
    record: RequestRecord = request.scope["state"]["dflare"]
    settings: Settings = request.app.state.settings
    model = body.model
    if model not in await backend.models():
        raise ModelNotFound(model)
    record.model = model
    record.stream = body.stream
    record.choices = body.n
    data = body.model_dump(mode="json", exclude_unset=True)
    data["stream"] = body.stream
    if isinstance(body, CompletionRequest) and "max_tokens" not in data:
        data["max_tokens"] = body.max_tokens
    want_prefix = settings.routing_policy == "prefix_affinity"
    if settings.log_prompts or want_prefix:
        text = _prompt_text(body)
        if settings.log_prompts:
            record.prompt_text = text
    breq = BackendRequest(
        endpoint,
        data,
        model,
        record.request_id,
        stream=body.stream,
        include_usage=body.include_usage,
        affinity_key=text[:AFFINITY_CHARS] if want_prefix else "",
    )
    if body.stream:
        stream = await _note_route(request, record, breq, backend.stream(breq))
        return StreamingResponse(
            _relay(stream, record, settings.log_prompts),
            media_type="text/event-stream",
            headers={**SSE_HEADERS, "x-dflare-backend": record.backend or backend.name},
        )
    completion = await _note_route(request, record, breq, backend.complete(breq))
    record.usage = completion.usage
    if settings.log_prompts:
        record.completion_text = _completion_text(completion.body)
    headers = {"x-dflare-backend": record.backend or backend.name}
    stats = completion.usage.speculative
    if stats is not None:
        headers["x-dflare-verify-steps"] = str(stats.verify_steps)
        headers["x-dflare-accepted-tokens"] = str(stats.accepted_tokens)
        headers["x-dflare-acceptance-length"] = f"{stats.acceptance_length:.4f}"
    return Response(orjson.dumps(completion.body), media_type="application/json", headers=headers)


async def _note_route(request: Request, record: RequestRecord, breq: BackendRequest, call: Any) -> Any:
    """Await a backend call and copy where it went into the record, failure or not."""
    try:
        return await call
    except RateLimited:  # a full engine queue: counted like the gateway's own refusals
        request.app.state.metrics.rejected.labels("queue_full").inc()
        raise
    finally:
        record.backend = breq.served_by
        record.route_reason = breq.route_reason


async def _relay(stream: Stream, record: RequestRecord, capture_text: bool) -> AsyncIterator[bytes]:
    perf = time.perf_counter
    text: list[str] = []
    try:
        async for chunk in stream:
            now = perf()
            if record.first_chunk_at is None:
                record.first_chunk_at = now
            record.last_chunk_at = now
            if capture_text:
                text.append(_chunk_text(chunk))
            if chunk.startswith(ERROR_EVENT_PREFIX):  # the backend ended the stream with an error
                _note_stream_error(record, chunk)
            yield chunk
    except GatewayError as exc:  # after the 200: one error event, then the end
        record.error_code = exc.code or exc.type
        record.failed_status = exc.status
        yield error_event(exc) + b"data: [DONE]\n\n"
    except Exception:
        logger.exception("stream %s failed", record.request_id)
        record.error_code = InternalError.code
        record.failed_status = InternalError.status
        yield error_event(InternalError("The stream failed inside the gateway.")) + b"data: [DONE]\n\n"
    finally:
        await stream.aclose()
        record.usage = stream.usage
        if capture_text:
            record.completion_text = "".join(text)


def _note_stream_error(record: RequestRecord, chunk: bytes) -> None:
    """Book a stream that broke after its 200 as the failure it was: the error's code for the access
    line, and the status the same failure gets before the first byte for ``dflare_requests_total``."""
    event = chunk[6:].split(b"\n\n", 1)[0]
    try:
        error = orjson.loads(event)["error"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        error = {}
    code = error.get("code") if isinstance(error, dict) else None
    record.error_code = str(code or InternalError.code)
    record.failed_status = status_of_code(record.error_code)


def _completion_text(body: dict[str, Any]) -> str:
    parts = []
    for choice in body.get("choices") or ():
        message = choice.get("message")
        parts.append((message or {}).get("content") or "" if message is not None else choice.get("text", ""))
    return "".join(parts)


def _chunk_text(chunk: bytes) -> str:
    """Text deltas of the events in one relayed chunk (only with ``log_prompts``)."""
    parts = []
    for event in chunk.split(b"\n\n"):
        if not event.startswith(b"data: {"):
            continue
        try:
            data = orjson.loads(event[6:])
        except orjson.JSONDecodeError:
            continue
        for choice in data.get("choices") or ():
            delta = choice.get("delta")
            parts.append((delta or {}).get("content") or "" if delta is not None else choice.get("text", ""))
    return "".join(parts)
