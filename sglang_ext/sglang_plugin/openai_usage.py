"""``usage.speculative`` on SGLang's own OpenAI endpoints (``/v1/chat/completions``, ``/v1/completions``).

SGLang 0.5.17 puts the per-request speculative counters only into ``meta_info`` (native ``/generate``,
or ``return_meta_info`` on non-streamed chat). These ``HookRegistry`` hooks, applied in the HTTP server
process, add ``SpecStats.to_usage()`` (summed over the request's choices) to

* non-streamed responses: AFTER hooks on ``_build_chat_response`` / ``_build_completion_response``;
* streamed responses: the final usage chunk (``stream_options.include_usage``), via AROUND hooks on
  ``_generate_chat_stream`` / ``_generate_completion_stream`` that read the ``meta_info`` the
  tokenizer manager yields for that request (AROUND hook on ``TokenizerManager.generate_request``).

A server that did not speculate reports ``"speculative": null``, as our gateway does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from sglang_ext.stats import SpecStats, total

logger = logging.getLogger(__name__)

_CHAT = "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat"
_COMPLETIONS = "sglang.srt.entrypoints.openai.serving_completions.OpenAIServingCompletion"
_TOKENIZER = "sglang.srt.managers.tokenizer_manager.TokenizerManager.generate_request"

# Streams in flight: id(GenerateReqInput) -> {choice index: latest meta_info}. The stream wrapper owns
# the entry (added before the request starts, removed when the stream ends).
_STREAM_META: dict[int, dict[int, Mapping[str, Any]]] = {}


def speculative_usage(metas: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """``usage.speculative`` for a request whose choices finished with these ``meta_info`` dicts."""
    try:
        stats = total(s for s in (SpecStats.from_sglang_meta_info(m) for m in metas) if s is not None)
    except (ValueError, KeyError, TypeError) as exc:  # never fail a response over its statistics
        logger.warning("DFLARE: cannot read speculative stats from meta_info: %s", exc)
        return None
    return stats.to_usage() if stats is not None else None


def _with_speculative(response: Any, ret: list[Mapping[str, Any]]) -> Any:
    """The response as JSON with ``usage.speculative`` (SGLang's UsageInfo model has no room for it)."""
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel

    if not isinstance(response, BaseModel) or getattr(response, "usage", None) is None:
        return response  # error responses pass through
    content = response.model_dump(mode="json", by_alias=True)
    content["usage"]["speculative"] = speculative_usage(item.get("meta_info", {}) for item in ret)
    return JSONResponse(content=content)


def after_build_response(result: Any, _self: Any, request: Any, ret: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER hook of ``_build_chat_response`` / ``_build_completion_response``."""
    items = ret if isinstance(ret, list) else [ret]
    return _with_speculative(result, items)


def patch_usage_chunk(chunk: str, metas: Mapping[int, Mapping[str, Any]]) -> str:
    """Add ``usage.speculative`` to the stream's final usage chunk (``choices: []``); others unchanged."""
    if not (chunk.startswith("data: {") and '"usage":{' in chunk and '"choices":[]' in chunk):
        return chunk
    payload = json.loads(chunk[len("data: ") :])
    if payload.get("choices") != [] or not isinstance(payload.get("usage"), dict):
        return chunk
    payload["usage"]["speculative"] = speculative_usage(metas.values())
    return "data: " + json.dumps(payload, separators=(",", ":")) + "\n\n"


async def _stream_with_usage(stream: AsyncIterator[str], key: int) -> AsyncIterator[str]:
    metas: dict[int, Mapping[str, Any]] = {}
    _STREAM_META[key] = metas
    try:
        async for chunk in stream:
            yield patch_usage_chunk(chunk, metas) if isinstance(chunk, str) else chunk
    finally:
        _STREAM_META.pop(key, None)


def around_generate_stream(original: Any, self: Any, adapted_request: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND hook of ``_generate_chat_stream`` / ``_generate_completion_stream``."""
    return _stream_with_usage(original(self, adapted_request, *args, **kwargs), id(adapted_request))


async def _record_meta(
    outputs: AsyncIterator[Any], metas: dict[int, Mapping[str, Any]]
) -> AsyncIterator[Any]:
    try:
        async for out in outputs:
            for item in out if isinstance(out, list) else [out]:
                if isinstance(item, Mapping) and "meta_info" in item:
                    metas[int(item.get("index", 0) or 0)] = item["meta_info"]
            yield out
    finally:
        await outputs.aclose()


def around_generate_request(original: Any, self: Any, obj: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND hook of ``TokenizerManager.generate_request``: feeds the stream wrapper its meta_info."""
    outputs = original(self, obj, *args, **kwargs)
    metas = _STREAM_META.get(id(obj))
    return outputs if metas is None else _record_meta(outputs, metas)


HOOKS = (
    (f"{_CHAT}._build_chat_response", after_build_response, "AFTER"),
    (f"{_COMPLETIONS}._build_completion_response", after_build_response, "AFTER"),
    (f"{_CHAT}._generate_chat_stream", around_generate_stream, "AROUND"),
    (f"{_COMPLETIONS}._generate_completion_stream", around_generate_stream, "AROUND"),
    (_TOKENIZER, around_generate_request, "AROUND"),
)
