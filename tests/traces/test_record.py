"""Recording traces through the reference engine on a tiny random pair: the recorded steps are the engine's
own (SpecStats agrees), the confidences are the drafter's top-1 probabilities, and observing changes no
output."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sglang_ext.reference.engine import SpeculativeEngine
from sglang_ext.reference.sampling import SamplingParams
from sglang_ext.reference.target import TargetRunner
from sglang_ext.reference.tiny import tiny_drafter, tiny_target
from sglang_ext.traces.format import AcceptanceTrace
from sglang_ext.traces.record import record_trace

ROOT = Path(__file__).resolve().parents[2]
VOCAB, BLOCK = 6, 4  # a tiny vocabulary: a random drafter is right often enough to accept 0..3 drafts


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    target = tiny_target(vocab_size=VOCAB, hidden_size=32, num_heads=4, num_kv_heads=2, dtype=torch.float64)
    return target, tiny_drafter(target, block_size=BLOCK)


def _prompts(count: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB - 1, (n,), generator=g).tolist() for n in [3, 9, 1, 6, 12, 4][:count]]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_recorded_steps_equal_the_engines_stats(pair, temperature: float) -> None:
    target, drafter = pair
    params = [SamplingParams(temperature=temperature, max_tokens=40, seed=i) for i in range(6)]
    trace, results = record_trace(target, drafter, _prompts(6), params, batch=3, progress=False)
    assert trace.block_size == BLOCK and trace.temperature == temperature
    assert len(trace.requests) == len(results) == 6
    for steps, res in zip(trace.requests, results, strict=True):
        assert res.stats is not None
        histogram = [0] * BLOCK
        for s in steps:
            histogram[s.accepted] += 1
        assert histogram == res.stats.histogram
        assert res.stats.draft_tokens == len(steps) * (BLOCK - 1)  # the whole block verified every step
    accepted = [s.accepted for steps in trace.requests for s in steps]
    assert max(accepted) >= 2 and min(accepted) == 0  # the comparison above saw real acceptance


def test_confidences_are_the_drafters_top1_probabilities(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """The LM head applied to the drafter's B-1 block positions gives the draft logits (verify passes give
    B positions, prefill 1): their softmax maxima, in call order, must be the trace's confidences."""
    target, drafter = pair
    draft_logits: list[torch.Tensor] = []
    original = TargetRunner.logits

    def spy(self: TargetRunner, hidden: torch.Tensor) -> torch.Tensor:
        out = original(self, hidden)
        if out.dim() == 3 and out.shape[1] == BLOCK - 1:
            draft_logits.append(out.clone())
        return out

    monkeypatch.setattr(TargetRunner, "logits", spy)
    params = [SamplingParams(max_tokens=24)] * 2
    trace, _ = record_trace(target, drafter, _prompts(2), params, batch=1, progress=False)
    expected = [row for logits in draft_logits for row in torch.softmax(logits, -1).amax(-1).tolist()]
    recorded = [s.confidences for steps in trace.requests for s in steps]
    assert len(recorded) == len(expected) > 10
    for got, want in zip(recorded, expected, strict=True):
        assert got == pytest.approx(want, abs=5e-5)  # 4 decimals
    assert min(min(c) for c in recorded) >= 1 / VOCAB - 1e-4


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_observer_changes_no_output(pair, temperature: float) -> None:
    target, drafter = pair
    params = [SamplingParams(temperature=temperature, max_tokens=30, seed=3 + i) for i in range(4)]
    seen: list[int] = []
    plain = SpeculativeEngine(target, drafter, max_batch=2).generate(_prompts(4), params)
    observed = SpeculativeEngine(
        target, drafter, max_batch=2, step_observer=lambda obs: seen.extend(obs.accepted)
    ).generate(_prompts(4), params)
    assert [r.output_ids for r in observed] == [r.output_ids for r in plain]
    assert len(seen) == sum(r.stats.verify_steps for r in plain)


def test_one_temperature_per_trace(pair) -> None:
    target, drafter = pair
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)]
    with pytest.raises(ValueError, match="one temperature per trace"):
        record_trace(target, drafter, _prompts(2), params, progress=False)


def test_cli_records_the_random_pair(tmp_path: Path) -> None:
    out = tmp_path / "random.json.gz"
    cmd = [sys.executable, "-m", "sglang_ext.cli", "trace", "record", "--random", "--threads", "1"]
    cmd += ["--num-prompts", "2", "--first-prompt", "3", "--max-tokens", "16", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert done.returncode == 0, done.stderr
    trace = AcceptanceTrace.load(out)
    assert (trace.source, trace.block_size, trace.temperature) == ("random", 8, 0.0)
    assert len(trace.requests) == 2 and all(trace.requests)
    assert trace.meta["prompt_indices"] == [3, 4] and trace.meta["generated_tokens"] == 32
