"""`dflare generate`, `dflare bench engine` and `dflare convert` as a user runs them (random tiny pair)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_ext.cli import main as dflare


def test_generate_random_pair_prints_text_and_stats(capsys) -> None:
    rc = dflare(
        [
            "generate",
            "--random",
            "--threads",
            "1",
            "--max-tokens",
            "12",
            "--seed",
            "3",
            "--temperature",
            "0.7",
            "hello",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "--- 12 tokens in" in out and "finish_reason=length" in out
    assert "speculation: block size 8, verify steps" in out and "acceptance length tau" in out


def test_generate_block_size_one_and_errors(capsys) -> None:
    assert dflare(["generate", "--random", "--threads", "1", "--max-tokens", "4", "--block-size", "1"]) == 0
    assert "speculation: off (block size 1)" in capsys.readouterr().out
    assert dflare(["generate", "--drafter", "/nonexistent"]) == 2
    assert "--drafter needs --target" in capsys.readouterr().err


@pytest.mark.parametrize("batch", [1, 2])  # 1: the modes alternate prompt by prompt; 2: round by round
def test_bench_engine_writes_side_by_side_json_and_png(tmp_path: Path, capsys, batch: int) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = dflare(
        [
            "bench",
            "engine",
            "--random",
            "--threads",
            "1",
            "--num-prompts",
            "3",
            "--max-tokens",
            "8",
            "--batch",
            str(batch),
            "--rounds",
            "2",
            "--min-draft-confidence",
            "0.02",
            "--out",
            str(out),
            "--plot",
            str(png),
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert set(report["modes"]) == {"ar", "speculative"}
    assert report["modes"]["ar"]["block_size"] == 1 and report["modes"]["speculative"]["block_size"] == 8
    assert report["modes"]["ar"]["output_tokens"] == report["modes"]["speculative"]["output_tokens"] == 24
    ratio = report["modes"]["speculative"]["tokens_per_s"] / report["modes"]["ar"]["tokens_per_s"]
    assert abs(report["speedup"] - ratio) < 0.01
    assert report["modes"]["speculative"]["speculative"]["verify_steps"] > 0
    assert report["alternation"] == ("per prompt (ABBA)" if batch == 1 else "per round")
    assert len(report["modes"]["ar"]["seconds_per_round"]) == 2
    assert 1 <= report["verified_drafts_per_step"] <= 7
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(report["speedup_per_round"]) == 2 and report["speedup_spread"] >= 0
    out_text = capsys.readouterr().out
    assert "speedup (tok/s speculative / AR)" in out_text and "noise: ratio per round" in out_text


def test_bench_engine_writes_under_runs_and_says_one_round_is_unmeasured_noise(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """Issue 19, defect 9: no ``bench_engine.json`` in the current directory without ``--out``, and a
    single round's ratio comes with a word about its noise."""
    monkeypatch.chdir(tmp_path)
    args = ["bench", "engine", "--random", "--threads", "1", "--num-prompts", "1", "--max-tokens", "4"]
    assert dflare([*args, "--rounds", "1"]) == 0
    assert not (tmp_path / "bench_engine.json").exists()
    (written,) = (tmp_path / "runs").glob("bench_engine-*.json")
    assert json.loads(written.read_text())["speedup_spread"] is None
    assert "noise: not measured with one round" in capsys.readouterr().out
    assert dflare([*args, "--rounds", "0"]) == 2


def test_bench_engine_compares_the_policy_with_the_threshold(tmp_path: Path, capsys) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    args = ["bench", "engine", "--random", "--threads", "1", "--num-prompts", "3", "--max-tokens", "8"]
    rc = dflare([*args, "--rounds", "2", "--vs-threshold", "--out", str(out), "--plot", str(png)])
    assert rc == 0
    report = json.loads(out.read_text())
    modes = report["modes"]
    assert set(modes) == {"ar", "policy", "threshold"} and report["min_draft_confidence"] == 0.02
    assert (
        modes["ar"]["output_tokens"]
        == modes["policy"]["output_tokens"]
        == modes["threshold"]["output_tokens"]
    )
    assert modes["policy"]["identical_outputs"] == modes["threshold"]["identical_outputs"] == 3
    cmp = report["policy_vs_threshold"]
    assert cmp["tokens_per_s"] == pytest.approx(
        modes["policy"]["tokens_per_s"] / modes["threshold"]["tokens_per_s"], abs=0.01
    )
    assert len(cmp["per_round"]) == 2
    assert modes["policy"]["verify_policy"]["cost_model"]["block_size"] == 8
    assert "verify_policy" not in modes["threshold"] and 0 < report["policy_start_s"] < 60
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "policy / threshold 0.02" in capsys.readouterr().out


def test_console_script_runs_in_a_fresh_process() -> None:
    exe = Path(sys.executable).with_name("dflare")
    proc = subprocess.run(
        [str(exe), "generate", "--random", "--threads", "1", "--max-tokens", "5", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "speculation: block size 8" in proc.stdout


def test_bench_order_rotates_so_no_engine_is_always_in_the_middle() -> None:
    """Three engines: every engine in every place equally often and none twice in a row (ABC CBA let
    the outer two run twice in a row, warm from themselves, never the middle one); two: ABBA."""
    from sglang_ext.reference.bench import alternation, run_order

    turns = [run_order(["a", "b", "c"], t) for t in range(6)]
    for engine in "abc":
        assert sorted(order.index(engine) for order in turns) == [0, 0, 1, 1, 2, 2]
    sequence = [e for order in turns for e in order]
    assert all(x != y for x, y in itertools.pairwise(sequence))
    assert "".join(e for t in range(2) for e in run_order(["a", "b"], t)) == "abba"
    assert alternation(2) == "per prompt (ABBA)" and alternation(3) == "per prompt (rotated: ABC BCA CAB)"
