"""The routed backend: many single-URL backends behind the one ``Backend`` interface.

Per request: the policy picks among the routable members that serve the model; the request goes
out; a failure before the first byte reached the client (connect error, upstream 408/429/5xx, or a
stream that broke before its first event) is retried on another member after a jittered backoff,
up to ``retry_max_attempts`` tries in all. Streams are opened *and their first event read* before
``stream()`` returns, so a backend that dies between accepting a request and producing its first
token costs the client nothing but latency. Once the first event went out, a failure ends the stream
with an OpenAI error event (the single-URL backend does that) and is never retried.

Passive health: a connect error ejects the member at once (the process is gone); 5xx and broken
streams feed its circuit breaker. Upstream 4xx are the client's fault and count as successes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import aiohttp

from service.backends.base import Backend, BackendRequest, Completion, Stream, Usage
from service.errors import BackendTimeout, BackendUnavailable, GatewayError, error_event
from service.routing.health import CircuitBreaker, HealthState
from service.routing.policy import RouteDecision, RouteRequest, RoutingPolicy, make_policy
from service.routing.pool import BackendEndpoint, BackendPool
from service.routing.prober import HealthProber
from service.routing.retry import RetryPolicy

if TYPE_CHECKING:
    from service.metrics import GatewayMetrics
    from service.settings import Settings

logger = logging.getLogger(__name__)

ClientFactory = Callable[[str], Backend]
NEVER_CONNECTED = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
ERROR_EVENT_PREFIX = b'data: {"error"'


def _is_error_event(chunk: bytes) -> bool:
    return chunk.startswith(ERROR_EVENT_PREFIX)


class RoutedBackend(Backend):
    """A pool of backends with discovery, health, circuit breaking, a routing policy and retries."""

    name = "routed"

    def __init__(
        self,
        make_client: ClientFactory,
        discovery_factory: Callable[[BackendPool], Any],
        *,
        policy: RoutingPolicy | None = None,
        retry: RetryPolicy | None = None,
        health_interval_s: float = 5.0,
        health_timeout_s: float = 5.0,
        fail_threshold: int = 3,
        success_threshold: int = 1,
        breaker_failures: int = 5,
        breaker_cooldown_s: float = 5.0,
        metrics: GatewayMetrics | None = None,
        shutdown_grace_s: float | None = None,
    ) -> None:
        self._make_client = make_client
        self._shutdown_grace_s = shutdown_grace_s
        self._undo_drain: Callable[[], None] = lambda: None
        self._active: set[_RoutedStream] = set()
        self.policy = policy or make_policy("least_outstanding")
        self.retry = retry or RetryPolicy()
        self._metrics = metrics
        self._fail_threshold = fail_threshold
        self._success_threshold = success_threshold
        self._breaker_failures = breaker_failures
        self._breaker_cooldown_s = breaker_cooldown_s
        self.pool = BackendPool(self._new_endpoint)
        self.pool.subscribe(self._on_membership)
        self.prober = HealthProber(
            self.pool, health_interval_s, health_timeout_s, self._on_health_change, self._publish_counts
        )
        self.discovery = discovery_factory(self.pool)
        self._closing: set[asyncio.Task[None]] = set()
        self._started = False

    @classmethod
    def from_settings(
        cls, settings: Settings, make_client: ClientFactory, metrics: GatewayMetrics | None = None
    ) -> RoutedBackend:
        from service.routing.discovery import KubernetesDiscovery, StaticDiscovery

        def discovery(pool: BackendPool) -> Any:
            if settings.discovery_enabled:
                return KubernetesDiscovery(
                    pool,
                    settings.discovery_namespace,
                    settings.discovery_label_selector,
                    settings.discovery_port_annotation,
                    settings.discovery_port,
                    kubeconfig=settings.discovery_kubeconfig,
                )
            return StaticDiscovery(pool, settings.backends)

        return cls(
            make_client,
            discovery,
            policy=make_policy(settings.routing_policy),
            retry=RetryPolicy(
                settings.retry_max_attempts, settings.retry_backoff_base_s, settings.retry_backoff_max_s
            ),
            health_interval_s=settings.health_interval_s,
            health_timeout_s=min(settings.connect_timeout_s, settings.health_interval_s * 2),
            fail_threshold=settings.health_fail_threshold,
            success_threshold=settings.health_success_threshold,
            breaker_failures=settings.breaker_failure_threshold,
            breaker_cooldown_s=settings.breaker_cooldown_s,
            metrics=metrics,
            shutdown_grace_s=settings.shutdown_grace_s,
        )

    # --- lifecycle ---
    async def start(self) -> None:
        """Never fails for lack of backends: members join as their health checks pass."""
        self._started = True
        if self._shutdown_grace_s is not None:
            from service.shutdown import drain_before_deadline

            self._undo_drain = drain_before_deadline(self._shutdown_grace_s, self.drain)
        await self.prober.start()
        await self.discovery.start()

    async def drain(self) -> None:
        """End every running stream now with an error event (shutdown deadline close)."""
        if self._active:
            logger.warning("shutdown deadline near: ending %d running streams", len(self._active))
        await asyncio.gather(*(s.interrupt() for s in list(self._active)), return_exceptions=True)

    async def close(self) -> None:
        self._undo_drain()
        await self.discovery.stop()
        await self.prober.stop()
        for endpoint in self.pool.members():
            await endpoint.client.close()
        for task in list(self._closing):
            await task

    # --- Backend interface ---
    async def models(self) -> list[str]:
        models = self.pool.models()
        if not models:
            raise self._no_backend(None)
        return sorted(models)

    async def health(self) -> bool:
        return any(e.routable for e in self.pool.members())

    async def complete(self, req: BackendRequest) -> Completion:
        tried: list[BackendEndpoint] = []
        while True:
            decision = self._pick(req, tried)
            endpoint = decision.endpoint
            tried.append(endpoint)
            self._dispatch(endpoint, decision, req, len(tried))
            try:
                result = await endpoint.client.complete(req)
            except BaseException as exc:
                if not await self._after_failure(endpoint, exc, len(tried)):
                    raise
                continue
            self._release(endpoint, ok=True)
            return result

    async def stream(self, req: BackendRequest) -> Stream:
        tried: list[BackendEndpoint] = []
        while True:
            decision = self._pick(req, tried)
            endpoint = decision.endpoint
            tried.append(endpoint)
            self._dispatch(endpoint, decision, req, len(tried))
            inner: Stream | None = None
            try:
                inner = await endpoint.client.stream(req)
                events = aiter(inner)
                first = await anext(events, None)  # a member failing before its first event raises
                if first is None:
                    logger.warning("backend %s ended a stream before any event", endpoint.url)
                    raise BackendUnavailable("The model server ended the stream before any event.")
            except BaseException as exc:
                if inner is not None and not isinstance(exc, BackendUnavailable):
                    await inner.aclose()
                if not await self._after_failure(endpoint, exc, len(tried)):
                    raise
                continue
            routed = _RoutedStream(self, endpoint, inner, events, first)
            self._active.add(routed)
            return routed

    # --- internals ---
    def _pick(self, req: BackendRequest, tried: list[BackendEndpoint]) -> RouteDecision:
        candidates = self.pool.candidates(req.model, exclude=tried)
        if not candidates and tried:  # everyone else is gone: a retry may hit the same member again
            candidates = self.pool.candidates(req.model)
        if not candidates:
            raise self._no_backend(req.model)
        return self.policy.choose(candidates, RouteRequest(req.model, req.affinity_key or None))

    def _no_backend(self, model: str | None) -> BackendUnavailable:
        members = self.pool.members()
        healthy = [e for e in members if e.routable]
        if healthy and model is not None:
            return BackendUnavailable(f"No healthy backend serves model {model!r}.", retryable=False)
        pending = sum(1 for e in members if not e.health.healthy)
        return BackendUnavailable(
            f"No healthy backend ({len(members)} known, {pending} not passing health checks).",
            retryable=False,
        )

    def _dispatch(
        self, endpoint: BackendEndpoint, decision: RouteDecision, req: BackendRequest, attempt: int
    ) -> None:
        endpoint.outstanding += 1
        endpoint.breaker.on_dispatch()
        req.served_by = endpoint.url  # access log, metrics label, x-dflare-backend header
        req.route_reason = decision.reason if attempt == 1 else f"{decision.reason},retry={attempt - 1}"
        logger.debug("route %s -> %s (%s)", req.request_id, endpoint.url, req.route_reason)

    def _release(self, endpoint: BackendEndpoint, ok: bool | None) -> None:
        """``ok``: True success, False backend failure, None no verdict (client left)."""
        endpoint.outstanding -= 1
        if ok is True:
            endpoint.breaker.on_success()
        elif ok is False:
            endpoint.breaker.on_failure()
            self._publish_counts()  # the breaker may have just opened
        else:
            endpoint.breaker.on_abandon()
        if endpoint.outstanding == 0 and endpoint not in self.pool:
            self._close_later(endpoint)

    async def _after_failure(self, endpoint: BackendEndpoint, exc: BaseException, attempt: int) -> bool:
        """Book the failure; sleep the backoff and return True when the request should be retried."""
        if isinstance(exc, BackendUnavailable):
            # 429: alive but busy, not broken; anything else counts against the member's breaker.
            self._release(endpoint, ok=None if exc.upstream_status == 429 else False)
            if isinstance(exc.__cause__, NEVER_CONNECTED):
                # Refused or unanswered connect: the process is gone, don't wait for the prober. (A
                # pooled connection dropped by the server is only a breaker failure: keep-alive races.)
                endpoint.health.mark_down()
                self._publish(endpoint)
        elif isinstance(exc, BackendTimeout):
            self._release(endpoint, ok=False)
            return False
        elif isinstance(exc, GatewayError):  # upstream said 4xx: the backend is fine
            self._release(endpoint, ok=True)
            return False
        else:  # cancelled (client left) or a bug: no verdict on the backend
            self._release(endpoint, ok=None)
            return False
        if not exc.retryable or not self.retry.should_retry(attempt):
            return False
        if self._metrics is not None:
            self._metrics.retries.labels(endpoint.url).inc()
        logger.warning("retrying after %s: %s", endpoint.url, exc.message)
        await asyncio.sleep(self.retry.delay(attempt))
        return True

    def _new_endpoint(self, key: str, url: str) -> BackendEndpoint:
        return BackendEndpoint(
            key,
            url,
            HealthState(self._fail_threshold, self._success_threshold),
            CircuitBreaker(self._breaker_failures, self._breaker_cooldown_s),
            client=self._make_client(url),
        )

    def _on_membership(self, event: str, endpoint: BackendEndpoint) -> None:
        info = (endpoint.url, *self.discovery.identity(endpoint.key, endpoint.url))
        if event == "added":
            if self._started:
                self.prober.probe_soon(endpoint)
            if self._metrics is not None:
                self._metrics.backend_info.labels(*info).set(1)
        else:
            if endpoint.outstanding == 0:
                self._close_later(endpoint)
            if self._metrics is not None:
                with contextlib.suppress(KeyError):  # never published
                    self._metrics.backend_up.remove(endpoint.url)
                self._metrics.backend_info.remove(*info)
        self._publish(endpoint)

    def _on_health_change(self, endpoint: BackendEndpoint) -> None:
        self._publish(endpoint)

    def _publish(self, endpoint: BackendEndpoint) -> None:
        if self._metrics is not None and endpoint in self.pool:
            self._metrics.backend_up.labels(endpoint.url).set(1 if endpoint.health.healthy else 0)
        self._publish_counts()

    def _publish_counts(self) -> None:
        """``dflare_backends_known`` / ``_routable``: on every membership, health or breaker change."""
        if self._metrics is not None:
            members = self.pool.members()
            self._metrics.set_backend_counts(len(members), sum(1 for e in members if e.routable))

    def _close_later(self, endpoint: BackendEndpoint) -> None:
        try:
            task = asyncio.get_running_loop().create_task(endpoint.client.close())
        except RuntimeError:
            return
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


class _RoutedStream(Stream):
    """Relays a member's stream; books the outcome on the member once, however the stream ends."""

    def __init__(
        self,
        owner: RoutedBackend,
        endpoint: BackendEndpoint,
        inner: Stream,
        events: AsyncIterator[bytes],
        first: bytes,
    ) -> None:
        self._owner = owner
        self._endpoint = endpoint
        self._inner = inner
        self._events = events
        self._first = first
        self._released = False
        self._interrupted = False
        self._gen: AsyncIterator[bytes] | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        if self._gen is None:
            self._gen = self._relay()
        return self._gen

    async def _relay(self) -> AsyncIterator[bytes]:
        verdict: bool | None = None
        try:
            failed = _is_error_event(self._first)
            yield self._first
            async for chunk in self._events:
                if _is_error_event(chunk):
                    if self._interrupted:  # the member's "stream broke" event: say what happened
                        chunk = error_event(BackendUnavailable("The gateway is shutting down; retry."))
                    failed = True
                yield chunk
            verdict = None if self._interrupted else not failed
        finally:
            self._finish(verdict)

    @property  # type: ignore[override]
    def usage(self) -> Usage | None:
        """The member's usage (set once its stream ended)."""
        return self._inner.usage

    async def interrupt(self) -> None:
        """Stop the member's stream; the relay then ends with an error event and ``[DONE]``."""
        self._interrupted = True
        await self._inner.aclose()

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            if self._gen is not None:
                await self._gen.aclose()  # type: ignore[attr-defined]
            self._finish(None)

    def _finish(self, verdict: bool | None) -> None:
        self._owner._active.discard(self)
        if not self._released:
            self._released = True
            self._owner._release(self._endpoint, verdict)
