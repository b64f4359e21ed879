"""Speculative sampling must follow the target's distribution (exact point-mass speculative sampling).

The expected joint distribution of the first three tokens is computed independently: full forwards of the
transformers model (no cache) with transformers' own temperature / top-k / top-p logits processors. The
engine's samples (one seed per request) are compared with a chi-square test, which must also reject a
wrong reference distribution (it can fail).
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from sglang_ext.dflare.verify_policy import (
    AcceptanceCalibration,
    StepCostModel,
    VerifyPlan,
    VerifyWidthPolicy,
)
from sglang_ext.reference.engine import SpeculativeEngine
from sglang_ext.reference.sampling import SamplingParams, filtered_probs
from sglang_ext.reference.tiny import tiny_drafter

from .distribution import (
    PROMPT,
    chi_square_pvalue,
    expected_joint,
    sample_counts,
    small_target,
)


class GreedyDraftEngine(SpeculativeEngine):
    """Drafts the target's argmax continuation: accepted often, rejected often, both paths exercised.

    Rows verify different numbers of drafts (1..B-1, cycling with the output length), as the adaptive
    draft length makes them do: a row's draws and accepts must not depend on the batch's longest row."""

    def _propose(self, rows: int) -> tuple[torch.Tensor, list[int]]:
        drafts, lengths = [], []
        for s in self._slots[:rows]:
            seq = (*s.req.prompt_ids, *s.output)
            row = []
            for _ in range(self.block_size - 1):
                row.append(_argmax_next(seq))
                seq = (*seq, row[-1])
            drafts.append(row)
            lengths.append(1 + len(s.output) % (self.block_size - 1))
        return torch.tensor(drafts)[:, : max(lengths)], lengths


@functools.cache
def _argmax_next(seq: tuple[int, ...]) -> int:
    with torch.inference_mode():
        return int(small_target()(torch.tensor([seq])).logits[0, -1].argmax())


CASES = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=3),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=0.9, top_k=4, top_p=0.85),
]


@pytest.mark.parametrize("params", CASES, ids=["t1", "t0.7-k3", "t1.3-p0.8", "t0.9-k4-p0.85"])
def test_speculative_sampling_matches_target_distribution(params: SamplingParams) -> None:
    model = small_target()
    engine = GreedyDraftEngine(model, tiny_drafter(model, block_size=3), 3, max_batch=64)
    counts, results = sample_counts(engine, params)
    expected = expected_joint(params)
    assert chi_square_pvalue(counts, expected) > 1e-3
    # both outcomes of the accept test happened (otherwise speculation was not exercised)
    hist = [sum(h) for h in zip(*(r.stats.histogram for r in results), strict=True)]
    assert hist[0] > 100 and hist[1] + hist[2] > 100, hist
    # power: the same samples reject a wrong distribution (unfiltered, other temperature; full support)
    wrong = expected_joint(SamplingParams(temperature=1.0 if params.temperature != 1.0 else 1.6))
    assert chi_square_pvalue(counts, wrong) < 1e-6


def test_real_drafter_sampling_matches_block_size_one() -> None:
    """The real (random) DFlare drafter at B=4 gives the same distribution as the target alone."""
    model = small_target()
    params = SamplingParams(temperature=0.8, top_k=5)
    engine = SpeculativeEngine(model, tiny_drafter(model, block_size=4, seed=3), 4, max_batch=64)
    counts, results = sample_counts(engine, params)
    assert chi_square_pvalue(counts, expected_joint(params)) > 1e-3
    assert sum(r.stats.accepted_tokens for r in results) > 50


def test_filtered_probs_equal_transformers_warpers() -> None:
    g = torch.Generator().manual_seed(0)
    for temperature, top_k, top_p in itertools.product([0.5, 1.0, 1.7], [0, 1, 3, 50], [1.0, 0.9, 0.3]):
        logits = torch.randn(4, 50, generator=g, dtype=torch.float64)
        warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        want = torch.softmax(warpers(None, logits.clone()), dim=-1)
        got = filtered_probs(logits, temperature, top_k, top_p)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_seeded_requests_are_reproducible_and_batch_independent() -> None:
    model = small_target()
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=42)
    solo = SpeculativeEngine(model, tiny_drafter(model, block_size=4), 4, max_batch=1)
    alone = solo.generate([PROMPT], params)
    others = [SamplingParams(temperature=1.0, max_tokens=12, seed=s) for s in (1, 2, 3)]
    batched = SpeculativeEngine(model, tiny_drafter(model, block_size=4), 4, max_batch=4).generate(
        [[1, 2], PROMPT, [5], [6, 6, 6]], [others[0], params, others[1], others[2]]
    )
    assert batched[1].output_ids == alone[0].output_ids


class RecordingPolicy(VerifyWidthPolicy):
    """The real policy, recording the widths it gives (to show the test exercised several)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.widths: Counter = Counter()

    def plan(self, confidences: torch.Tensor) -> VerifyPlan:
        plan = super().plan(confidences)
        self.widths.update(["plain"] if plan.plain_decode else plan.widths)
        return plan


def test_sampling_under_the_verify_policy_matches_block_size_one() -> None:
    """Widths chosen per row and step from a calibration that learns from earlier accepts (so from
    earlier draws) must not bias the samples: same distribution as the target alone."""
    model = small_target()
    # a verified token costs 0.2 % of a decode step per row: widths 0..3 all pay for some confidences
    cost = StepCostModel(
        [(b, b * q, 10.0 + 0.02 * b * (q - 1)) for b in (1, 64) for q in (1, 4)],
        [(b, 4, 2.0) for b in (1, 64)],
    )
    policy = RecordingPolicy(cost, AcceptanceCalibration(), 4, probe_interval=3)
    engine = SpeculativeEngine(model, tiny_drafter(model, block_size=4, seed=3), 4, max_batch=64)
    engine.verify_policy = policy
    params = SamplingParams(temperature=0.8, top_k=5)
    counts, results = sample_counts(engine, params)
    assert chi_square_pvalue(counts, expected_joint(params)) > 1e-3
    assert sum(r.stats.accepted_tokens for r in results) > 50
    assert all(policy.widths[w] > 100 for w in range(4)), policy.widths
    assert chi_square_pvalue(counts, expected_joint(SamplingParams(temperature=1.6))) < 1e-6


def test_seeded_output_is_the_same_at_any_width_block_or_batch() -> None:
    """A position's draw is keyed by (seed, position): block size 1, whole blocks, a fixed threshold and
    the policy's changing widths give one seeded request the same tokens."""
    model = small_target()
    prompts = [PROMPT, [1, 2], [5, 5, 5, 5]]
    params = [SamplingParams(temperature=1.0, max_tokens=16, seed=s) for s in (7, 8, 9)]
    want = [r.output_ids for r in SpeculativeEngine(model, None, 1, max_batch=1).generate(prompts, params)]
    cost = StepCostModel(
        [(b, b * q, 10.0 + 0.02 * b * (q - 1)) for b in (1, 64) for q in (1, 4)],
        [(b, 4, 2.0) for b in (1, 64)],
    )
    engines = [
        SpeculativeEngine(model, tiny_drafter(model, block_size=4, seed=3), 4, max_batch=3),
        SpeculativeEngine(model, tiny_drafter(model, block_size=3, seed=3), 3, max_batch=2),
        SpeculativeEngine(
            model, tiny_drafter(model, block_size=4, seed=3), 4, max_batch=3, min_draft_confidence=0.3
        ),
        SpeculativeEngine(
            model,
            tiny_drafter(model, block_size=4, seed=3),
            4,
            max_batch=3,
            verify_policy=VerifyWidthPolicy(cost, AcceptanceCalibration(), 4),
        ),
    ]
    for engine in engines:
        results = engine.generate(prompts, params)
        assert [r.output_ids for r in results] == want
        assert sum(r.stats.accepted_tokens for r in results) > 0  # drafts were really accepted
    assert len({tuple(w) for w in want}) == 3  # the seeds matter
