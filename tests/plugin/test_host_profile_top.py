"""host_profile_top.py on py-spy's raw format: shares of samples per frame, and ``--under`` cutting the
stacks at one call so that a stall inside it shows what it spends its time on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = "\n".join(
    [
        "loop (scheduler.py:10);verify (worker.py:20);replay (graph.py:30) 6",
        "loop (scheduler.py:10);commit (worker.py:40);malloc (torch/cuda.py:50) 3",
        "loop (scheduler.py:10);commit (worker.py:40) 1",
        "not a sample line",
    ]
)


def run(tmp_path: Path, *args: str) -> dict:
    samples = tmp_path / "pyspy_s_bs128_synthetic.txt"
    samples.write_text(SAMPLES + "\n")
    out = tmp_path / "top.json"
    script = ROOT / "tests/gpu/host_profile_top.py"
    cmd = [sys.executable, str(script), str(samples), "--json", str(out), *args]
    subprocess.run(cmd, check=True, capture_output=True)
    return json.loads(out.read_text())[samples.name]


def test_shares_count_every_sample_line_by_function(tmp_path: Path) -> None:
    report = run(tmp_path)
    assert report["samples"] == 10
    assert report["inclusive"]["loop (scheduler.py)"] == 1.0
    assert report["inclusive"]["commit (worker.py)"] == 0.4
    assert report["self"]["replay (graph.py)"] == 0.6 and report["self"]["commit (worker.py)"] == 0.1


def test_under_keeps_only_the_samples_inside_that_call_cut_at_it(tmp_path: Path) -> None:
    report = run(tmp_path, "--under", "commit")
    assert report["samples"] == 4
    assert report["inclusive"] == {"commit (worker.py)": 1.0, "malloc (torch/cuda.py)": 0.75}
    assert "loop (scheduler.py)" not in report["self"] and report["self"]["malloc (torch/cuda.py)"] == 0.75
