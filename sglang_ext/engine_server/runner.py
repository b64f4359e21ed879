"""Drive a ``SpeculativeEngine`` from one worker thread so asyncio code never blocks on a forward.

The engine is synchronous and not thread-safe: only the worker thread touches it. Event-loop code
calls :meth:`EngineRunner.submit` / :meth:`EngineRunner.abort`, which post commands to the thread; the
thread adds every waiting request before each ``step()``, so concurrent requests share one batched
forward. New tokens of one step are handed back to the loop in one ``call_soon_threadsafe``.
The number of admitted requests (running + waiting) is bounded: past it :class:`QueueFull`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sglang_ext.reference import Result, SamplingParams, SpeculativeEngine
    from sglang_ext.stats import SpecStats

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The engine already holds as many requests as it may; the caller answers 429."""


class EngineFailed(Exception):
    """The engine raised while running this request."""


@dataclass(eq=False)
class Generation:
    """One request on the loop side: an async iterator of new token ids, then ``result``."""

    request_id: str
    prompt_tokens: int
    result: Result | None = None
    error: BaseException | None = None
    _chunks: deque[list[int]] = field(default_factory=deque)
    _wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    _done: bool = False
    generated: int = 0
    # perf_counter when the engine step that prefilled it began: its wait in the queue ends there
    scheduled_at: float | None = None

    @property
    def finished(self) -> bool:
        return self._done

    @property
    def finish_reason(self) -> str:
        return self.result.finish_reason if self.result is not None else "abort"

    @property
    def stats(self) -> SpecStats | None:
        return self.result.stats if self.result is not None else None

    def _push(self, tokens: list[int]) -> None:
        self.generated += len(tokens)
        self._chunks.append(tokens)
        self._wakeup.set()

    def _finish(self, result: Result | None, error: BaseException | None = None) -> None:
        if self._done:
            return
        self.result, self.error, self._done = result, error, True
        self._wakeup.set()

    async def __aiter__(self) -> AsyncIterator[list[int]]:
        while True:
            while self._chunks:
                yield self._chunks.popleft()
            if self._done:
                if self.error is not None:
                    raise EngineFailed(str(self.error)) from self.error
                return
            self._wakeup.clear()
            await self._wakeup.wait()

    async def wait(self) -> Result | None:
        """Drain to the end; returns the engine's result (``None`` if it was aborted)."""
        async for _ in self:
            pass
        return self.result


class EngineRunner:
    """Owns the engine's worker thread. Create, :meth:`start` inside a running loop, :meth:`stop`."""

    def __init__(self, engine: SpeculativeEngine, max_waiting: int) -> None:
        self.engine = engine
        self.capacity = int(getattr(engine, "max_batch", 1)) + max_waiting
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._gens: dict[str, Generation] = {}  # loop side: admitted, not finished
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # ---- loop side ------------------------------------------------------------------------
    @property
    def num_admitted(self) -> int:
        return len(self._gens)

    def tokens_in_use(self) -> int:
        """Prompt + generated tokens of every admitted request (what its KV cache holds, roughly)."""
        return sum(g.prompt_tokens + g.generated for g in self._gens.values())

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="dflare-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopping.set()
        self._commands.put(("wake", None))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        for gen in list(self._gens.values()):
            gen._finish(None, RuntimeError("engine stopped"))
        self._gens.clear()

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Generation:
        """Admit a request or raise :class:`QueueFull`. Tokens arrive through the returned object."""
        if len(self._gens) >= self.capacity:
            raise QueueFull(f"engine queue is full ({self.capacity} requests admitted)")
        if request_id in self._gens:
            raise ValueError(f"duplicate request id {request_id!r}")
        from sglang_ext.reference import Request

        gen = Generation(request_id=request_id, prompt_tokens=len(prompt_ids))
        self._gens[request_id] = gen
        self._commands.put(("add", Request(request_id, list(prompt_ids), params)))
        return gen

    def submit_many(self, requests: list[tuple[str, list[int], SamplingParams]]) -> list[Generation]:
        """Admit every ``(request_id, prompt_ids, params)`` or none (raises :class:`QueueFull`): the
        choices of one OpenAI call (``n``) run together, or the call is refused whole."""
        if len(self._gens) + len(requests) > self.capacity:
            raise QueueFull(
                f"engine queue is full ({len(self._gens)} of {self.capacity} requests admitted, "
                f"{len(requests)} more asked)"
            )
        return [self.submit(rid, ids, params) for rid, ids, params in requests]

    def unique_id(self, request_id: str) -> str:
        """``request_id``, or a suffixed variant of it while an admitted request holds it: a client
        may reuse its ``x-request-id`` (a retry while the first attempt still runs)."""
        rid = request_id
        while rid in self._gens:
            rid = f"{request_id}~{secrets.token_hex(4)}"
        return rid

    def abort(self, request_id: str) -> None:
        """Stop a request (client gone, stop string seen). Its Generation ends at once."""
        gen = self._gens.pop(request_id, None)
        if gen is None:
            return
        gen._finish(gen.result)
        self._commands.put(("abort", request_id))

    def _deliver(
        self,
        tokens: list[tuple[str, list[int], float]],
        results: list[Result],
        failed: list[tuple[str, BaseException]],
    ) -> None:
        gens = self._gens
        for rid, ids, step_started in tokens:
            gen = gens.get(rid)
            if gen is not None:
                if gen.scheduled_at is None:
                    gen.scheduled_at = step_started
                gen._push(ids)
        for result in results:
            gen = gens.pop(result.request_id, None)
            if gen is not None:
                gen._finish(result)
        for rid, exc in failed:
            gen = gens.pop(rid, None)
            if gen is not None:
                gen._finish(None, exc)

    # ---- worker thread --------------------------------------------------------------------
    def _run(self) -> None:
        engine, loop = self.engine, self._loop
        assert loop is not None
        live: set[str] = set()
        pending: list[tuple[str, list[int], float]] = []
        step_started = 0.0

        def collector(rid: str):
            def on_tokens(ids: list[int]) -> None:
                pending.append((rid, list(ids), step_started))

            return on_tokens

        while not self._stopping.is_set():
            failed: list[tuple[str, BaseException]] = []
            self._take_commands(engine, live, collector, failed, block=not live)
            results: list[Result] = []
            if live and engine.has_work():
                step_started = time.perf_counter()
                try:
                    results = engine.step()
                except Exception as exc:  # one bad step fails the batch; the engine keeps serving
                    logger.exception("engine step failed; failing %d requests", len(live))
                    failed += [(rid, exc) for rid in live]
                    for rid in live:
                        engine.abort(rid)
                    live.clear()
                for result in results:
                    live.discard(result.request_id)
            elif not engine.has_work():
                live.clear()
            if pending or results or failed:
                tokens, pending[:] = list(pending), []
                loop.call_soon_threadsafe(self._deliver, tokens, results, failed)

    def _take_commands(
        self,
        engine: Any,
        live: set[str],
        collector: Any,
        failed: list[tuple[str, BaseException]],
        block: bool,
    ) -> None:
        """Apply every queued add/abort (waiting up to 0.5 s for the first one when idle)."""
        try:
            while True:
                kind, arg = self._commands.get(block=block, timeout=0.5 if block else None)
                block = False
                if kind == "add":
                    arg.on_tokens = collector(arg.request_id)
                    try:
                        engine.add_request(arg)
                    except Exception as exc:  # a request the engine refuses fails alone
                        failed.append((arg.request_id, exc))
                        continue
                    live.add(arg.request_id)
                elif kind == "abort" and arg in live:
                    engine.abort(arg)  # its Result ("abort") comes from the next step
        except queue.Empty:
            pass
