"""The trace file format: round trips, the replay window rule, and load-time validation errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from sglang_ext.traces.format import (
    FORMAT,
    AcceptanceTrace,
    TraceFormatError,
    TraceStep,
    accepted_in_window,
)


def _trace() -> AcceptanceTrace:
    return AcceptanceTrace(
        source="demo",
        block_size=4,
        temperature=1.0,
        requests=[
            [TraceStep(3, (0.99, 0.912345678, 0.5)), TraceStep(0, (0.1, 0.0, 1.0))],
            [TraceStep(1, (0.7, 0.3, 0.2))],
        ],
        meta={"prompts": [0, 1]},
    )


@pytest.mark.parametrize("name", ["t.json", "t.json.gz"])
def test_save_load_round_trip(tmp_path: Path, name: str) -> None:
    trace = _trace()
    path = tmp_path / "sub" / name
    trace.save(path)
    loaded = AcceptanceTrace.load(path)
    assert loaded == trace
    assert loaded.requests[0][0].confidences == (0.99, 0.9123, 0.5)  # rounded to 4 decimals
    raw = path.read_bytes()
    assert raw[:2] == b"\x1f\x8b" if name.endswith(".gz") else raw.startswith(b"{")
    data = json.loads(gzip.decompress(raw) if name.endswith(".gz") else raw)
    assert data["format"] == FORMAT
    assert data["requests"][1] == {"accepted": [1], "confidences": [[0.7, 0.3, 0.2]]}


def test_gzip_output_is_deterministic(tmp_path: Path) -> None:
    _trace().save(tmp_path / "a.json.gz")
    _trace().save(tmp_path / "b.json.gz")
    assert (tmp_path / "a.json.gz").read_bytes() == (tmp_path / "b.json.gz").read_bytes()


def test_accepted_in_window_is_a_prefix_not_a_clamp() -> None:
    step = TraceStep(2, (0.9, 0.8, 0.7))
    assert [accepted_in_window(step, k) for k in range(4)] == [0, 1, 2, 2]
    assert accepted_in_window(TraceStep(0, (0.9, 0.8, 0.7)), 3) == 0
    with pytest.raises(ValueError):
        accepted_in_window(step, -1)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(format="dflare-acceptance-trace/0"), "format is"),
        (lambda d: d.pop("block_size"), "missing keys: block_size"),
        (lambda d: d.update(block_size=1), "block_size must be an int >= 2"),
        (lambda d: d.update(temperature=-1), "temperature"),
        (lambda d: d.update(source=""), "source"),
        (lambda d: d["requests"][0]["accepted"].append(1), "request 0: 3 accepted counts but 2"),
        (
            lambda d: d["requests"][1]["accepted"].__setitem__(0, 4),
            "request 1 step 0: accepted=4 outside 0..3",
        ),
        (lambda d: d["requests"][1]["confidences"].__setitem__(0, [0.5, 0.5]), "2 confidences, expected"),
        (lambda d: d["requests"][0]["confidences"][1].__setitem__(2, 1.5), "request 0 step 1: confidences"),
        (lambda d: d["requests"][0]["confidences"][1].__setitem__(2, "x"), "list of numbers"),
        (lambda d: d["requests"].append([1, 2]), "request 2: expected an object"),
    ],
)
def test_load_rejects_malformed_traces(tmp_path: Path, mutate, message: str) -> None:
    data = _trace().to_json()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TraceFormatError, match=message) as info:
        AcceptanceTrace.load(path)
    assert str(path) in str(info.value)


def test_load_rejects_non_json_and_corrupt_gzip(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("{not json")
    (tmp_path / "b.json.gz").write_bytes(b"plain bytes")
    for name in ("a.json", "b.json.gz"):
        with pytest.raises(TraceFormatError, match="cannot read a JSON trace"):
            AcceptanceTrace.load(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        AcceptanceTrace.load(tmp_path / "missing.json")


def test_constructor_checks_confidence_count() -> None:
    with pytest.raises(TraceFormatError, match="expected block_size - 1 = 7"):
        AcceptanceTrace("synthetic", 8, 0.0, [[TraceStep(0, (0.5, 0.5))]])
    with pytest.raises(TraceFormatError, match="must be probabilities"):
        TraceStep(0, (float("nan"),))


def test_shipped_traces_load() -> None:
    from sglang_ext.traces import SHIPPED_TRACES, load_shipped_trace, shipped_trace_path

    for name in SHIPPED_TRACES:
        trace = load_shipped_trace(name)
        assert trace.block_size == 16 and trace.num_steps > 1000
        assert trace.source == ("synthetic" if name == "synthetic" else "demo")
        assert shipped_trace_path(name).stat().st_size < 2_000_000
    assert load_shipped_trace("demo_t1").temperature == 1.0
    with pytest.raises(ValueError, match="unknown shipped trace 'demo'"):
        shipped_trace_path("demo")
