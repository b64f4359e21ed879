"""The plugin's dflare_engine_* verify metrics, written like SGLang's scheduler metrics (multiprocess files)
and read back as Prometheus text through prometheus_client's multiprocess collector (SGLang's /metrics)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]

WRITER = """
from sglang_ext.sglang_plugin import verify_metrics
m = verify_metrics.from_environment("qwen3", 8)
m.record([0, 0, 3, 7, 7, 1], 0.125)
m.record([2, 2, 0], 0.25)
"""

READER = """
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry)
print(generate_latest(registry).decode())
"""


def _run(code: str, env_dir: Path | None) -> str:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    if env_dir is not None:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(env_dir)
    return subprocess.run(
        [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
    ).stdout


def test_scheduler_side_metrics_reach_the_multiprocess_exposition(tmp_path: Path) -> None:
    _run(WRITER, tmp_path)  # the "scheduler process"
    samples = {
        (s.name, s.labels.get("le")): s.value
        for family in text_string_to_metric_families(_run(READER, tmp_path))  # the "HTTP process"
        for s in family.samples
        if s.labels.get("model_name") == "qwen3"
    }
    buckets = {le: v for (name, le), v in samples.items() if name == "dflare_engine_verify_width_bucket"}
    # widths >= 1: 3, 7, 7, 1, 2, 2 -> cumulative counts per bucket 1..7, +Inf
    assert buckets == {"1.0": 1, "2.0": 3, "3.0": 4, "4.0": 4, "5.0": 4, "6.0": 4, "7.0": 6, "+Inf": 6}
    assert samples[("dflare_engine_verify_width_count", None)] == 6
    assert samples[("dflare_engine_verify_width_sum", None)] == 3 + 7 + 7 + 1 + 2 + 2
    assert samples[("dflare_engine_plain_decode_steps_total", None)] == 3
    assert samples[("dflare_engine_calibration_error", None)] == 0.25  # the most recent value


def test_without_sglangs_metrics_directory_nothing_is_created() -> None:
    out = _run(
        "from sglang_ext.sglang_plugin import verify_metrics\nprint(verify_metrics.from_environment('m', 8))",
        None,
    )
    assert out.strip() == "None"
