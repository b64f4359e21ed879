"""The ``dflare_engine_*`` verify metrics from inside SGLang, meaning what ``dflare engine-server`` exports.

- ``dflare_engine_verify_width`` (histogram, buckets ``1..B-1``): drafts verified per request per verify step;
- ``dflare_engine_plain_decode_steps_total`` (counter): request decode steps that verified no draft;
- ``dflare_engine_calibration_error`` (gauge, adaptive verify only): the policy's expected calibration error.

SGLang serves ``/metrics`` from its HTTP process and collects the scheduler processes' metrics through
prometheus_client's multiprocess files (``PROMETHEUS_MULTIPROC_DIR``, set when ``--enable-metrics`` is on), so
these are ordinary prometheus_client metrics created in the scheduler process; without that directory there is
nothing to export and :func:`from_environment` returns None. Labelled ``model_name`` like SGLang's own, so the
chart's speculation dashboard reads SGLang engines and engine-servers alike.

A step adds up to 256 widths: each bucket is incremented once by its count (the histogram child's
``_buckets`` / ``_sum`` values, prometheus_client's layout since 0.4, pinned by the test) instead of one
``observe`` per request (about 3 us each in multiprocess mode).
"""

from __future__ import annotations

import os
from collections import Counter as Tally
from collections.abc import Sequence

from prometheus_client import Counter, Gauge, Histogram

from sglang_ext.engine_server.verify_metrics import CALIBRATION_ERROR, PLAIN_STEPS, VERIFY_WIDTH


class VerifyMetrics:
    """The three metrics for one served model and block size."""

    def __init__(self, model_name: str, block_size: int) -> None:
        self.block_size = block_size
        bounds = [float(k) for k in range(1, max(block_size, 2))]
        self.width = Histogram(*VERIFY_WIDTH, ["model_name"], buckets=bounds).labels(model_name)
        self.plain = Counter(*PLAIN_STEPS, ["model_name"]).labels(model_name)
        self.calibration = Gauge(*CALIBRATION_ERROR, ["model_name"], multiprocess_mode="mostrecent").labels(
            model_name
        )
        self._upper = [*bounds, float("inf")]

    def record(self, widths: Sequence[int], calibration_error: float | None = None) -> None:
        """One decode step's per-request widths (0 = that request verified no draft)."""
        tally = Tally(int(w) for w in widths)
        plain = tally.pop(0, 0)
        if plain:
            self.plain.inc(plain)
        for width, count in tally.items():
            index = next(i for i, upper in enumerate(self._upper) if width <= upper)
            self.width._buckets[index].inc(count)
            self.width._sum.inc(width * count)
        if calibration_error is not None:
            self.calibration.set(calibration_error)


def from_environment(model_name: str, block_size: int) -> VerifyMetrics | None:
    """The metrics when SGLang exports scheduler metrics (``--enable-metrics``), else None."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    return VerifyMetrics(model_name, block_size)
