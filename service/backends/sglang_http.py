"""One SGLang (or ``dflare engine-server``) base URL, spoken to through its OpenAI endpoints.

Hot path, measured to matter (issue 6, issue 9): the completion POSTs of ``http://`` backends go
through the lean pooled HTTP/1.1 client of :mod:`service.backends.h1client` (a third of aiohttp's
CPU cost per request); health checks, model lists and ``https`` backends use one pooled ``aiohttp``
session shared by all backends of the process; ``orjson``; and streams relayed as the raw bytes that
arrive. A stream is cut into SSE events only to find the one usage chunk (``"choices":[]`` with a
``usage`` object): the gateway always asks upstream for it, reads it, and passes it on only if the
client asked. Non-streamed chat asks for SGLang's ``return_meta_info`` and turns
``choices[].meta_info`` into ``usage.speculative`` when the engine did not already put it there
(stock SGLang, without our plugin), then strips it. ``n`` > 1 needs nothing else: SGLang's chunks
carry each choice's ``index`` and are relayed as they are, its usage already sums the choices.
Closing a stream early closes the upstream connection, which SGLang takes as an abort.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
from yarl import URL

from service.backends.base import Backend, BackendRequest, Completion, Endpoint, Stream, Usage
from service.backends.h1client import H1Pool, H1Response
from service.errors import (
    BackendTimeout,
    BackendUnavailable,
    GatewayError,
    InternalError,
    InvalidRequest,
    UpstreamError,
    error_event,
)
from sglang_ext.stats import SpecStats

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
DONE = b"data: [DONE]"
MODELS_TTL_S = 30.0


def _url(url: str) -> URL | str:
    """Parsed once, not by aiohttp on every request; a URL yarl refuses stays a string, so aiohttp
    refuses it per request as before (a ``ClientError``: backend unavailable)."""
    try:
        return URL(url)
    except ValueError:
        return url


def new_session(connect_timeout_s: float, limit: int = 0) -> aiohttp.ClientSession:
    """The one pooled client session of a gateway process (``limit=0``: no connection cap)."""
    connector = aiohttp.TCPConnector(limit=limit, ttl_dns_cache=300, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s)
    return aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False, skip_auto_headers=("User-Agent",)
    )


class ReadStats(SpecStats):
    """:class:`SpecStats` as read from one answer: never recorded into, so each derived quantity is
    computed once (the answer's ``usage.speculative``, the ``x-dflare-*`` headers, the metrics and
    the access line each read them; recomputing cost about 5% of a completion's CPU). The formulas
    are SpecStats' own."""

    verify_steps = functools.cached_property(SpecStats.verify_steps.fget)  # type: ignore[assignment]
    draft_tokens = functools.cached_property(SpecStats.draft_tokens.fget)  # type: ignore[assignment]
    accepted_tokens = functools.cached_property(SpecStats.accepted_tokens.fget)  # type: ignore[assignment]
    acceptance_length = functools.cached_property(SpecStats.acceptance_length.fget)  # type: ignore[assignment]

    def record_step(self, accepted: int, verified: int | None = None) -> None:
        raise TypeError("stats read from an answer are read-only (their totals are cached)")

    def record_plain_step(self) -> None:
        raise TypeError("stats read from an answer are read-only")

    def __eq__(self, other: object) -> bool:  # equal to a SpecStats of the same counts, both ways
        if not isinstance(other, SpecStats):
            return NotImplemented
        mine = (self.block_size, self.histogram, self.verified_drafts, self.plain_steps)
        return mine == (other.block_size, other.histogram, other.verified_drafts, other.plain_steps)

    __hash__ = None  # type: ignore[assignment]  # mutable, as SpecStats


def stats_from_body(body: dict[str, Any]) -> SpecStats | None:
    """``usage.speculative`` if sent, else from SGLang's ``choices[].meta_info`` (which is stripped),
    merged over the choices (``n`` > 1) as our plugin sums them."""
    stats = None
    metas = [c.pop("meta_info", None) for c in body.get("choices") or () if isinstance(c, dict)]
    usage = body.get("usage")
    if isinstance(usage, dict):
        if usage.get("speculative"):
            stats = ReadStats.from_usage(usage["speculative"])
        elif len(metas) == 1:  # the common case, kept lean (hot path)
            stats = ReadStats.from_sglang_meta_info(metas[0]) if metas[0] else None
        elif metas:
            stats = _merged_meta(metas)
        usage["speculative"] = stats.to_usage() if stats is not None else None
    return stats


def _merged_meta(metas: list[dict[str, Any] | None]) -> ReadStats | None:
    """The choices' stats summed (``n`` > 1), read-only again (``merge`` builds a plain SpecStats)."""
    found = [s for s in (ReadStats.from_sglang_meta_info(m) for m in metas if m) if s is not None]
    if len(found) <= 1:
        return found[0] if found else None
    merged = functools.reduce(SpecStats.merge, found)
    return ReadStats(merged.block_size, merged.histogram, merged.verified_drafts, merged.plain_steps)


def _printable(raw: bytes, limit: int = 500) -> str:
    """An upstream body for the log: text, cut to ``limit`` characters."""
    return raw[:limit].decode("utf-8", "replace")


class _RelayStream(Stream):
    """Relays upstream SSE bytes; lifts out the usage chunk; ends with an error event on failure."""

    def __init__(
        self,
        resp: aiohttp.ClientResponse | H1Response,
        req: BackendRequest,
        backend: str,
        first_timeout: float,
        idle_timeout: float,
        deadline: float,
    ) -> None:
        self._resp = resp
        self._include_usage = req.include_usage
        self._backend = backend
        self._first_timeout = first_timeout
        self._idle_timeout = idle_timeout
        self._deadline = deadline
        self._closed = False

    def _take_usage(self, event: bytes) -> bytes | None:
        """Read a usage chunk; return what to forward in its place (``None``: drop it)."""
        try:
            data = orjson.loads(event[5:])
        except orjson.JSONDecodeError:
            return event
        if not isinstance(data, dict) or data.get("choices") or not isinstance(data.get("usage"), dict):
            return event
        usage = data["usage"]
        self.usage = Usage.from_openai(usage)
        if not self._include_usage:
            return None
        if "speculative" not in usage:
            usage["speculative"] = None
            return b"data: " + orjson.dumps(data)
        return event

    async def __aiter__(self) -> AsyncIterator[bytes]:
        """Relay; a failure before anything was relayed raises (retryable), after it ends the stream."""
        content = self._resp.content
        tail = b""
        timeout = self._first_timeout
        done = sent = False
        failure: GatewayError | None = None
        try:
            while True:
                wait = min(timeout, self._deadline - time.monotonic())
                try:
                    async with asyncio.timeout(max(wait, 0.0)):
                        chunk = await content.readany()
                except TimeoutError:
                    what = "next" if sent else "first"
                    failure = BackendTimeout(f"Timed out waiting for the {what} token from the model server.")
                    break
                if not chunk:
                    break
                timeout = self._idle_timeout
                if b'"usage":{' not in chunk and b'"usage": {' not in chunk and not tail:
                    # fast path: no usage chunk here; forward whole events, keep a partial one back
                    cut = chunk.rfind(b"\n\n") + 2
                    if cut == len(chunk):
                        done = done or chunk.endswith(DONE + b"\n\n")
                        sent = True
                        yield chunk
                        continue
                    if cut > 1:
                        sent = True
                        yield chunk[:cut]
                    tail = chunk[cut:] if cut > 1 else chunk
                    continue
                events = (tail + chunk).split(b"\n\n")
                tail = events.pop()
                out = []
                for event in events:
                    if event.startswith(b"data: {") and (b'"usage":{' in event or b'"usage": {' in event):
                        replaced = self._take_usage(event)
                        if replaced is not None:
                            out.append(replaced)
                    else:
                        done = done or event == DONE
                        out.append(event)
                if out:
                    sent = True
                    yield b"\n\n".join(out) + b"\n\n"
        except aiohttp.ClientError as exc:
            logger.warning("stream from %s broke: %r", self._backend, exc)
            failure = BackendUnavailable("The stream from the model server broke.", retryable=not sent)
        finally:
            self._closed = True
            if done:
                self._resp.release()  # connection back to the pool
            else:
                self._resp.close()  # upstream sees the disconnect and aborts
        if done:
            return
        failure = failure or BackendUnavailable(
            "The model server closed the stream early.", retryable=not sent
        )
        if not sent:
            raise failure  # nothing reached the client: a pool may retry, else the client gets the status
        logger.warning("stream %s failed after it started: %s", self._backend, failure.message)
        yield error_event(failure)
        yield DONE + b"\n\n"

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._resp.close()


class SGLangHTTPBackend(Backend):
    """Backend for one base URL; ``session`` is shared (owned by the app, not by this object)."""

    def __init__(
        self,
        base_url: str,
        session: aiohttp.ClientSession | None,
        *,
        connect_timeout_s: float = 5.0,
        first_token_timeout_s: float = 120.0,
        idle_stream_timeout_s: float = 60.0,
        request_timeout_s: float = 600.0,
        health_timeout_s: float = 5.0,
        api_key: str | None = None,
    ) -> None:
        self.name = base_url.rstrip("/")
        api_key = (api_key or "").strip()  # a key file's or Secret's trailing newline is not part of it
        if not api_key.isprintable():
            raise ValueError("the backend API key must be printable (it travels in an HTTP header)")
        # SGLang's --api-key guards everything but /health* and /metrics; sent on every call anyway.
        self._auth = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._h1_auth = f"Authorization: Bearer {api_key}\r\n".encode("latin-1") if api_key else b""
        self._session = session
        self._owns_session = session is None
        self._connect_timeout = connect_timeout_s
        self._first_timeout = first_token_timeout_s
        self._idle_timeout = idle_stream_timeout_s
        self._request_timeout = request_timeout_s
        self._health_timeout = health_timeout_s
        self._urls = {e: _url(self.name + e.value) for e in Endpoint}
        # the hot POSTs of plain-http backends go through the lean client (h1client), the rest aiohttp
        self._h1: H1Pool | None = None
        self._targets: dict[Endpoint, bytes] = {}
        first = self._urls[Endpoint.CHAT]
        if isinstance(first, URL) and first.scheme == "http" and first.raw_host and first.port:
            self._h1 = H1Pool(first.raw_host, first.port, connect_timeout_s)
            urls = self._urls.items()
            self._targets = {e: u.raw_path_qs.encode("ascii") for e, u in urls if isinstance(u, URL)}
        self._models: list[str] = []
        self._models_at = 0.0

    @classmethod
    def from_settings(
        cls, base_url: str, session: aiohttp.ClientSession | None, settings: Any
    ) -> SGLangHTTPBackend:
        return cls(
            base_url,
            session,
            connect_timeout_s=settings.connect_timeout_s,
            first_token_timeout_s=settings.first_token_timeout_s,
            idle_stream_timeout_s=settings.idle_stream_timeout_s,
            request_timeout_s=settings.request_timeout_s,
            api_key=settings.backend_api_key.get_secret_value() if settings.backend_api_key else None,
        )

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = new_session(self._connect_timeout)
        return self._session

    async def close(self) -> None:
        if self._h1 is not None:
            await self._h1.close()
        if self._owns_session and self._session is not None:
            await self._session.close()

    # ---- discovery of what it serves ------------------------------------------------------
    async def models(self) -> list[str]:
        if not self._models or time.monotonic() - self._models_at > MODELS_TTL_S:
            try:
                await self._fetch_models()
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                if not self._models:
                    logger.warning("backend %s: model list unavailable: %r", self.name, exc)
                    raise BackendUnavailable("The model server is unreachable.") from exc
        return self._models

    async def _fetch_models(self) -> None:
        async with asyncio.timeout(self._health_timeout):
            async with self.session.get(self.name + "/v1/models", headers=self._auth) as resp:
                resp.raise_for_status()
                data = orjson.loads(await resp.read())
        self._models = [m["id"] for m in data.get("data", ())]
        self._models_at = time.monotonic()

    async def health(self) -> bool:
        try:
            async with asyncio.timeout(self._health_timeout):
                async with self.session.get(self.name + "/health", headers=self._auth) as resp:
                    await resp.read()
                    if resp.status != 200:
                        return False
            await self._fetch_models()
            return True
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return False

    # ---- requests -------------------------------------------------------------------------
    def _headers(self, req: BackendRequest) -> dict[str, str]:
        return {"content-type": "application/json", "x-request-id": req.request_id, **self._auth}

    async def _send(self, req: BackendRequest, data: bytes) -> aiohttp.ClientResponse | H1Response:
        rid = req.request_id
        if self._h1 is not None and rid.isprintable() and rid.isascii():
            headers = b"Content-Type: application/json\r\nx-request-id: %s\r\n" % rid.encode("ascii")
            return await self._h1.post(self._targets[req.endpoint], headers + self._h1_auth, data)
        return await self.session.post(self._urls[req.endpoint], data=data, headers=self._headers(req))

    async def _post(
        self, req: BackendRequest, payload: dict[str, Any], timeout: float
    ) -> aiohttp.ClientResponse | H1Response:
        """POST and wait for the status line; maps every failure before the first byte."""
        try:
            data = orjson.dumps(payload)
        except TypeError as exc:  # e.g. an unknown extra field holding an integer beyond 64 bits
            raise InvalidRequest(f"The request cannot be encoded as JSON: {exc}") from exc
        try:
            async with asyncio.timeout(timeout):
                resp = await self._send(req, data)
        except aiohttp.ConnectionTimeoutError as exc:  # never connected (a dead pod's IP): retryable
            logger.warning("backend %s did not accept a connection: %r", self.name, exc)
            raise BackendUnavailable("The model server did not accept a connection.") from exc
        except TimeoutError as exc:
            logger.warning("backend %s did not answer within %g s", self.name, timeout)
            raise BackendTimeout(f"The model server did not answer within {timeout:g} s.") from exc
        except aiohttp.ClientError as exc:
            logger.warning("backend %s is unreachable: %r", self.name, exc)
            raise BackendUnavailable("The model server is unreachable.") from exc
        if resp.status != 200:
            raw = await resp.read()
            resp.release()
            if resp.status in RETRYABLE_STATUS:
                # the client gets the status in plain words; the backend's URL and body go to the log
                logger.warning("backend %s answered %d: %s", self.name, resp.status, _printable(raw))
                raise BackendUnavailable(
                    f"The model server failed with status {resp.status}.", upstream_status=resp.status
                )
            raise UpstreamError.from_response(resp.status, raw)
        return resp

    async def complete(self, req: BackendRequest) -> Completion:
        req.served_by = self.name
        payload = dict(req.body)
        payload["stream"] = False
        if req.endpoint is Endpoint.CHAT:
            payload["return_meta_info"] = True
        deadline = time.monotonic() + self._request_timeout
        resp = await self._post(req, payload, self._request_timeout)
        try:
            if isinstance(resp, H1Response) and resp.complete:
                raw = await resp.read()  # all arrived with the head (the usual case): nothing to time
            else:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                    raw = await resp.read()
        except TimeoutError as exc:
            resp.close()
            logger.warning("backend %s did not finish within %g s", self.name, self._request_timeout)
            raise BackendTimeout(
                f"The model server did not finish within {self._request_timeout:g} s."
            ) from exc
        except aiohttp.ClientError as exc:
            logger.warning("backend %s broke the response: %r", self.name, exc)
            raise BackendUnavailable("The model server broke off its response.") from exc
        except asyncio.CancelledError:  # the client left: closing the connection aborts upstream
            resp.close()
            raise
        try:
            body = orjson.loads(raw)
            stats = stats_from_body(body)
        except (orjson.JSONDecodeError, ValueError, KeyError, TypeError) as exc:
            logger.warning("backend %s sent an unreadable response (%r): %s", self.name, exc, _printable(raw))
            raise InternalError("The model server sent an unreadable response.") from exc
        usage = body.get("usage") or {}
        return Completion(
            body, Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0), stats)
        )

    async def stream(self, req: BackendRequest) -> Stream:
        req.served_by = self.name
        payload = dict(req.body)
        payload["stream"] = True
        payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
        deadline = time.monotonic() + self._request_timeout
        resp = await self._post(req, payload, self._first_timeout)
        return _RelayStream(resp, req, self.name, self._first_timeout, self._idle_timeout, deadline)
