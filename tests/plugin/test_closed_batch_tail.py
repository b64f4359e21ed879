"""The closed-batch tail of the load benchmark under trace replay (tests/perf/closed_batch_tail.py): time per
step read off tok/s equals the step's cost when every request accepts alike, and exceeds it by the tail when
some accept less; the shipped synthetic trace at block 8 has such a tail at batch 128."""

from __future__ import annotations

import pytest

from sglang_ext.sglang_plugin.adaptive import SHIPPED_TABLES
from sglang_ext.traces.format import TraceStep
from tests.perf.closed_batch_tail import closed_batch, run


def steps(accepted: int, block: int = 8, n: int = 4) -> list[TraceStep]:
    return [TraceStep(accepted=accepted, confidences=(0.5,) * (block - 1)) for _ in range(n)]


def test_requests_that_accept_alike_show_the_step_cost_itself() -> None:
    row = closed_batch([steps(3)] * 4, batch=4, new_tokens=129, block=8, step_ms=lambda running: 10.0)
    assert row["tau"] == 4.0 and row["server_steps"] == row["mean_request_steps"] == 32
    # the benchmark counts each request's prefilled first token too: 129 tokens in 32 steps of 10 ms
    assert row["apparent_step_ms"] == pytest.approx(10.0 * 128 / 129, abs=1e-3)


def test_a_request_that_accepts_less_runs_on_alone_and_inflates_the_apparent_step() -> None:
    requests = [steps(7), steps(7), steps(7), steps(0)]
    row = closed_batch(requests, batch=4, new_tokens=129, block=8, step_ms=lambda running: 10.0)
    assert row["server_steps"] == 128  # the request accepting nothing needs one step per token
    assert row["mean_request_steps"] == pytest.approx((3 * 16 + 128) / 4)
    assert row["apparent_step_ms"] > 2 * row["full_batch_step_ms"]


def test_a_window_shorter_than_the_trace_block_keeps_what_the_trace_accepts_within_it() -> None:
    row = closed_batch([steps(15, block=16)], batch=1, new_tokens=33, block=4, step_ms=lambda running: 1.0)
    assert row["tau"] == 4.0 and row["server_steps"] == 8


def test_the_synthetic_trace_at_block_8_has_a_tail_at_batch_128() -> None:
    result = run(SHIPPED_TABLES / "nvidia-h100-80gb-hbm3_b8.json", "synthetic", 8, [1, 128], rounds=1)
    by_batch = {row["batch"]: row for row in result["rows"]}
    assert by_batch[1]["inflation"] == pytest.approx(1.0, abs=0.02)
    assert by_batch[128]["server_steps"] > 1.5 * by_batch[128]["mean_request_steps"]
    assert by_batch[128]["inflation"] > 1.15
