"""The ``sglang:*`` metrics ``dflare engine-server`` exports, named and labelled as SGLang 0.5.17 does.

Scheduler-side metrics carry ``model_name``, ``engine_type``, ``tp_rank``; request-side ones
(tokens, latencies, request counts) ``model_name`` and ``engine_type``. Gauges are computed at scrape
time from the runner and a rolling window of finished requests (SGLang refreshes its gauges every
``--decode-log-interval`` batches); the subset exported is listed in deploy/sglang_metrics_0.5.17.txt.
Beside them, the ``dflare_engine_*`` metrics of what the engine chose to verify
(:mod:`sglang_ext.engine_server.verify_metrics`), labelled as the scheduler-side ones.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sglang_ext.engine_server.verify_metrics import VerifyWidthCollector
from sglang_ext.stats import SpecStats

if TYPE_CHECKING:
    from sglang_ext.engine_server.runner import EngineRunner
    from sglang_ext.engine_server.serving import Outcome

TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400)
ITL_BUCKETS = (
    0.002,
    0.004,
    0.006,
    0.008,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.035,
    0.04,
    0.06,
    0.08,
    0.1,
    0.2,
    0.4,
    0.6,
    0.8,
    1.0,
    2.0,
    4.0,
    6.0,
    8.0,
)
E2E_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 600, 1200)
QUEUE_BUCKETS = (0.0, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 60, 120, 300, 600)
WINDOW_S = 10.0  # throughput and acceptance gauges look back this far


class EngineMetrics:
    def __init__(self, runner: EngineRunner, model_name: str, max_context: int) -> None:
        self.runner = runner
        self.max_context = max_context
        r = self.registry = CollectorRegistry(auto_describe=True)
        sched = {"model_name": model_name, "engine_type": "unified", "tp_rank": "0"}
        req = {"model_name": model_name, "engine_type": "unified"}
        s_names, r_names = tuple(sched), tuple(req)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"sglang:{name}", doc, s_names, registry=r).labels(**sched)

        self.running = gauge("num_running_reqs", "The number of running requests.")
        self.queued = gauge("num_queue_reqs", "The number of requests in the waiting queue.")
        self.token_usage = gauge("token_usage", "The token usage (KV slots in use / capacity).")
        self.cache_hit_rate = gauge("cache_hit_rate", "The prefix cache hit rate (no prefix cache: 0).")
        # The reference engine gives every batch row the whole context, so it never retracts a
        # request to free KV cache; exported (always 0) so retraction panels and alerts read the same.
        self.retracted = gauge("num_retracted_reqs", "The number of retracted requests.")
        self.gen_throughput = gauge("gen_throughput", "The generation throughput (token/s).")
        self.accept_length = gauge(
            "spec_accept_length", "The average acceptance length (1 + accepted/verify)."
        )
        self.accept_rate = gauge("spec_accept_rate", "The average acceptance rate of drafted tokens.")
        self.verify_calls = Counter("sglang:spec_verify_calls", "Verify steps.", s_names, registry=r).labels(
            **sched
        )
        self.prompt_tokens = Counter(
            "sglang:prompt_tokens", "Number of prefill tokens processed.", r_names, registry=r
        ).labels(**req)
        self.generation_tokens = Counter(
            "sglang:generation_tokens", "Number of generation tokens processed.", r_names, registry=r
        ).labels(**req)
        self.requests = Counter(
            "sglang:num_requests", "The number of processed requests.", r_names, registry=r
        ).labels(**req)
        self.aborted = Counter(
            "sglang:num_aborted_requests", "The number of aborted requests.", r_names, registry=r
        ).labels(**req)
        self.ttft = Histogram(
            "sglang:time_to_first_token_seconds",
            "Histogram of time to first token.",
            r_names,
            buckets=TTFT_BUCKETS,
            registry=r,
        ).labels(**req)
        self.itl = Histogram(
            "sglang:inter_token_latency_seconds",
            "Histogram of inter-token latency.",
            r_names,
            buckets=ITL_BUCKETS,
            registry=r,
        ).labels(**req)
        self.queue_time = Histogram(
            "sglang:queue_time_seconds",
            "Histogram of queueing time: arrival until the engine step that prefills the request.",
            s_names,
            buckets=QUEUE_BUCKETS,
            registry=r,
        ).labels(**sched)
        self.e2e = Histogram(
            "sglang:e2e_request_latency_seconds",
            "Histogram of end-to-end latency.",
            r_names,
            buckets=E2E_BUCKETS,
            registry=r,
        ).labels(**req)
        self._recent: deque[tuple[float, int, SpecStats | None]] = deque()
        r.register(VerifyWidthCollector(runner.engine, sched))

    def on_finish(self, out: Outcome) -> None:
        """Record one finished (or aborted) request."""
        now = time.perf_counter()
        self.requests.inc()
        self.prompt_tokens.inc(out.prompt_tokens)
        self.generation_tokens.inc(out.completion_tokens)
        if out.finish_reason == "abort":
            self.aborted.inc()
        if out.first_token_at is not None:
            self.ttft.observe(out.first_token_at - out.started)
        last = out.first_token_at
        for at, n in out.chunk_times or ():
            if last is not None and at > last and n:
                interval = (at - last) / n
                for _ in range(n):
                    self.itl.observe(interval)
            last = at
        self.e2e.observe((out.finished_at or now) - out.started)
        if out.scheduled_at is not None:
            self.queue_time.observe(max(0.0, out.scheduled_at - out.started))
        if out.stats is not None:
            self.verify_calls.inc(out.stats.verify_steps)
        self._recent.append((now, out.completion_tokens, out.stats))

    def exposition(self) -> bytes:
        self._refresh()
        return generate_latest(self.registry)

    def _refresh(self) -> None:
        now = time.perf_counter()
        while self._recent and now - self._recent[0][0] > WINDOW_S:
            self._recent.popleft()
        admitted = self.runner.num_admitted
        batch = int(getattr(self.runner.engine, "max_batch", 1))
        self.running.set(min(admitted, batch))
        self.queued.set(max(0, admitted - batch))
        self.token_usage.set(self.runner.tokens_in_use() / max(1, batch * self.max_context))
        self.cache_hit_rate.set(0.0)
        self.gen_throughput.set(sum(n for _, n, _ in self._recent) / WINDOW_S)
        window = [s for _, _, s in self._recent if s is not None and s.verify_steps]
        if window:
            total = window[0]
            for s in window[1:]:
                total = total.merge(s)
            self.accept_length.set(total.acceptance_length)
            self.accept_rate.set(total.acceptance_rate)
