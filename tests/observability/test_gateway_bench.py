"""The gateway benchmark runs end to end (short): fake backend, smg, our gateway, wrk, JSON + PNG.

Its numbers are not judged here (speed lives in docs/benchmarks.md); only that every row was measured
through a proxy that answered 200s, and that the report holds together.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from . import promql

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk missing: apt-get install wrk"),
]


def test_gateway_bench_measures_direct_smg_and_dflare(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = subprocess.run(
        [
            sys.executable,
            str(promql.REPO / "loadtest/gateway_bench.py"),
            "--duration",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads(out.with_suffix(".json").read_text())
    rows = {t["name"]: t for t in report["targets"]}
    assert list(rows) == ["direct", "smg", "dflare"]
    assert rows["direct"]["added_p50_ms"] == 0 and rows["smg"]["rps_vs_smg"] == 1
    for row in rows.values():
        for run in (row["latency_c1"], row["throughput_c32"]):
            assert (
                run["requests_per_s"] > 0
                and run["non_2xx"] == 0
                and run["socket_errors"] <= run["requests"] // 100 + 1
                and 0 < run["p50_ms"] <= run["p99_ms"]
            )
    for name in ("smg", "dflare"):  # CPU time per request of the proxy's processes
        assert rows[name]["throughput_c32"]["proxy_cpu_ms_per_request"] > 0
    assert rows["direct"]["throughput_c32"]["proxy_cpu_ms_per_request"] is None
    assert report["machine"]["cores"] >= 1
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
