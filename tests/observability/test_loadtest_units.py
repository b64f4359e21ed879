"""Pure parts of the load kit: shapes, prompt sets, SSE parsing, wrk output parsing."""

from __future__ import annotations

import json
import sys

import pytest

from . import promql

sys.path.insert(0, str(promql.REPO / "loadtest"))  # locust runs the locustfile's folder as a path entry

import gateway_bench
from load_shapes import STAGES, users_at
from openai_stream import StreamTimes
from prompt_sets import PROMPT_SETS, PromptPicker, load_prompts
from request_metrics import Measurements, request_metrics


@pytest.mark.parametrize(
    ("shape", "progress", "users"),
    [
        ("steady", 0.0, 20), ("steady", 0.99, 20),
        ("ramp", 0.1, 5), ("ramp", 0.3, 10), ("ramp", 0.6, 15), ("ramp", 0.9, 20),
        ("spike", 0.2, 5), ("spike", 0.5, 20), ("spike", 0.8, 5),
    ],
)  # fmt: skip
def test_shapes_follow_their_stages(shape: str, progress: float, users: int) -> None:
    assert users_at(shape, progress * 60, 60, 20) == users


def test_shapes_end_with_the_run_and_never_drop_to_zero_users() -> None:
    for shape in STAGES:
        assert users_at(shape, 60, 60, 20) is None
        assert users_at(shape, 0, 60, 1) == 1


def test_prompt_sets_are_bundled_and_distinct() -> None:
    prompts = load_prompts()
    assert {p.set for p in prompts} == set(PROMPT_SETS)
    assert len({p.id for p in prompts}) == len(prompts) >= 30
    assert all(p.messages[-1]["role"] == "user" and p.messages[-1]["content"] for p in prompts)
    with pytest.raises(ValueError, match="unknown prompt set"):
        load_prompts(["poetry"])
    a, b = PromptPicker(prompts, seed=1), PromptPicker(prompts, seed=1)
    assert [a.next().id for _ in range(10)] == [b.next().id for _ in range(10)]


def _sse(event: dict) -> str:
    return "data: " + json.dumps(event)


def test_stream_times_take_first_content_usage_and_done() -> None:
    times = StreamTimes(start=0.0)
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    assert not times.feed(_sse(role), 0.1)
    assert times.first_token is None  # an empty role chunk is not a token
    for t in (0.2, 0.3, 0.5):
        times.feed(_sse({"choices": [{"index": 0, "delta": {"content": "x"}}]}), t)
    usage = {"prompt_tokens": 3, "completion_tokens": 3, "speculative": {"acceptance_length": 2.5}}
    times.feed(_sse({"choices": [], "usage": usage}), 0.6)
    assert times.feed("", 0.6) is False and times.feed("data: [DONE]", 0.7) is True
    assert (times.first_token, times.last_token, times.content_chunks) == (0.2, 0.5, 3)
    assert times.usage == usage and times.error is None


def test_stream_times_keep_a_mid_stream_error() -> None:
    times = StreamTimes(start=0.0)
    times.feed(_sse({"error": {"message": "backend died", "type": "server_error"}}), 0.1)
    assert times.error == "backend died"


WRK_OUTPUT = """Running 2s test @ http://127.0.0.1:1/v1/chat/completions
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   412.00us  100.00us   2.10ms   90.00%
  Latency Distribution
     50%  390.00us
     75%  420.00us
     90%  500.00us
     99%    1.20ms
  4800 requests in 2.00s, 3.10MB read
  Non-2xx or 3xx responses: 7
Requests/sec:   2400.50
Transfer/sec:      1.55MB
"""


def test_wrk_output_is_parsed_with_units() -> None:
    result = gateway_bench.parse_wrk(WRK_OUTPUT)
    assert result.requests_per_s == 2400.5
    assert result.p50_ms == pytest.approx(0.39) and result.p99_ms == pytest.approx(1.2)
    assert result.non_2xx == 7 and result.socket_errors == 0
    with pytest.raises(ValueError):
        gateway_bench.parse_wrk("wrk: connection refused")


def test_a_bursty_speculative_stream_reports_vllm_tpot_and_output_throughput() -> None:
    """64 tokens: first chunk at 100 ms, the other 63 in one burst 0.4 ms later (one verify step)."""
    m = request_metrics(e2e_s=0.1004, output_tokens=64, ttft_s=0.100)
    assert 63 / (0.1004 - 0.100) > 150_000  # the old per-request tok/s: (tokens - 1) / (e2e - ttft)
    assert m.output_tokens_per_s == pytest.approx(64 / 0.1004)  # ~637 tokens/s
    assert m.tpot_s == pytest.approx(0.0004 / 63)


def test_request_metrics_follow_bench_serving_definitions() -> None:
    m = request_metrics(e2e_s=2.0, output_tokens=101, ttft_s=0.5)
    assert (m.tpot_s, m.output_tokens_per_s, m.ttft_s, m.e2e_s) == (pytest.approx(0.015), 50.5, 0.5, 2.0)
    one = request_metrics(e2e_s=0.3, output_tokens=1, ttft_s=0.3)
    assert one.tpot_s is None and one.output_tokens_per_s == pytest.approx(1 / 0.3)
    blocking = request_metrics(e2e_s=4.0, output_tokens=200)
    assert blocking.ttft_s is None and blocking.tpot_s is None and blocking.output_tokens_per_s == 50.0
    assert request_metrics(e2e_s=1.0, output_tokens=0).output_tokens_per_s is None


def test_measurements_keep_exact_values_and_numpy_percentiles(tmp_path) -> None:
    numpy = pytest.importorskip("numpy")
    measured = Measurements()
    ttfts = [0.0123, 0.0456, 0.1, 0.25, 0.9, 1.7, 0.033]
    for i, ttft in enumerate(ttfts):
        measured.add_request("chat stream", request_metrics(2.0, 50, ttft), acceptance_length=3.0 + i / 7)
    measured.add_request("chat", request_metrics(1.0, 20))
    in_ms = [t * 1000 for t in ttfts]
    for q in (50, 90, 95, 99):
        assert measured.percentile("TTFT", "chat stream", q) == pytest.approx(numpy.percentile(in_ms, q))
    assert measured.count("TTFT", "chat") == 0 and measured.count("OUTPUT_TOK/S", "chat") == 1
    rows = {(r["Type"], r["Name"]): r for r in measured.rows()}
    assert rows[("ACCEPT_LEN", "chat stream")]["Min"] == 3.0  # not rounded to an integer
    assert rows[("ACCEPT_LEN", "chat stream")]["Max"] == pytest.approx(3 + 6 / 7)
    assert rows[("TPOT", "chat stream")]["Unit"] == "ms"
    measured.write_csv(tmp_path / "run_measurements.csv")
    lines = (tmp_path / "run_measurements.csv").read_text().splitlines()
    assert lines[0].startswith("Type,Name,Unit,Count,Mean,P50") and len(lines) == 1 + len(rows)
    assert "OUTPUT_TOK/S" in measured.table()
