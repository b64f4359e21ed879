"""Greedy speculative decoding must equal the target's greedy ``generate`` token for token."""

from __future__ import annotations

import pytest

from sglang_ext.reference.engine import SpeculativeEngine
from sglang_ext.reference.step_profile import measured_policy
from sglang_ext.reference.tiny import tiny_drafter

from .helpers import greedy_mismatches, oracle_run, prompts_for, target

N_TOKENS = 24


@pytest.mark.parametrize("kind", ["dflare", "dflash"])
@pytest.mark.parametrize("block_size", [1, 2, 4, 16])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_drafter_greedy_equals_generate(kind: str, block_size: int, batch: int, seed: int) -> None:
    model = target(seed)
    drafter = tiny_drafter(model, kind=kind, block_size=block_size, seed=seed + 7)
    # 6 prompts through `batch` rows: with batch 4, requests join as others leave (continuous batching)
    engine = SpeculativeEngine(model, drafter, block_size, max_batch=batch)
    assert greedy_mismatches(engine, seed, prompts_for(seed, 6 if batch > 1 else 3), N_TOKENS) == []


@pytest.mark.parametrize("block_size", [2, 4, 16])
@pytest.mark.parametrize("batch", [1, 4])
def test_oracle_drafter_covers_every_accept_length(block_size: int, batch: int) -> None:
    """Drafts = the target's greedy tokens with one position corrupted: every accept length 0..B-1 and
    the KV trimming after each occur, and the output still equals generate's."""
    mismatches, results = oracle_run(block_size, batch)
    assert mismatches == []
    assert all(r.finish_reason == "length" for r in results)
    hist = [sum(h) for h in zip(*(r.stats.histogram for r in results), strict=True)]
    assert all(count > 0 for count in hist), f"accept lengths not all exercised: {hist}"


@pytest.mark.parametrize("kind", ["dflare", "dflash"])
@pytest.mark.parametrize("block_size", [2, 4, 16])
@pytest.mark.parametrize("batch", [1, 4])
def test_measured_verify_policy_greedy_equals_generate(kind: str, block_size: int, batch: int) -> None:
    """``--verify-policy``: widths (and plain steps) chosen from this machine's profiled costs."""
    seed = 1
    model = target(seed)
    drafter = tiny_drafter(model, kind=kind, block_size=block_size, seed=seed + 7)
    engine = SpeculativeEngine(model, drafter, block_size, max_batch=batch)
    engine.verify_policy = measured_policy(engine)
    assert greedy_mismatches(engine, seed, prompts_for(seed, 6 if batch > 1 else 3), N_TOKENS) == []
