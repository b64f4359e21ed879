"""OpenAI chat / text completions on top of an :class:`EngineRunner`: tokenize, run, answer.

Shared by the gateway's embedded backend and ``dflare engine-server``, so both produce the same bytes:
responses carry ``usage.speculative`` (``SpecStats.to_usage()``, ``null`` without a drafter), streams
end with a usage chunk when asked, then ``data: [DONE]``. Requests arrive as already validated dicts
(``protocol.py``); what only the engine can check (context length, a full queue) raises here.

``n`` > 1 (several choices) runs as ``n`` independent engine requests, admitted together (all or none)
and batched by the engine like any others; the answer follows OpenAI and SGLang: one choice per index,
``prompt_tokens`` counted once, ``completion_tokens`` summed, ``usage.speculative`` the merged stats.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import orjson

from sglang_ext.engine_server.detokenize import IncrementalDetokenizer, StopMatcher
from sglang_ext.engine_server.runner import EngineRunner, Generation
from sglang_ext.stats import total

if TYPE_CHECKING:
    from sglang_ext.stats import SpecStats

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"

# Used when the tokenizer ships no chat template (ChatML, as Qwen models use).
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# 2^64 / golden ratio: consecutive choices of one seeded request get far-apart seeds
SEED_STRIDE = 0x9E3779B97F4A7C15


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
    n: int = 1  # choices
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
    scheduled_at: float | None = None  # the engine step that prefilled it began (queue time ends)
    finished_at: float | None = None
    chunk_times: list[tuple[float, int]] | None = None  # (arrival, tokens) per engine step, if tracked


@dataclass(eq=False, slots=True)
class Submission:
    """One admitted OpenAI call: per choice ``i`` its engine generation ``gens[i]`` and ``outs[i]``,
    which fills as the choice runs. Its usage is what the response reports for all choices."""

    prepared: Prepared
    gens: list[Generation]
    outs: list[Outcome]

    @property
    def prompt_tokens(self) -> int:
        """The prompt once, whatever ``n`` (OpenAI's and SGLang's convention)."""
        return self.outs[0].prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return sum(out.completion_tokens for out in self.outs)

    @property
    def stats(self) -> SpecStats | None:
        """The choices' stats merged, as SGLang with our plugin reports them; ``None`` if no decode step
        ran (SGLang reports ``null`` when an answer ends at its first token, so do we). An answer decoded
        by plain steps only has stats: no verify step, its plain steps."""
        merged = total(out.stats for out in self.outs if out.stats is not None)
        return merged if merged is not None and (merged.verify_steps or merged.plain_steps) else None

    def usage(self) -> dict[str, Any]:
        prompt, completion, stats = self.prompt_tokens, self.completion_tokens, self.stats
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "speculative": stats.to_usage() if stats is not None else None,
        }


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice ``index``: the request's own for choice 0 (so ``n=1`` and the first of ``n``
    agree), one derived from it for the others, so seeded choices differ and still reproduce."""
    if seed is None:
        return None
    return (seed + index * SEED_STRIDE) % 2**63


def spec_meta_info(stats: SpecStats | None, completion_tokens: int) -> dict[str, Any]:
    """The speculative fields SGLang 0.5.17 adds to a finished request's ``meta_info``.

    ``spec_accept_length`` is SGLang's own definition (completion tokens per verify step, the
    prefill token included), kept as SGLang reports it; the 0.5.17 aliases are included too. Proposed
    drafts keep SGLang's meaning, ``B - 1`` per verify step (clients infer the block size from it); the
    drafts our adaptive draft length actually verified go in the extra ``spec_num_verified_drafts``,
    which :meth:`SpecStats.from_sglang_meta_info` reads, and the accept rate is accepted / verified. The
    decode steps that verified no draft go in the extra ``spec_num_plain_steps``; a request that only
    took such steps has ``spec_verify_ct`` 0 and, as SGLang before any verify step, accept length 0.
    """
    if stats is None or not (stats.verify_steps or stats.plain_steps):
        return {}
    steps = stats.verify_steps
    hist = list(stats.histogram)
    proposed = steps * (stats.block_size - 1)
    return {
        "spec_verify_ct": steps,
        "spec_num_correct_drafts": stats.accepted_tokens,
        "spec_num_proposed_drafts": proposed,
        "spec_num_verified_drafts": stats.draft_tokens,
        "spec_num_plain_steps": stats.plain_steps,
        "spec_accept_rate": stats.acceptance_rate,
        "spec_accept_length": completion_tokens / steps if steps else 0.0,
        "spec_correct_drafts_histogram": hist,
        "spec_accept_histogram": hist,
        "spec_accepted_drafts": stats.accepted_tokens,
        "spec_proposed_drafts": proposed,
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
        model = body.get("model") or self.model_name
        return Prepared(request_id, endpoint, model, prompt_ids, params, stop, int(body.get("n") or 1))

    # ---- running --------------------------------------------------------------------------
    def submit(self, p: Prepared) -> Submission:
        """Admit every choice now (raises ``QueueFull``), so a full queue is known before any byte.

        Choice ``i`` of ``n`` > 1 is engine request ``<id>-<i>`` with seed :func:`choice_seed`
        (ids made unique among the admitted requests; the response keeps the caller's).
        """
        runner = self.runner
        if p.n == 1:
            gen = runner.submit(runner.unique_id(p.request_id), p.prompt_ids, p.params)
            return Submission(p, [gen], [Outcome()])
        if p.n > runner.capacity:  # would never fit: a 400, not a 429 to retry forever
            raise RequestRejected(
                f"n={p.n} is more than this engine can hold at once ({runner.capacity} requests).",
                param="n",
            )
        seed = p.params.seed
        choices = [
            (
                runner.unique_id(f"{p.request_id}-{i}"),
                p.prompt_ids,
                replace(p.params, seed=choice_seed(seed, i)),
            )
            for i in range(p.n)
        ]
        gens = runner.submit_many(choices)
        return Submission(p, gens, [Outcome() for _ in gens])

    def abort(self, sub: Submission) -> None:
        """Abort every choice still in the engine (client gone, timeout, a sibling failed)."""
        for gen in sub.gens:
            if not gen.finished:
                self.runner.abort(gen.request_id)

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
            if stops.stopped and not gen.finished:
                # end it in the engine and wait for its Result (one engine step): the stats of an
                # aborted request come with that Result, and a stop string must not cost the user them
                self.runner.abort(gen.request_id)
                await gen.wait()
            if not stops.stopped:
                text = stops.feed(detok.flush())
                text += stops.flush()
                if text:
                    out.text += text
                    yield text
            finished = True
        finally:
            if not gen.finished:
                self.runner.abort(gen.request_id)  # client gone, or a stop string the engine missed
            out.finished_at = time.perf_counter()
            out.scheduled_at = gen.scheduled_at
            out.completion_tokens = len(out.output_ids)
            out.stats = gen.stats
            if stops.stopped:
                out.finish_reason, out.matched_stop = "stop", stops.matched
            elif finished:
                out.finish_reason = "length" if gen.finish_reason == "length" else "stop"
                if gen.result is not None and gen.result.matched_stop is not None:
                    # counted and reported as SGLang does: the end-of-turn token is generated output
                    out.matched_stop = gen.result.matched_stop
                    out.completion_tokens += 1
            else:
                out.finish_reason = "abort"
            if self.on_finish is not None:
                self.on_finish(out)

    async def _choice_deltas(self, sub: Submission) -> AsyncIterator[tuple[int, str | None]]:
        """``(index, text delta)`` of every choice as it arrives, ``(index, None)`` once that choice
        ended (its outcome complete). The choices are read concurrently, so a stop string ends each
        one as soon as it shows; an error of one choice ends them all."""
        p = sub.prepared
        if len(sub.gens) == 1:
            async with aclosing(self._deltas(p, sub.gens[0], sub.outs[0])) as deltas:
                async for text in deltas:
                    yield 0, text
            yield 0, None
            return
        queue: asyncio.Queue[tuple[int, str | Exception | None]] = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                async for text in self._deltas(p, sub.gens[i], sub.outs[i]):
                    queue.put_nowait((i, text))
            except Exception as exc:  # handed to the reader, which raises it
                queue.put_nowait((i, exc))
                return
            queue.put_nowait((i, None))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(sub.gens))]
        try:
            running = len(tasks)
            while running:
                i, item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                running -= item is None
                yield i, item
        finally:
            for task in tasks:
                task.cancel()
            self.abort(sub)  # before any await: this frame may itself be cancelled again there
            await asyncio.gather(*tasks, return_exceptions=True)

    async def complete(self, sub: Submission, *, meta_info: bool = False) -> dict[str, Any]:
        """The whole non-streamed response body of a submitted request; ``sub.outs`` complete after."""
        try:
            async with aclosing(self._choice_deltas(sub)) as deltas:
                async for _ in deltas:
                    pass
        finally:
            self.abort(sub)
        p = sub.prepared
        chat = p.endpoint == CHAT
        choices = []
        for i, out in enumerate(sub.outs):
            if chat:
                choice: dict[str, Any] = {
                    "index": i,
                    "message": {"role": "assistant", "content": out.text},
                    "logprobs": None,
                    "finish_reason": out.finish_reason,
                }
            else:
                choice = {"index": i, "text": out.text, "logprobs": None, "finish_reason": out.finish_reason}
            if meta_info:
                choice["meta_info"] = self.meta_info(p, out)
            choices.append(choice)
        return {
            "id": ("chatcmpl-" if chat else "cmpl-") + p.request_id,
            "object": "chat.completion" if chat else "text_completion",
            "created": p.created,
            "model": p.model,
            "choices": choices,
            "usage": sub.usage(),
        }

    async def stream(self, sub: Submission, *, include_usage: bool) -> AsyncIterator[bytes]:
        """SSE events of a submitted request, each choice's chunks carrying its ``index`` (interleaved
        as the choices progress, a finish chunk per choice, as SGLang sends them); ``sub.outs`` is
        complete once the iterator is exhausted."""
        p = sub.prepared
        chat = p.endpoint == CHAT
        head = {
            "id": ("chatcmpl-" if chat else "cmpl-") + p.request_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": p.created,
            "model": p.model,
        }
        dumps = orjson.dumps
        # the role chunk of a choice goes out with its first text, as SGLang does (TTFT stays honest)
        greet = [chat] * len(sub.outs)
        try:
            async with aclosing(self._choice_deltas(sub)) as deltas:
                async for i, text in deltas:
                    if greet[i]:
                        greet[i] = False
                        yield b"data: " + dumps({**head, "choices": [_role_delta(i)]}) + b"\n\n"
                    if text is None:
                        reason = sub.outs[i].finish_reason
                        choice = (
                            {"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}
                            if chat
                            else {"index": i, "text": "", "logprobs": None, "finish_reason": reason}
                        )
                    else:
                        choice = (
                            {"index": i, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
                            if chat
                            else {"index": i, "text": text, "logprobs": None, "finish_reason": None}
                        )
                    yield b"data: " + dumps({**head, "choices": [choice]}) + b"\n\n"
        finally:
            self.abort(sub)
        if include_usage:
            yield b"data: " + dumps({**head, "choices": [], "usage": sub.usage()}) + b"\n\n"
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


def _role_delta(index: int) -> dict[str, Any]:
    return {
        "index": index,
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
