"""The ``dflare_engine_*`` metrics: what the engine chose to verify, in our own namespace (SGLang has none).

Read from the engine at scrape time, so they cover running requests too, and sum to what the finished
requests' ``usage.speculative`` reports:

- ``dflare_engine_verify_width`` (histogram, buckets ``1..B-1``): drafts verified per request per verify
  step; its count is the requests' ``verify_steps`` summed, its sum their ``draft_tokens``.
- ``dflare_engine_plain_decode_steps_total`` (counter): request decode steps that verified no draft (a
  plain decode step of the batch, or a width of 0 for that request); the requests' ``plain_decode_steps``.
- ``dflare_engine_calibration_error`` (gauge, only with the verify-width policy): the expected calibration
  error of the policy's acceptance predictions over recent steps (0 = it predicts exactly what the target
  accepts). A rising value means the drafter or the workload drifted faster than the calibration follows.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# (name, help) of each metric: the SGLang plugin exports the same three (sglang_plugin/verify_metrics.py)
VERIFY_WIDTH = (
    "dflare_engine_verify_width",
    "Drafts the target verified per request per verify step (the width the engine chose).",
)
PLAIN_STEPS = (
    "dflare_engine_plain_decode_steps",
    "Request decode steps that verified no draft (decoded without speculation).",
)
CALIBRATION_ERROR = (
    "dflare_engine_calibration_error",
    "Expected calibration error of the verify-width policy's acceptance predictions.",
)


class VerifyWidthCollector(Collector):
    """Exports the engine's ``verify_widths`` (``[k]``: request decode steps that verified ``k`` drafts)
    and its policy's calibration error; nothing for an engine that does not speculate."""

    def __init__(self, engine: Any, labels: Mapping[str, str]) -> None:
        self.engine = engine
        self.names, self.values = list(labels), list(labels.values())

    def collect(self) -> Iterator[Metric]:
        widths = list(getattr(self.engine, "verify_widths", ()))  # a copy: the worker thread counts on
        if len(widths) < 2:  # block size 1: plain decoding, nothing chosen
            return
        cumulative, buckets = 0, []
        for width in range(1, len(widths)):
            cumulative += widths[width]
            buckets.append((floatToGoString(width), cumulative))
        buckets.append(("+Inf", cumulative))
        drafts = sum(width * n for width, n in enumerate(widths))
        width_hist = HistogramMetricFamily(*VERIFY_WIDTH, labels=self.names)
        width_hist.add_metric(self.values, buckets, drafts)
        yield width_hist
        plain = CounterMetricFamily(*PLAIN_STEPS, labels=self.names)
        plain.add_metric(self.values, widths[0])
        yield plain
        policy = getattr(self.engine, "verify_policy", None)
        if policy is not None:
            error = GaugeMetricFamily(*CALIBRATION_ERROR, labels=self.names)
            error.add_metric(self.values, policy.calibration.calibration_error())
            yield error
