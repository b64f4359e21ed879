"""A small Kubernetes API for discovery tests: Pods list + watch over real HTTP (aiohttp).

It implements what discovery relies on and what kmock leaves out: ``labelSelector`` (equality
terms), ``resourceVersion`` (watch replays events after it), ``timeoutSeconds`` (watch ends), and
410 Gone as a watch ``ERROR`` event once history has been compacted (``expire()``), exactly how
kube-apiserver reports "too old resource version".
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import orjson
from aiohttp import web


def make_pod(
    name: str,
    *,
    ip: str = "127.0.0.1",
    port: int | None = None,
    ready: bool = True,
    labels: dict[str, str] | None = None,
    namespace: str = "serving",
) -> dict[str, Any]:
    annotations = {"dflare.ai/port": str(port)} if port is not None else {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{name}",
            "labels": labels if labels is not None else {"app.kubernetes.io/component": "engine"},
            "annotations": annotations,
        },
        "spec": {"containers": [{"name": "engine", "image": "dflare/engine:test"}]},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def _matches(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        key, _, value = term.partition("=")
        if labels.get(key.strip()) != value.strip():
            return False
    return True


class FakeKubernetesAPI:
    def __init__(self, namespace: str = "serving") -> None:
        self.namespace = namespace
        self.pods: dict[str, dict[str, Any]] = {}
        self.version = 1
        self.compacted = 0  # watches from a version below this get 410 Gone
        self.expirations = 0  # open watches started before an expire() get 410 Gone too
        self.history: list[tuple[int, str, dict[str, Any]]] = []
        self.requests: list[dict[str, str]] = []  # query strings seen, for assertions
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._closing = False
        self.url = ""

    # --- control (test side) ---
    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self._pods)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        self._closing = True
        async with self._changed:
            self._changed.notify_all()
        if self._runner is not None:
            await self._runner.cleanup()

    def kubeconfig(self) -> str:
        return (
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n"
            f"clusters: [{{name: fake, cluster: {{server: '{self.url}'}}}}]\n"
            "users: [{name: fake, user: {token: test-token}}]\n"
            "contexts: [{name: fake, context: {cluster: fake, user: fake, namespace: serving}}]\n"
        )

    async def put(self, pod: dict[str, Any]) -> None:
        name = pod["metadata"]["name"]
        kind = "MODIFIED" if name in self.pods else "ADDED"
        await self._record(kind, pod)
        self.pods[name] = pod

    async def delete(self, name: str) -> None:
        pod = self.pods.pop(name)
        await self._record("DELETED", pod)

    def change_unseen(self, put: list[dict[str, Any]] = (), delete: list[str] = ()) -> None:  # type: ignore[assignment]
        """Change pods without watch events: only a re-list can see this (history lost to compaction)."""
        for pod in put:
            self.version += 1
            pod["metadata"]["resourceVersion"] = str(self.version)
            self.pods[pod["metadata"]["name"]] = pod
        for name in delete:
            self.pods.pop(name)
            self.version += 1

    async def expire(self) -> None:
        """Compact history: open watches get an in-stream 410 Gone ERROR event, as do resumes."""
        self.compacted = self.version
        self.expirations += 1
        async with self._changed:
            self._changed.notify_all()

    async def _record(self, kind: str, pod: dict[str, Any]) -> None:
        self.version += 1
        pod["metadata"]["resourceVersion"] = str(self.version)
        self.history.append((self.version, kind, copy.deepcopy(pod)))
        async with self._changed:
            self._changed.notify_all()

    # --- HTTP ---
    async def _pods(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(dict(request.query))
        if request.headers.get("Authorization") != "Bearer test-token":
            return web.json_response({"kind": "Status", "code": 401, "reason": "Unauthorized"}, status=401)
        if request.match_info["ns"] != self.namespace:
            return web.json_response(
                {
                    "kind": "PodList",
                    "apiVersion": "v1",
                    "items": [],
                    "metadata": {"resourceVersion": str(self.version)},
                }
            )
        selector = request.query.get("labelSelector", "")
        if request.query.get("watch") in ("true", "1", "True"):
            return await self._watch(request, selector)
        items = [p for p in self.pods.values() if _matches(p["metadata"]["labels"], selector)]
        return web.json_response(
            {
                "kind": "PodList",
                "apiVersion": "v1",
                "items": items,
                "metadata": {"resourceVersion": str(self.version)},
            }
        )

    async def _watch(self, request: web.Request, selector: str) -> web.StreamResponse:
        since = int(request.query.get("resourceVersion") or self.version)
        timeout = float(request.query.get("timeoutSeconds") or 300)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        generation = self.expirations
        while loop.time() < deadline and not self._closing:
            if since < self.compacted or generation != self.expirations:
                status = {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Failure",
                    "message": f"too old resource version: {since} ({self.compacted})",
                    "reason": "Expired",
                    "code": 410,
                }
                await response.write(orjson.dumps({"type": "ERROR", "object": status}) + b"\n")
                break
            for version, kind, pod in self.history:
                if version > since and _matches(pod["metadata"]["labels"], selector):
                    await response.write(orjson.dumps({"type": kind, "object": pod}) + b"\n")
                since = max(since, version)
            async with self._changed:
                try:
                    await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    break
        return response
