"""The one interface between the API layer and whatever produces completions.

A ``Backend`` takes an already validated OpenAI request and answers it, either as a finished JSON body
(:meth:`Backend.complete`) or as raw Server-Sent-Event bytes (:meth:`Backend.stream`). Three kinds
implement it: the embedded reference engine (``embedded.EmbeddedBackend``), one SGLang (or
``dflare engine-server``) base URL (``sglang_http.SGLangHTTPBackend``), and the routed pool of many of
those (``service.routing``), which is itself a backend, so the API layer never knows which it talks to.

Contract, in the order a request meets it:

* ``name`` is the ``backend`` label of every metric: the base URL, or ``"embedded"``. A pool reports
  the member that served the request in :attr:`BackendRequest.served_by` (``None`` means ``name``).
* ``await models()`` lists the served model ids. It is called on every request, so it must be cheap
  (cached); the API layer answers 404 ``model_not_found`` for a model not in the list.
* ``await complete(req)`` returns a :class:`Completion` whose body is the OpenAI response,
  ``usage.speculative`` included (``null`` when the engine does not speculate).
* ``await stream(req)`` returns only once the upstream accepted the request (status 200 seen), so
  every failure before the first byte raises and can be retried elsewhere. The :class:`Stream` then
  yields ``data: ...\\n\\n`` events as bytes, ready to relay, ``data: [DONE]`` last. The backend always
  collects the final usage (it asks upstream for it) and yields the usage chunk only when
  ``req.include_usage``; after the iteration ends ``stream.usage`` holds it. ``aclose()`` before the
  end aborts the request upstream (client disconnected).
* Errors are the exceptions of ``service.errors``: ``BackendUnavailable`` (``retryable``: connect
  error, upstream 408/429/5xx before the first byte), ``BackendTimeout``, ``UpstreamError`` (the
  upstream rejected the request: relayed with its status, never retried), ``RateLimited`` (a local
  queue is full), ``ContextLengthExceeded`` / ``InvalidRequest``. A failure after the first byte ends
  the stream with an OpenAI error event (:func:`service.errors.error_event`) and no exception.
* ``await health()`` probes once (``/health`` of the URL; the engine thread for the embedded engine).
* ``start()`` / ``close()`` are called once by the app's lifespan.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sglang_ext.stats import SpecStats


class Endpoint(StrEnum):
    """The OpenAI surface a request came in on; the value is the URL path both sides use."""

    CHAT = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"


@dataclass(slots=True)
class BackendRequest:
    """One OpenAI call as the API layer hands it to a backend.

    ``body`` is the validated request as a JSON-ready dict (unset optional fields left out, ``model``
    and ``stream`` included); backends may add their own upstream fields to a copy, never to it.
    ``affinity_key`` is a prompt prefix for cache-aware routing (empty when nothing routes on it).
    The backend that serves the request sets ``served_by`` (its ``name``; a pool: the member's) and
    may set ``route_reason``; both go into the access log, ``served_by`` also into the metrics'
    ``backend`` label and the ``x-dflare-backend`` header.
    """

    endpoint: Endpoint
    body: dict[str, Any]
    model: str
    request_id: str
    stream: bool = False
    include_usage: bool = False
    affinity_key: str = ""
    served_by: str | None = None
    route_reason: str | None = None


@dataclass(slots=True)
class Usage:
    """Token counts and speculative stats of one finished request, for metrics and headers."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    speculative: SpecStats | None = None

    @classmethod
    def from_openai(cls, usage: dict[str, Any] | None) -> Usage:
        """Read an OpenAI ``usage`` object, ``usage.speculative`` (``SpecStats.to_usage()``) included."""
        if not usage:
            return cls()
        spec = usage.get("speculative")
        stats = None
        if spec:
            from sglang_ext.stats import SpecStats

            stats = SpecStats.from_usage(spec)
        return cls(
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            speculative=stats,
        )


@dataclass(slots=True)
class Completion:
    """A finished non-streamed answer: the OpenAI response body and what the gateway reads from it."""

    body: dict[str, Any]
    usage: Usage = field(default_factory=Usage)


class Stream(abc.ABC):
    """Raw SSE bytes of one streamed answer, as they come; ``usage`` is set once the stream ended."""

    usage: Usage | None = None

    @abc.abstractmethod
    def __aiter__(self) -> AsyncIterator[bytes]: ...

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop early and abort the request upstream; harmless after the end."""


class Backend(abc.ABC):
    """Answers OpenAI requests; see the module docstring for the contract."""

    name: str

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open connections / load the engine (called once, from the app's lifespan)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release everything ``start`` opened; in-flight streams are aborted."""

    @abc.abstractmethod
    async def models(self) -> list[str]:
        """Served model ids (cached: called on every request)."""

    @abc.abstractmethod
    async def health(self) -> bool:
        """One active probe: can this backend take a request now?"""

    @abc.abstractmethod
    async def complete(self, req: BackendRequest) -> Completion:
        """Answer a non-streamed request."""

    @abc.abstractmethod
    async def stream(self, req: BackendRequest) -> Stream:
        """Open a streamed request; returns once the upstream accepted it."""
