"""Every Prometheus metric of the gateway (names: docs/architecture.md, meanings: docs/metrics.md).

The speculative counters follow vLLM's ``vllm:spec_decode_*`` semantics, so the same formulas apply:
acceptance rate = rate(accepted_tokens) / rate(draft_tokens), mean acceptance length =
1 + rate(accepted_tokens) / rate(drafts). They are counted from per-request stats, so they sum across
gateway pods (SGLang's own acceptance gauges cannot be summed).

With several uvicorn workers ``PROMETHEUS_MULTIPROC_DIR`` must be set before ``prometheus_client`` is
first imported (``dflare serve`` does); :meth:`GatewayMetrics.exposition` then merges all workers'
files through ``MultiProcessCollector``. Imports nothing from the rest of ``service``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as prom_multiprocess

if TYPE_CHECKING:
    from sglang_ext.stats import SpecStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40)
ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)
ACCEPTANCE_LENGTH_BUCKETS = tuple(float(k) for k in range(1, 17))


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


class _ModelBackendSeries:
    """The children of every (model, backend)-labelled metric, resolved once per pair (hot path)."""

    __slots__ = (
        "acceptance_length",
        "accepted",
        "completion_tokens",
        "draft_tokens",
        "drafts",
        "itl",
        "per_pos",
        "per_pos_metric",
        "prompt_tokens",
        "ttft",
    )

    def __init__(self, m: GatewayMetrics, model: str, backend: str) -> None:
        self.ttft = m.ttft.labels(model, backend)
        self.itl = m.itl.labels(model, backend)
        self.prompt_tokens = m.prompt_tokens.labels(model, backend)
        self.completion_tokens = m.completion_tokens.labels(model, backend)
        self.drafts = m.spec_drafts.labels(model, backend)
        self.draft_tokens = m.spec_draft_tokens.labels(model, backend)
        self.accepted = m.spec_accepted_tokens.labels(model, backend)
        self.acceptance_length = m.spec_acceptance_length.labels(model, backend)
        self.per_pos_metric = (m.spec_accepted_per_pos, model, backend)
        self.per_pos: list = []

    def position(self, i: int):
        while len(self.per_pos) <= i:
            metric, model, backend = self.per_pos_metric
            self.per_pos.append(metric.labels(model, backend, str(len(self.per_pos))))
        return self.per_pos[i]


class GatewayMetrics:
    """Builds the gateway's metrics on its own registry (one per app, so tests can make several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        mb = ("model", "backend")
        self.requests = Counter(
            "dflare_requests",
            "API requests by final HTTP status.",
            ("model", "backend", "endpoint", "status"),
            registry=r,
        )
        self.duration = Histogram(
            "dflare_request_duration_seconds",
            "End-to-end latency, arrival to last byte (stream included).",
            ("model", "backend", "endpoint"),
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "dflare_time_to_first_token_seconds",
            "Arrival to first streamed chunk with content (streams only).",
            mb,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "dflare_inter_token_latency_seconds",
            "Per streamed request: (last chunk - first chunk) / (completion tokens per choice - 1).",
            mb,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "dflare_prompt_tokens", "Prompt tokens of finished requests.", mb, registry=r
        )
        self.completion_tokens = Counter(
            "dflare_completion_tokens", "Completion tokens generated.", mb, registry=r
        )
        self.in_flight = Gauge(
            "dflare_requests_in_flight",
            "API requests being served now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.backend_up = Gauge(
            "dflare_backend_up",
            "1 if the backend passes its health checks.",
            ("backend",),
            registry=r,
            multiprocess_mode="livemax",
        )
        # Info series for joins: the other per-backend series keep their labels (the contract), and a
        # dashboard adds the pod name with `* on(backend) group_left(backend_pod) dflare_backend_info`.
        # Not `pod` / `namespace`: Prometheus' target labels of the same names (the gateway pod's) win.
        self.backend_info = Gauge(
            "dflare_backend_info",
            "Always 1 while the backend is a member: the pod and namespace behind each backend URL.",
            ("backend", "backend_pod", "backend_namespace"),
            registry=r,
            multiprocess_mode="livemax",
        )
        # Counts, not per-backend series: they exist from start-up and never disappear, so alerts on
        # zero and dashboards keep working when discovery drops every pod (its per-backend series go).
        self.backends_known = Gauge(
            "dflare_backends_known",
            "Backends the gateway knows (discovered Ready pods or configured URLs), admitted or not.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.backends_routable = Gauge(
            "dflare_backends_routable",
            "Backends that may take a request now: health checks pass and the circuit breaker is not open.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.spec_drafts = Counter(
            "dflare_spec_decode_num_drafts",
            "Verify steps (one target forward over a drafted block).",
            mb,
            registry=r,
        )
        self.spec_draft_tokens = Counter(
            "dflare_spec_decode_num_draft_tokens", "Drafted tokens the verifier checked.", mb, registry=r
        )
        self.spec_accepted_tokens = Counter(
            "dflare_spec_decode_num_accepted_tokens",
            "Drafted tokens the verifier accepted (bonus tokens excluded).",
            mb,
            registry=r,
        )
        self.spec_accepted_per_pos = Counter(
            "dflare_spec_decode_num_accepted_tokens_per_pos",
            "Verify steps that accepted the draft at this 0-based position.",
            ("model", "backend", "position"),
            registry=r,
        )
        self.spec_acceptance_length = Histogram(
            "dflare_spec_decode_acceptance_length",
            "Per request: 1 + accepted drafts / verify steps.",
            mb,
            buckets=ACCEPTANCE_LENGTH_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "dflare_retries",
            "Requests retried on another backend, by failed backend.",
            ("backend",),
            registry=r,
        )
        self.rejected = Counter(
            "dflare_rejected_requests", "Requests refused before reaching a backend.", ("reason",), registry=r
        )
        self._series: dict[tuple[str, str], _ModelBackendSeries] = {}
        self._request_children: dict[tuple[str, str, str, int], tuple] = {}

    # ---- recording (hot path) -------------------------------------------------------------
    def series(self, model: str, backend: str) -> _ModelBackendSeries:
        s = self._series.get((model, backend))
        if s is None:
            s = self._series[(model, backend)] = _ModelBackendSeries(self, model, backend)
        return s

    def observe_request(self, model: str, backend: str, endpoint: str, status: int, duration: float) -> None:
        key = (model, backend, endpoint, status)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.requests.labels(model, backend, endpoint, str(status)),
                self.duration.labels(model, backend, endpoint),
            )
        children[0].inc()
        children[1].observe(duration)

    def observe_usage(
        self, model: str, backend: str, prompt_tokens: int, completion_tokens: int, stats: SpecStats | None
    ) -> None:
        s = self.series(model, backend)
        if prompt_tokens:
            s.prompt_tokens.inc(prompt_tokens)
        if completion_tokens:
            s.completion_tokens.inc(completion_tokens)
        if stats is None or stats.verify_steps == 0:
            return
        s.drafts.inc(stats.verify_steps)
        s.draft_tokens.inc(stats.draft_tokens)
        s.accepted.inc(stats.accepted_tokens)
        s.acceptance_length.observe(stats.acceptance_length)
        for i, n in enumerate(stats.accepted_per_position):
            s.position(i).inc(n)

    def observe_stream_timing(self, model: str, backend: str, ttft: float | None, itl: float | None) -> None:
        s = self.series(model, backend)
        if ttft is not None:
            s.ttft.observe(ttft)
        if itl is not None:
            s.itl.observe(itl)

    def set_backend_counts(self, known: int, routable: int) -> None:
        self.backends_known.set(known)
        self.backends_routable.set(routable)

    # ---- exposition -----------------------------------------------------------------------
    def exposition(self) -> bytes:
        """The text format of all metrics; all workers' values merged in multiprocess mode."""
        path = multiprocess_dir()
        if path is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        prom_multiprocess.MultiProcessCollector(registry, path=path)
        return generate_latest(registry)


def mark_worker_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (``livesum``/``livemax``) in multiprocess mode."""
    if multiprocess_dir() is not None:
        prom_multiprocess.mark_process_dead(pid)
