"""Adaptive draft length (``min_draft_confidence``): the cut-off rule, and that it stays lossless on the
shipped demo pair while verifying fewer drafts than the whole block."""

from __future__ import annotations

import math

import pytest
import torch

from sglang_ext.reference.engine import CPU_MIN_DRAFT_CONFIDENCE, SpeculativeEngine, confident_drafts
from sglang_ext.reference.sampling import SamplingParams
from sglang_ext.reference.step_profile import measured_policy
from sglang_ext.reference.tiny import tiny_target

demo = pytest.importorskip("sglang_ext.demo")


def test_cut_off_is_the_prefix_the_drafter_believes_in() -> None:
    # per-position top probabilities 0.9, 0.5, 0.9, 0.99: cumulative 0.9, 0.45, 0.405, 0.40
    probs = torch.tensor([[0.9, 0.5, 0.9, 0.99], [0.2, 0.9, 0.9, 0.9], [0.99, 0.99, 0.99, 0.99]])
    vocab = 8
    logits = torch.full((3, 4, vocab), -30.0, dtype=torch.float64)
    top_ids = torch.tensor([[5, 1, 2, 7], [0, 3, 3, 3], [4, 4, 6, 1]])
    for r in range(3):
        for i in range(4):
            p = probs[r, i].item()  # top token gets p, the other 7 share 1 - p
            logits[r, i] = math.log((1 - p) / (vocab - 1))
            logits[r, i, top_ids[r, i]] = math.log(p)
    drafts, lengths = confident_drafts(logits, math.log(0.42))
    assert lengths == [2, 1, 4]  # 0.45 >= 0.42 > 0.405; the first draft is always verified; all sure
    assert torch.equal(drafts, top_ids)  # width = the longest row's length
    drafts, lengths = confident_drafts(logits, math.log(0.95))
    assert lengths == [1, 1, 4] and drafts.shape == (3, 4)
    drafts, lengths = confident_drafts(logits[:2], math.log(0.95))
    assert lengths == [1, 1] and torch.equal(drafts, top_ids[:2, :1])
    drafts, lengths = confident_drafts(logits, -math.inf)  # threshold 0: every draft
    assert lengths == [4, 4, 4] and torch.equal(drafts, top_ids)


def test_threshold_is_checked() -> None:
    with pytest.raises(ValueError, match="min_draft_confidence"):
        SpeculativeEngine(tiny_target(), None, 1, min_draft_confidence=1.5)


_CACHE: dict[str, object] = {}


def _pair():
    if not _CACHE:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from sglang_ext.dflare.checkpoint import load_drafter
        from sglang_ext.training.corpus import load_chats
        from sglang_ext.training.data import render_prompt

        target = AutoModelForCausalLM.from_pretrained(str(demo.target_path()), dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(str(demo.target_path()))
        chats = load_chats(demo.heldout_prompts_path())[:4]
        _CACHE["pair"] = (
            target,
            load_drafter(demo.drafter_path("dflare"), dtype=torch.float32),
            tok,
            [render_prompt(tok, c["messages"][:-1]) for c in chats],
        )
    return _CACHE["pair"]


def test_demo_pair_adaptive_length_is_lossless_and_verifies_fewer_drafts() -> None:
    """4 held-out prompts through 2 rows (rows verify different lengths in one forward), greedy, float32:
    output equals block size 1; the target checks fewer drafts per step than the block has."""
    target, drafter, tok, prompts = _pair()
    params = SamplingParams(max_tokens=40, stop_token_ids=(tok.eos_token_id,))
    want = [r.output_ids for r in SpeculativeEngine(target, None, 1, max_batch=2).generate(prompts, params)]
    engine = SpeculativeEngine(target, drafter, 8, max_batch=2, min_draft_confidence=CPU_MIN_DRAFT_CONFIDENCE)
    results = engine.generate(prompts, params)
    assert [r.output_ids for r in results] == want
    steps = sum(r.stats.verify_steps for r in results)
    accepted = sum(r.stats.accepted_tokens for r in results)
    assert accepted > steps  # the drafter really drafts (tau > 2 on these prompts)
    assert steps <= engine.verified_drafts < 0.8 * steps * 7  # at least one draft a step, well below B - 1
    # each request's stats count the drafts the target checked, so its acceptance rate is accepted / checked
    assert sum(r.stats.draft_tokens for r in results) == engine.verified_drafts
    assert all(r.stats.acceptance_rate <= 1.0 for r in results)
    full = SpeculativeEngine(target, drafter, 8, max_batch=2)  # threshold 0: the whole block
    full_results = full.generate(prompts, params)
    assert [r.output_ids for r in full_results] == want
    assert full.verified_drafts == 7 * sum(r.stats.verify_steps for r in full_results)
    assert all(r.stats.verified_drafts is None for r in full_results)  # whole blocks: the SGLang form


def test_demo_pair_under_the_measured_policy_is_lossless_and_learns() -> None:
    """The CPU default on the shipped pair: 4 held-out prompts through 2 rows, greedy, float32, equal to
    block size 1; the calibration saw the target's accepts."""
    target, drafter, tok, prompts = _pair()
    params = SamplingParams(max_tokens=40, stop_token_ids=(tok.eos_token_id,))
    want = [r.output_ids for r in SpeculativeEngine(target, None, 1, max_batch=2).generate(prompts, params)]
    engine = SpeculativeEngine(target, drafter, 8, max_batch=2)
    engine.verify_policy = measured_policy(engine)
    results = engine.generate(prompts, params)
    assert [r.output_ids for r in results] == want
    assert engine.verify_policy.calibration.observations > 0
    assert sum(r.stats.draft_tokens for r in results) == engine.verified_drafts
