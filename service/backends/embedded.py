"""The reference engine inside the gateway process: the default, serving the demo pair.

The engine (and torch) is imported only in :meth:`EmbeddedBackend.start`, so ``service`` imports
without torch. One engine per process: it runs in a worker thread (``EngineRunner``), concurrent
requests are batched by the engine's own ``add_request`` / ``step`` loop, and its queue is bounded
(past it: 429). Responses are produced by the same code as ``dflare engine-server`` (``serving.py``),
so both paths answer with the same bytes, ``n`` > 1 included (``n`` engine requests per call, all
aborted together when the client leaves or the request times out).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from service.backends.base import Backend, BackendRequest, Completion, Stream, Usage
from service.errors import (
    BackendTimeout,
    BackendUnavailable,
    ContextLengthExceeded,
    InternalError,
    InvalidRequest,
    RateLimited,
    error_event,
)
from sglang_ext.engine_server.runner import EngineFailed, QueueFull

if TYPE_CHECKING:
    from service.settings import Settings
    from sglang_ext.engine_server.serving import OpenAIServing, Submission

logger = logging.getLogger(__name__)


class _EngineStream(Stream):
    def __init__(
        self, serving: OpenAIServing, sub: Submission, include_usage: bool, timeout_s: float
    ) -> None:
        self._sub = sub
        self._deadline = time.monotonic() + timeout_s
        self._events = serving.stream(sub, include_usage=include_usage)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async with asyncio.timeout(max(self._deadline - time.monotonic(), 0.0)):
                async for event in self._events:
                    yield event
        except TimeoutError:
            yield error_event(BackendTimeout("The engine did not finish the request in time."))
            yield b"data: [DONE]\n\n"
        except EngineFailed as exc:
            yield error_event(InternalError(f"The engine failed: {exc}"))
            yield b"data: [DONE]\n\n"
        finally:
            await self.aclose()
            sub = self._sub
            self.usage = Usage(sub.prompt_tokens, sub.completion_tokens, sub.stats)

    async def aclose(self) -> None:
        await self._events.aclose()  # aborts every choice still running in the engine


class EmbeddedBackend(Backend):
    """The reference engine in this process (``Settings.embedded_*``)."""

    name = "embedded"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._serving: OpenAIServing | None = None

    @property
    def serving(self) -> OpenAIServing:
        if self._serving is None:
            raise BackendUnavailable("The embedded engine is not loaded yet.")
        return self._serving

    def _paths(self) -> tuple[Path, Path | None]:
        s = self._settings
        if s.embedded_target_dir is not None:
            target = Path(s.embedded_target_dir)
        else:
            from sglang_ext.demo import target_path

            target = Path(target_path())
        if s.embedded_drafter == "none":
            return target, None
        if s.embedded_drafter_dir is not None:
            return target, Path(s.embedded_drafter_dir)
        from sglang_ext.demo import drafter_path

        return target, Path(drafter_path(s.embedded_drafter))

    async def start(self) -> None:
        from sglang_ext.engine_server.loader import load_serving

        s = self._settings
        target, drafter = self._paths()
        logger.info("loading the embedded engine: target %s, drafter %s", target, drafter)
        self._serving = await asyncio.to_thread(
            load_serving,
            target,
            drafter,
            model_name=s.embedded_model,
            block_size=s.embedded_block_size,
            min_draft_confidence=s.embedded_min_draft_confidence,
            verify_policy=s.embedded_verify_policy,
            max_batch=s.embedded_max_batch,
            max_waiting=s.embedded_queue_size,
            threads=s.embedded_threads,
        )
        self._serving.runner.start()

    async def close(self) -> None:
        if self._serving is not None:
            await self._serving.runner.stop()

    async def models(self) -> list[str]:
        return [self._settings.embedded_model]

    async def health(self) -> bool:
        return self._serving is not None and self._serving.runner.alive

    def _submit(self, req: BackendRequest) -> Submission:
        from sglang_ext.engine_server.serving import RequestRejected

        serving = self.serving
        req.served_by = self.name
        try:
            return serving.submit(serving.prepare(req.endpoint.value, req.body, req.request_id))
        except RequestRejected as exc:
            cls = ContextLengthExceeded if exc.code == ContextLengthExceeded.code else InvalidRequest
            raise cls(exc.message, param=exc.param) from exc
        except QueueFull as exc:
            raise RateLimited(f"The embedded engine is busy: {exc}.") from exc

    async def complete(self, req: BackendRequest) -> Completion:
        sub = self._submit(req)
        try:
            async with asyncio.timeout(self._settings.request_timeout_s):
                body = await self.serving.complete(sub)  # aborts what still runs when interrupted
        except TimeoutError as exc:
            raise BackendTimeout("The engine did not finish the request in time.") from exc
        except EngineFailed as exc:
            raise InternalError(f"The engine failed: {exc}") from exc
        return Completion(body, Usage(sub.prompt_tokens, sub.completion_tokens, sub.stats))

    async def stream(self, req: BackendRequest) -> Stream:
        sub = self._submit(req)
        return _EngineStream(self.serving, sub, req.include_usage, self._settings.request_timeout_s)
