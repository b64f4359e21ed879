"""Active health probing: admits backends once they pass, ejects them once they keep failing.

Every ``interval_s`` each member gets one ``health()`` probe (its ``/health``), all members
concurrently and each bounded by ``timeout_s``, so one hung replica cannot stall the others. A new
member is probed at once instead of waiting for the next round. When a member turns healthy its
served models are (re)read, since a pod may come back serving something else after a rollout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from service.routing.health import HealthStatus
from service.routing.pool import BackendEndpoint, BackendPool

logger = logging.getLogger(__name__)

StatusListener = Callable[[BackendEndpoint], None]


class HealthProber:
    def __init__(
        self,
        pool: BackendPool,
        interval_s: float,
        timeout_s: float,
        on_change: StatusListener | None = None,
        on_round: Callable[[], None] | None = None,
    ) -> None:
        self._pool = pool
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._on_change = on_change
        self._on_round = on_round  # after every probe round: breaker cool-downs end between probes
        self._task: asyncio.Task[None] | None = None
        self._probes: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="health-prober")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._probes) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe(e) for e in self._pool.members()))

    async def probe(self, endpoint: BackendEndpoint) -> None:
        ok = await self._check(endpoint)
        if ok and endpoint.health.status is not HealthStatus.HEALTHY:
            ok = await self._read_models(endpoint)
        if endpoint not in self._pool:  # removed while we probed
            return
        if endpoint.health.record(ok):
            if endpoint.health.healthy:
                endpoint.breaker.reset()
                logger.info("backend %s admitted (models: %s)", endpoint.key, sorted(endpoint.models))
            else:
                logger.warning("backend %s ejected after failed probes", endpoint.key)
            if self._on_change is not None:
                self._on_change(endpoint)

    async def _check(self, endpoint: BackendEndpoint) -> bool:
        try:
            async with asyncio.timeout(self.timeout_s):
                return bool(await endpoint.client.health())
        except Exception as exc:  # any failure to answer is a failed probe
            logger.debug("probe of %s failed: %r", endpoint.key, exc)
            return False

    async def _read_models(self, endpoint: BackendEndpoint) -> bool:
        try:
            async with asyncio.timeout(self.timeout_s):
                models = await endpoint.client.models()
        except Exception as exc:
            logger.info("backend %s is up but /v1/models failed: %r", endpoint.key, exc)
            return False
        endpoint.models = frozenset(models)
        return bool(models)

    async def _loop(self) -> None:
        """A round at once, then one every ``interval_s``: the members a worker starts with are routable
        as soon as they answer, not an interval later (with several workers behind one port, a worker
        still waiting for its first round answered 503 while its neighbour already said ready)."""
        while True:
            await self.probe_all()
            if self._on_round is not None:
                self._on_round()
            await asyncio.sleep(self.interval_s)

    def probe_soon(self, endpoint: BackendEndpoint) -> None:
        """Probe a new member now instead of at the next round (it may be ready already)."""
        task = asyncio.get_running_loop().create_task(self.probe(endpoint))
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)
