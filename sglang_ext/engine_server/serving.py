"""OpenAI chat / text completions on top of an :class:`EngineRunner`: tokenize, run, answer.

Shared by the gateway's embedded backend and ``dflare engine-server``, so both produce the same bytes:
responses carry ``usage.speculative`` (``SpecStats.to_usage()``, ``null`` without a drafter), streams
end with a usage chunk when asked, then ``data: [DONE]``. Requests arrive as already validated dicts
(``protocol.py``); what only the engine can check (context length, a full queue) raises here.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from sglang_ext.engine_server.detokenize import IncrementalDetokenizer, StopMatcher
from sglang_ext.engine_server.runner import EngineRunner, Generation

if TYPE_CHECKING:
    from sglang_ext.stats import SpecStats

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"

# Used when the tokenizer ships no chat template (ChatML, as Qwen models use).
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class RequestRejected(Exception):
    """The engine cannot serve this request as asked (400 unless ``status`` says otherwise)."""

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


@dataclass(slots=True)
class Prepared:
    """A tokenized request, ready to submit."""

    request_id: str
    endpoint: str
    model: str
    prompt_ids: list[int]
    params: Any  # sglang_ext.reference.SamplingParams
    stop: tuple[str, ...]
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass(slots=True)
class Outcome:
    """How a generation ended: what the response's ``usage`` and SGLang's ``meta_info`` report."""

    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str = "stop"
    matched_stop: str | int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    stats: SpecStats | None = None
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    chunk_times: list[tuple[float, int]] | None = None  # (arrival, tokens) per engine step, if tracked

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "speculative": self.stats.to_usage() if self.stats is not None else None,
        }


def spec_meta_info(stats: SpecStats | None, completion_tokens: int) -> dict[str, Any]:
    """The speculative fields SGLang 0.5.17 adds to a finished request's ``meta_info``.

    ``spec_accept_length`` is SGLang's own definition (completion tokens per verify step, the
    prefill token included), kept as SGLang reports it; the 0.5.17 aliases are included too.
    """
    if stats is None or stats.verify_steps == 0:
        return {}
    steps = stats.verify_steps
    hist = list(stats.histogram)
    return {
        "spec_verify_ct": steps,
        "spec_num_correct_drafts": stats.accepted_tokens,
        "spec_num_proposed_drafts": stats.draft_tokens,
        "spec_accept_rate": stats.acceptance_rate,
        "spec_accept_length": completion_tokens / steps,
        "spec_correct_drafts_histogram": hist,
        "spec_accept_histogram": hist,
        "spec_accepted_drafts": stats.accepted_tokens,
        "spec_proposed_drafts": stats.draft_tokens,
    }


class OpenAIServing:
    """Turns OpenAI request dicts into engine requests and engine output into OpenAI responses."""

    def __init__(
        self,
        runner: EngineRunner,
        tokenizer: Any,
        model_name: str,
        *,
        max_context: int,
        stop_token_ids: tuple[int, ...] = (),
        sampling_defaults: dict[str, Any] | None = None,
    ):
        # set by engine-server: called with every finished Outcome (chunk times are then tracked too)
        self.on_finish: Callable[[Outcome], None] | None = None
        self.runner = runner
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_context = max_context
        self.stop_token_ids = stop_token_ids
        self.block_size = int(getattr(runner.engine, "block_size", 1))
        self.sampling_defaults = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, **(sampling_defaults or {})}
        self._chat_template = None if getattr(tokenizer, "chat_template", None) else CHATML_TEMPLATE

    # ---- request side ---------------------------------------------------------------------
    def tokenize_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        conversation = [{"role": m["role"], "content": _content_text(m.get("content"))} for m in messages]
        text = self.tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True, chat_template=self._chat_template
        )
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prepare(self, endpoint: str, body: dict[str, Any], request_id: str) -> Prepared:
        """Tokenize and check against the context; raises :class:`RequestRejected`."""
        try:
            return self._prepare(endpoint, body, request_id)
        except UnicodeError as exc:  # e.g. a lone surrogate from a \ud800 escape
            raise RequestRejected(f"The prompt is not valid Unicode text: {exc}") from None

    def _prepare(self, endpoint: str, body: dict[str, Any], request_id: str) -> Prepared:
        from sglang_ext.reference import SamplingParams

        if endpoint == CHAT:
            prompt_ids = self.tokenize_chat(body["messages"])
            prompt_param = "messages"
            max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        else:
            prompt = body["prompt"]
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]
            prompt_ids = (
                list(prompt)
                if isinstance(prompt, list)
                else self.tokenizer.encode(prompt, add_special_tokens=False)
            )
            prompt_param = "prompt"
            max_tokens = body.get("max_tokens", 16)
            vocab = len(self.tokenizer)
            if isinstance(prompt, list) and any(not 0 <= t < vocab for t in prompt_ids):
                raise RequestRejected(f"prompt token ids must be in [0, {vocab})", param="prompt")
        if not prompt_ids:
            raise RequestRejected("The prompt is empty.", param=prompt_param)
        room = self.max_context - len(prompt_ids)
        # the engine needs room for one verify block after the prompt
        if room < self.block_size or (max_tokens is not None and max_tokens > room):
            asked = len(prompt_ids) + (max_tokens or 1)
            raise RequestRejected(
                f"This model's maximum context length is {self.max_context} tokens. However, you "
                f"requested {asked} tokens ({len(prompt_ids)} in the {prompt_param}, {max_tokens or 1} "
                f"in the completion). Please reduce the length of the {prompt_param} or completion.",
                param=prompt_param if room < self.block_size else "max_tokens",
                code="context_length_exceeded",
            )
        stop = body.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        top_k = body.get("top_k")
        defaults = self.sampling_defaults
        params = SamplingParams(
            temperature=_pick(body.get("temperature"), defaults["temperature"]),
            top_p=_pick(body.get("top_p"), defaults["top_p"]),
            top_k=max(0, _pick(top_k, defaults["top_k"])),
            max_tokens=int(max_tokens or room),
            seed=None if body.get("seed") is None else body["seed"] % 2**63,  # torch takes 0..2^64-1
            stop_token_ids=self.stop_token_ids,
            stop=stop,
        )
        return Prepared(request_id, endpoint, body.get("model") or self.model_name, prompt_ids, params, stop)

    # ---- running --------------------------------------------------------------------------
    def submit(self, p: Prepared) -> Generation:
        """Admit the request now (raises ``QueueFull``), so a full queue is known before any byte."""
        return self.runner.submit(p.request_id, p.prompt_ids, p.params)

    async def _deltas(self, p: Prepared, gen: Generation, out: Outcome) -> AsyncIterator[str]:
        """Text deltas of one generation, stop strings cut; fills ``out`` as it goes."""
        detok = IncrementalDetokenizer(self.tokenizer)
        stops = StopMatcher(p.stop)
        out.prompt_tokens = len(p.prompt_ids)
        track = out.chunk_times = [] if self.on_finish is not None else None
        finished = False
        try:
            async for ids in gen:
                out.output_ids.extend(ids)
                if out.first_token_at is None:
                    out.first_token_at = time.perf_counter()
                if track is not None:
                    track.append((time.perf_counter(), len(ids)))
                text = stops.feed(detok.push(ids))
                if text:
                    out.text += text
                    yield text
                if stops.stopped:
                    break
            if not stops.stopped:
                text = stops.feed(detok.flush())
                text += stops.flush()
                if text:
                    out.text += text
                    yield text
            finished = True
        finally:
            if not gen.finished:
                self.runner.abort(p.request_id)  # client gone, or a stop string the engine missed
            out.finished_at = time.perf_counter()
            out.completion_tokens = len(out.output_ids)
            out.stats = gen.stats
            if stops.stopped:
                out.finish_reason, out.matched_stop = "stop", stops.matched
            elif finished:
                out.finish_reason = "length" if gen.finish_reason == "length" else "stop"
                last = out.output_ids[-1] if out.output_ids else None
                if out.finish_reason == "stop" and last in self.stop_token_ids:
                    out.matched_stop = last
            else:
                out.finish_reason = "abort"
            if self.on_finish is not None:
                self.on_finish(out)

    async def complete(
        self, p: Prepared, gen: Generation, *, meta_info: bool = False
    ) -> tuple[dict[str, Any], Outcome]:
        """A whole non-streamed response body of a submitted request, and its outcome."""
        out = Outcome()
        async for _ in self._deltas(p, gen, out):
            pass
        if p.endpoint == CHAT:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": out.text},
                "logprobs": None,
                "finish_reason": out.finish_reason,
            }
            obj, prefix = "chat.completion", "chatcmpl-"
        else:
            choice = {"index": 0, "text": out.text, "logprobs": None, "finish_reason": out.finish_reason}
            obj, prefix = "text_completion", "cmpl-"
        if meta_info:
            choice["meta_info"] = self.meta_info(p, out)
        body = {
            "id": prefix + p.request_id,
            "object": obj,
            "created": p.created,
            "model": p.model,
            "choices": [choice],
            "usage": out.usage(),
        }
        return body, out

    async def stream(
        self, p: Prepared, gen: Generation, out: Outcome, *, include_usage: bool
    ) -> AsyncIterator[bytes]:
        """SSE events of a submitted request; ``out`` is complete once the iterator is exhausted."""
        chat = p.endpoint == CHAT
        head = {
            "id": ("chatcmpl-" if chat else "cmpl-") + p.request_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": p.created,
            "model": p.model,
        }
        dumps = orjson.dumps
        role = chat  # the role chunk goes out with the first text, as SGLang does (TTFT stays honest)
        async for text in self._deltas(p, gen, out):
            if role:
                role = False
                yield b"data: " + dumps({**head, "choices": [_role_delta()]}) + b"\n\n"
            choice = (
                {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
                if chat
                else {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
            )
            yield b"data: " + dumps({**head, "choices": [choice]}) + b"\n\n"
        if role:
            yield b"data: " + dumps({**head, "choices": [_role_delta()]}) + b"\n\n"
        last = (
            {"index": 0, "delta": {}, "logprobs": None, "finish_reason": out.finish_reason}
            if chat
            else {"index": 0, "text": "", "logprobs": None, "finish_reason": out.finish_reason}
        )
        yield b"data: " + dumps({**head, "choices": [last]}) + b"\n\n"
        if include_usage:
            yield b"data: " + dumps({**head, "choices": [], "usage": out.usage()}) + b"\n\n"
        yield b"data: [DONE]\n\n"

    def meta_info(self, p: Prepared, out: Outcome) -> dict[str, Any]:
        """SGLang's ``meta_info`` of a finished request (native ``/generate``, ``return_meta_info``)."""
        if out.finish_reason == "length":
            finish: dict[str, Any] = {"type": "length", "length": out.completion_tokens}
        elif out.finish_reason == "abort":
            finish = {"type": "abort", "message": "aborted"}
        else:
            finish = {"type": "stop", "matched": out.matched_stop}
        meta = {
            "id": p.request_id,
            "finish_reason": finish,
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
            "cached_tokens": 0,
            "e2e_latency": (out.finished_at or time.perf_counter()) - out.started,
        }
        meta.update(spec_meta_info(out.stats, out.completion_tokens))
        return meta


def _role_delta() -> dict[str, Any]:
    return {
        "index": 0,
        "delta": {"role": "assistant", "content": ""},
        "logprobs": None,
        "finish_reason": None,
    }


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content)
