"""The trace report from hand-built traces (numbers worked out by hand), and the `dflare trace` CLI run as a
real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_ext.traces.format import AcceptanceTrace, TraceStep
from sglang_ext.traces.report import summarize, tau_by_block

ROOT = Path(__file__).resolve().parents[2]


def _two_requests() -> AcceptanceTrace:
    """Request 0 accepts 3 then 1 drafts, request 1 accepts none (block 4)."""
    return AcceptanceTrace(
        "demo",
        4,
        0.0,
        [
            [TraceStep(3, (0.95, 0.95, 0.95)), TraceStep(1, (0.85, 0.15, 0.5))],
            [TraceStep(0, (0.25, 0.9, 0.9))],
        ],
    )


def test_tau_by_block_by_hand() -> None:
    # block b: 1 + mean(min(accepted, b - 1)) over the steps (3, 1, 0)
    assert tau_by_block(_two_requests()) == pytest.approx({2: 1 + 2 / 3, 3: 2.0, 4: 1 + 4 / 3})


def test_summary_by_hand() -> None:
    s = summarize(_two_requests())
    assert s["steps"] == 3 and s["requests"] == 2
    assert s["tau_by_block"] == {"2": 1.6667, "3": 2.0, "4": 2.3333}
    # position 1: 2 of 3 steps; position 2: 1 of the 2 that reached it; position 3: 1 of 1
    assert s["per_position_acceptance"] == [0.6667, 0.5, 1.0]
    assert s["accepted_histogram"] == [1, 1, 0, 1]
    # request tau: 1 + 4/2 = 3 and 1
    assert s["request_tau"]["mean"] == 2.0 and s["request_tau"]["percentiles"]["50"] == 2.0
    # pairs (confidence, accepted) of reached positions: (.95, 1) x3, (.85, 1), (.15, 0), (.25, 0);
    # each alone in its bin: (3 * .05 + .15 + .15 + .25) / 6
    assert s["calibration"]["ece"] == pytest.approx(0.7 / 6, abs=1e-4)
    # position 1: (.95, 1), (.85, 1), (.25, 0) -> (.05 + .15 + .25) / 3; position 3: (.95, 1) -> .05
    assert s["calibration"]["ece_by_position"] == pytest.approx([0.15, 0.1, 0.05], abs=1e-4)
    assert s["calibration"]["reliability"]["pairs"] == [1, 1, 1, 3]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "sglang_ext.cli", "trace", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)


def test_cli_synthetic_then_report(tmp_path: Path) -> None:
    syn = tmp_path / "syn.json.gz"
    done = _cli("synthetic", "--out", str(syn), "--requests", "16", "--steps", "16", "--seed", "3")
    assert done.returncode == 0, done.stderr
    hand = tmp_path / "hand.json"
    _two_requests().save(hand)
    out = tmp_path / "out" / "report.json"
    done = _cli("report", f"synthetic={syn}", str(hand), "--json", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert list(report["traces"]) == ["synthetic", "hand"]
    assert report["traces"]["hand"]["tau_by_block"]["4"] == 2.3333
    assert report["traces"]["synthetic"]["steps"] == 16 * 16
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_reports_bad_input(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something-else"}')
    done = _cli("report", str(bad), "--json", str(tmp_path / "r.json"))
    assert done.returncode == 2 and "format is 'something-else'" in done.stderr
    done = _cli("replay")
    assert done.returncode == 2 and "unknown command 'replay'" in done.stderr
