"""``dflare engine-server``: the reference engine behind SGLang's HTTP protocol (what the gateway uses).

Endpoints as SGLang 0.5.17 serves them: ``/v1/chat/completions`` and ``/v1/completions`` (with our
plugin's ``usage.speculative``; non-streamed chat honours ``return_meta_info``), native ``/generate``
(``meta_info`` with SGLang's ``spec_*`` fields), ``/health``, ``/health_generate``, ``/v1/models``,
``/get_model_info``, ``/abort_request`` and ``/metrics`` (``sglang:*`` names). Errors use SGLang's
shape ``{"object": "error", "message", "type", "param", "code"}``. With ``plugin_stats=False`` it
behaves like stock SGLang: no ``usage.speculative``, stats only in ``meta_info``.
``n`` > 1 runs as ``n`` engine requests (``serving.py``). A client that disconnects aborts its
request, all its choices, as in SGLang: streamed or not, at once (:mod:`.client_watch`).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError
from starlette.responses import Response, StreamingResponse

from sglang_ext.engine_server.client_watch import ClientGone, ClientWatch
from sglang_ext.engine_server.protocol import ChatCompletionRequest, CompletionRequest
from sglang_ext.engine_server.runner import EngineFailed, QueueFull
from sglang_ext.engine_server.serving import (
    CHAT,
    COMPLETIONS,
    OpenAIServing,
    Outcome,
    RequestRejected,
    Submission,
)

logger = logging.getLogger(__name__)

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def sglang_error(status: int, message: str, param: str | None = None) -> Response:
    """SGLang's error body (vLLM's shape), which the gateway turns into OpenAI's."""
    kind = {400: "BadRequestError", 404: "NotFoundError", 503: "ServiceUnavailableError"}.get(
        status, "InternalServerError"
    )
    body = {"object": "error", "message": message, "type": kind, "param": param, "code": status}
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


class SamplingParamsIn(BaseModel):
    """Native ``/generate`` sampling parameters (SGLang names; what the reference engine supports)."""

    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, alias="sampling_seed")


class GenerateRequest(BaseModel):
    text: str | None = None
    input_ids: list[int] | None = None
    sampling_params: SamplingParamsIn = Field(default_factory=SamplingParamsIn)
    stream: bool = False
    rid: str | None = None


def create_engine_app(load: Callable[[], OpenAIServing], *, plugin_stats: bool = True) -> FastAPI:
    """``load`` builds the serving object (called once, off the event loop, at startup)."""
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import asyncio

        from sglang_ext.engine_server.metrics import EngineMetrics

        serving = await asyncio.to_thread(load)
        metrics = EngineMetrics(serving.runner, serving.model_name, serving.max_context)
        serving.on_finish = metrics.on_finish
        serving.runner.start()
        state["serving"], state["metrics"] = serving, metrics
        logger.info("engine-server ready: model %s", serving.model_name)
        try:
            yield
        finally:
            await serving.runner.stop()

    app = FastAPI(title="dflare engine-server", lifespan=lifespan)

    def serving() -> OpenAIServing:
        return state["serving"]

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: Exception) -> Response:
        return sglang_error(400, str(exc))

    @app.get("/health")
    @app.get("/health_generate")
    async def health() -> Response:
        ok = "serving" in state and serving().runner.alive
        return Response(status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> Response:
        card = {
            "id": serving().model_name,
            "object": "model",
            "created": 0,
            "owned_by": "sglang",
            "root": serving().model_name,
            "max_model_len": serving().max_context,
        }
        return Response(orjson.dumps({"object": "list", "data": [card]}), media_type="application/json")

    @app.get("/get_model_info")
    async def model_info() -> Response:
        info = {
            "model_path": serving().model_name,
            "tokenizer_path": serving().model_name,
            "is_generation": True,
        }
        return Response(orjson.dumps(info), media_type="application/json")

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(state["metrics"].exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        body = orjson.loads(await request.body() or b"{}")
        if body.get("rid"):
            serving().runner.abort(str(body["rid"]))
        return Response(status_code=200)

    async def openai(request: Request, endpoint: str, model: type[BaseModel]) -> Response:
        try:
            raw = orjson.loads(await request.body())
            req = model.model_validate(raw)
        except orjson.JSONDecodeError as exc:
            return sglang_error(400, f"Invalid JSON: {exc}")
        except ValidationError as exc:
            return sglang_error(400, str(exc))
        body = req.model_dump(mode="json", exclude_unset=True)
        rid = uuid.uuid4().hex
        return await _run(
            request,
            endpoint,
            body,
            rid,
            stream=req.stream,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            meta_info=bool(raw.get("return_meta_info")) and endpoint == CHAT,
        )

    async def _run(
        request: Request,
        endpoint: str,
        body: dict[str, Any],
        rid: str,
        *,
        stream: bool,
        include_usage: bool,
        meta_info: bool,
    ) -> Response:
        s = serving()
        if stream and meta_info:
            return sglang_error(400, "return_meta_info is not supported for streaming requests")
        try:
            sub = s.submit(s.prepare(endpoint, body, rid))
        except RequestRejected as exc:
            return sglang_error(exc.status, exc.message, exc.param)
        except QueueFull as exc:
            return sglang_error(503, f"The request queue is full: {exc}")
        if stream:
            events = s.stream(sub, include_usage=include_usage)
            return StreamingResponse(
                _strip_stats(events) if not plugin_stats else events,
                media_type="text/event-stream",
                headers=SSE_HEADERS,
            )
        try:
            with ClientWatch(request.receive):
                result = await s.complete(sub, meta_info=meta_info)  # aborts the engine request if cut
        except EngineFailed as exc:
            return sglang_error(500, f"engine failed: {exc}")
        except ClientGone:
            return _client_gone(rid)
        if not plugin_stats:
            result["usage"].pop("speculative", None)
        return Response(orjson.dumps(result), media_type="application/json")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await openai(request, CHAT, ChatCompletionRequest)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await openai(request, COMPLETIONS, CompletionRequest)

    @app.post("/generate")
    async def generate(req: GenerateRequest, request: Request) -> Response:
        s = serving()
        if (req.text is None) == (req.input_ids is None):
            return sglang_error(400, "Either text or input_ids should be provided.")
        sp = req.sampling_params
        body: dict[str, Any] = {
            "prompt": req.text if req.text is not None else req.input_ids,
            "max_tokens": sp.max_new_tokens,
            "temperature": sp.temperature,
            "top_p": sp.top_p,
            "top_k": sp.top_k,
            "stop": sp.stop,
            "seed": sp.seed,
        }
        rid = req.rid or uuid.uuid4().hex
        try:
            sub = s.submit(s.prepare(COMPLETIONS, body, rid))
        except RequestRejected as exc:
            return sglang_error(exc.status, exc.message, exc.param)
        except QueueFull as exc:
            return sglang_error(503, f"The request queue is full: {exc}")
        if req.stream:
            return StreamingResponse(
                _native_stream(s, sub), media_type="text/event-stream", headers=SSE_HEADERS
            )
        try:
            with ClientWatch(request.receive):
                await s.complete(sub)
        except ClientGone:
            return _client_gone(rid)
        out = sub.outs[0]
        native = {
            "text": out.text,
            "output_ids": _native_ids(out),
            "meta_info": s.meta_info(sub.prepared, out),
        }
        return Response(orjson.dumps(native), media_type="application/json")

    return app


def _client_gone(rid: str) -> Response:
    """What a handler returns once its client left (the engine request is already aborted): nothing
    reaches anyone, the status is for the server's own log (nginx's 499)."""
    logger.info("request %s aborted: the client disconnected", rid)
    return Response(status_code=499)


def _native_ids(out: Outcome) -> list[int]:
    """SGLang's native ``output_ids`` end with the stop token id that ended the request (its text not)."""
    if isinstance(out.matched_stop, int) and out.completion_tokens > len(out.output_ids):
        return [*out.output_ids, out.matched_stop]
    return out.output_ids


async def _native_stream(s: OpenAIServing, sub: Submission) -> AsyncIterator[bytes]:
    """SGLang's native stream: cumulative text and ids, ``meta_info`` on every chunk, spec fields last."""
    p, out = sub.prepared, sub.outs[0]
    async for _ in s.stream(sub, include_usage=False):
        if out.first_token_at is None or out.finished_at is not None:
            continue
        meta = {
            "id": p.request_id,
            "finish_reason": None,
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": len(out.output_ids),
            "cached_tokens": 0,
        }
        chunk = {"text": out.text, "output_ids": list(out.output_ids), "meta_info": meta}
        yield b"data: " + orjson.dumps(chunk) + b"\n\n"
    final = {"text": out.text, "output_ids": _native_ids(out), "meta_info": s.meta_info(p, out)}
    yield b"data: " + orjson.dumps(final) + b"\n\n"
    yield b"data: [DONE]\n\n"


async def _strip_stats(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Stock SGLang streams carry no speculative stats: drop ``usage.speculative`` from the usage chunk."""
    async for event in events:
        if event.startswith(b"data: {") and b'"speculative"' in event:
            data = orjson.loads(event[6:])
            if isinstance(data.get("usage"), dict):
                data["usage"].pop("speculative", None)
                event = b"data: " + orjson.dumps(data) + b"\n\n"
        yield event
