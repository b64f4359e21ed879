"""Which backends exist: a static URL list, or the Ready pods of a label selector in Kubernetes.

Kubernetes discovery follows the list-then-watch pattern of every controller: list the pods (and the
list's ``resourceVersion``), make the pool exactly that set, then watch from that version. Watches
end (server timeout) and resume from the last seen version; when the version has expired (410 Gone)
or the API fails, the loop re-lists, so no add or delete is ever missed for long. Only Ready pods
with an IP that are not terminating belong to the pool: NotReady or deleted pods leave it on the
event that says so. The official client is synchronous, so the loop runs on a daemon thread and
hands every pool change to the event loop in order.

Both kinds also say which pod a member is (``identity``), for ``dflare_backend_info``: dashboards
join it on ``backend`` so legends name pods, not pod IPs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from service.routing.pool import BackendPool

logger = logging.getLogger(__name__)


class StaticDiscovery:
    """Fixed URLs from settings; each still waits for its health check before taking traffic."""

    def __init__(self, pool: BackendPool, urls: list[str]) -> None:
        self._pool = pool
        self._urls = [url.rstrip("/") for url in urls]

    async def start(self) -> None:
        self._pool.replace({url: url for url in self._urls})

    async def stop(self) -> None:
        return None

    def identity(self, key: str, url: str) -> tuple[str, str]:
        return static_backend_identity(url)


def static_backend_identity(url: str) -> tuple[str, str]:
    """``(pod, namespace)`` behind a configured URL, ``namespace`` empty where the URL does not say.

    A Kubernetes per-pod DNS name ``<pod>.<service>.<namespace>.svc[.<cluster domain>]`` (what the
    chart lists when discovery is off) names both; any other host is named by its ``host:port``.
    """
    parts = urlsplit(url)
    labels = (parts.hostname or "").split(".")
    if len(labels) >= 4 and labels[3] == "svc":
        return labels[0], labels[2]
    return parts.netloc, ""


def pod_backend_url(pod: Any, port_annotation: str, default_port: int) -> str | None:
    """``http://<pod IP>:<port>`` for a pod that should take traffic, else ``None``.

    ``pod`` is a ``V1Pod``. Ready means: not terminating, has an IP, condition Ready is True.
    """
    metadata, status = pod.metadata, pod.status
    if metadata is None or status is None or metadata.deletion_timestamp is not None:
        return None
    if not status.pod_ip:
        return None
    ready = any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])
    if not ready:
        return None
    annotations = metadata.annotations or {}
    try:
        port = int(annotations.get(port_annotation, default_port))
    except ValueError:
        logger.warning("pod %s: bad port annotation %r", metadata.name, annotations.get(port_annotation))
        port = default_port
    host = status.pod_ip if ":" not in status.pod_ip else f"[{status.pod_ip}]"
    return f"http://{host}:{port}"


def kubernetes_api_client(kubeconfig: Path | None = None) -> Any:
    """In-cluster service-account config inside a pod, else a kubeconfig file (``$KUBECONFIG``)."""
    from kubernetes import client, config

    configuration = client.Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        config.load_kube_config(
            config_file=str(kubeconfig) if kubeconfig else None, client_configuration=configuration
        )
    return client.ApiClient(configuration)


class KubernetesDiscovery:
    """Keeps ``pool`` equal to the Ready pods matching ``label_selector`` in ``namespace``."""

    def __init__(
        self,
        pool: BackendPool,
        namespace: str,
        label_selector: str,
        port_annotation: str = "dflare.ai/port",
        default_port: int = 30000,
        api_client: Any = None,
        kubeconfig: Path | None = None,
        watch_timeout_s: int = 300,
        max_backoff_s: float = 30.0,
    ) -> None:
        self._pool = pool
        self.namespace = namespace
        self.label_selector = label_selector
        self.port_annotation = port_annotation
        self.default_port = default_port
        self._api_client = api_client
        self._kubeconfig = kubeconfig
        self.watch_timeout_s = watch_timeout_s
        self.max_backoff_s = max_backoff_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.lists = 0  # how many full lists were made (observable re-list behaviour)

    async def start(self) -> None:
        from kubernetes import client

        if self._api_client is None:
            self._api_client = kubernetes_api_client(self._kubeconfig)
        self._core = client.CoreV1Api(self._api_client)
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="k8s-discovery", daemon=True)
        self._thread.start()

    def identity(self, key: str, url: str) -> tuple[str, str]:
        """``(pod, namespace)``: members are keyed by pod name."""
        return key, self.namespace

    async def stop(self) -> None:
        # The thread notices at its next event or watch timeout; it is a daemon, so exit never waits.
        self._stop.set()

    # --- worker thread ---
    def _run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        failures = 0
        while not self._stop.is_set():
            try:
                version = self._list()
                failures = 0
                self._watch(version)
            except ApiException as exc:
                if exc.status == 410:
                    logger.info("pod watch expired (410 Gone): re-listing")
                    continue
                failures += 1
                logger.warning("Kubernetes API error %s: %s; re-listing", exc.status, exc.reason)
            except Exception as exc:
                failures += 1
                logger.warning("Kubernetes discovery failed (%s); re-listing", exc)
            if failures:
                delay = min(self.max_backoff_s, 0.5 * 2 ** min(failures, 10))
                self._stop.wait(delay / 2 + random.uniform(0, delay / 2))

    def _list(self) -> str:
        pods = self._core.list_namespaced_pod(
            self.namespace, label_selector=self.label_selector, _request_timeout=30
        )
        wanted = {}
        for pod in pods.items:
            url = pod_backend_url(pod, self.port_annotation, self.default_port)
            if url is not None:
                wanted[pod.metadata.name] = url
        self.lists += 1
        self._post(self._pool.replace, wanted)
        logger.info("listed %d pods, %d ready", len(pods.items), len(wanted))
        return pods.metadata.resource_version

    def _watch(self, version: str) -> None:
        """Watch from ``version`` until stopped; returns only on stop, raises to make the caller re-list."""
        from kubernetes import watch

        while not self._stop.is_set():
            watcher = watch.Watch()
            stream = watcher.stream(
                self._core.list_namespaced_pod,
                self.namespace,
                label_selector=self.label_selector,
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=self.watch_timeout_s,
                _request_timeout=self.watch_timeout_s + 15,
            )
            for event in stream:
                if self._stop.is_set():
                    watcher.stop()
                    return
                pod = event["object"]
                version = pod.metadata.resource_version or version
                self._apply(event["type"], pod)

    def _apply(self, kind: str, pod: Any) -> None:
        name = pod.metadata.name
        if kind == "BOOKMARK":
            return
        url = None if kind == "DELETED" else pod_backend_url(pod, self.port_annotation, self.default_port)
        if url is None:
            self._post(self._pool.remove, name)
        else:
            self._post(self._pool.add, name, url)

    def _post(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(fn, *args)
