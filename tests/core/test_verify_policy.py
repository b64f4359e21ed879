"""The verify-width policy (sglang_ext.dflare.verify_policy): cost model, calibration, and the plans it
makes at the extremes (verify free, verify too dear) and in between (optimal against brute force)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sglang_ext.dflare.verify_policy import (
    AcceptanceCalibration,
    StepCostModel,
    VerifyPlan,
    VerifyWidthPolicy,
)

BLOCK = 8


def linear_cost(
    base: float, per_token: float, draft: float = 1.0, decode: float | None = None, batches=(1, 64)
) -> StepCostModel:
    """verify = base + per_token * (tokens - batch) at every measured batch: exactly linear, so the
    interpolated model is known in closed form."""
    verify = [(b, b * (k + 1), base + per_token * b * k) for b in batches for k in (0, 3, BLOCK - 1)]
    drafts = [(b, blk, draft * blk / BLOCK) for b in batches for blk in (2, BLOCK)]
    decodes = [(b, base if decode is None else decode) for b in batches]
    return StepCostModel(verify, drafts, decodes, device="test", model="linear", block_size=BLOCK)


def calibrated(prior_strength: float = 1e-6) -> AcceptanceCalibration:
    """A calibration that predicts the drafter's confidence (the bin's centre) until it observes."""
    return AcceptanceCalibration(bins=20, prior_strength=prior_strength)


# ---- cost model -----------------------------------------------------------------------------------------


def test_cost_model_interpolates_and_extrapolates() -> None:
    cost = StepCostModel(
        verify=[(1, 1, 1.0), (1, 8, 2.0), (4, 4, 2.0), (4, 32, 6.0)],
        draft=[(1, 4, 0.5), (1, 16, 1.1), (4, 16, 2.0)],
        decode=[(1, 0.9), (4, 1.8)],
    )
    assert cost.verify_ms(1, 4) == pytest.approx(1.0 + 3 / 7)  # linear in tokens between points
    assert cost.verify_ms(1, 15) == pytest.approx(2.0 + 7 / 7)  # past the last point: the last segment
    # batch 2, 8 tokens = 4 per request: batch 1 at 4 tokens (1 + 3/7) and batch 4 at 16 (2 + 12 * 4/28)
    at1, at4 = 1.0 + 3 / 7, 2.0 + 12 * 4 / 28
    assert cost.verify_ms(2, 8) == pytest.approx(at1 + (at4 - at1) / 3)
    # beyond the largest batch: continues upwards at the same tokens per request
    assert cost.verify_ms(8, 8) > cost.verify_ms(4, 4)
    assert cost.draft_ms(1, 8) == pytest.approx(0.5 + 0.6 * 4 / 12)  # linear in the block
    # block 4 was measured at batch 1 only (flat over batches), block 16 at batch 4 costs 2.0: linear between
    assert cost.draft_ms(4, 8) == pytest.approx(0.5 + 1.5 * 4 / 12)
    # tables of two blocks measured at different batches (the shipped block-8 and block-16 tables merged):
    # block 16 at batch 32 follows block 16's own curve, not block 8's only point at batch 32
    merged = StepCostModel(
        verify=[(1, 1, 1.0)], draft=[(1, 8, 1.7), (32, 8, 2.2), (128, 8, 6.1), (1, 16, 1.8), (128, 16, 11.4)]
    )
    assert merged.draft_ms(32, 16) == pytest.approx(1.8 + 9.6 * 31 / 127)
    assert merged.draft_ms(32, 8) == pytest.approx(2.2) and merged.draft_ms(128, 12) == pytest.approx(8.75)
    assert cost.decode_ms(2) == pytest.approx(0.9 + 0.9 / 3)
    no_decode = StepCostModel(verify=[(1, 1, 1.5), (1, 8, 2.0)], draft=[(1, 8, 0.3)])
    assert no_decode.decode_ms(1) == pytest.approx(1.5)  # a decode is a verify of the bonus token only
    assert no_decode.verify_ms(3, 3) == pytest.approx(1.5 + 0.5 * 2 / 7)  # one batch: by total tokens
    with pytest.raises(ValueError, match="verify and draft"):
        StepCostModel(verify=[], draft=[(1, 8, 0.3)])


def test_a_noisy_profile_becomes_a_non_decreasing_cost() -> None:
    # a shared machine made the 2- and 3-token forwards look dearer than the 8-token one
    cost = StepCostModel(
        verify=[(1, 1, 5.0), (1, 2, 9.0), (1, 3, 8.0), (1, 4, 6.0), (1, 8, 7.0)], draft=[(1, 8, 1)]
    )
    values = [cost.verify_ms(1, t) for t in range(1, 9)]
    assert values == sorted(values)  # never cheaper to verify more
    assert cost.verify_ms(1, 1) == pytest.approx(5.0)
    assert cost.verify_ms(1, 2) == pytest.approx(7.5)  # 9, 8, 6, 7 pooled: their mean
    assert cost.verify_ms(1, 8) == pytest.approx(7.5)
    # so a policy reading it verifies no more than the costs justify (here: the whole block is not free)
    policy = VerifyWidthPolicy(cost, calibrated(), BLOCK)
    assert policy.plan(torch.full((1, BLOCK - 1), 0.2)).widths[0] < BLOCK - 1


def test_cost_model_json_round_trip(tmp_path: Path) -> None:
    cost = linear_cost(10.0, 0.25, draft=2.0)
    path = tmp_path / "cost.json"
    cost.to_json(path)
    data = path.read_text()
    assert '"device": "test"' in data and '"model": "linear"' in data and '"block_size": 8' in data
    back = StepCostModel.from_json(path)
    assert (back.device, back.model, back.block_size) == ("test", "linear", BLOCK)
    for batch in (1, 7, 64, 200):
        for tokens in (batch, 3 * batch, BLOCK * batch):
            assert back.verify_ms(batch, tokens) == pytest.approx(cost.verify_ms(batch, tokens))
        assert back.draft_ms(batch, 5) == pytest.approx(cost.draft_ms(batch, 5))
        assert back.decode_ms(batch) == pytest.approx(cost.decode_ms(batch))
    assert back.verify_ms(64, 64 * 4) == pytest.approx(10.0 + 0.25 * 64 * 3)


# ---- calibration ----------------------------------------------------------------------------------------


def test_observe_counts_accepted_positions_and_the_first_rejection_only() -> None:
    cal = AcceptanceCalibration(bins=4, prior_strength=1e-9)
    conf = torch.tensor([[0.1, 0.4, 0.6, 0.9], [0.9, 0.9, 0.9, 0.9]])
    # row 0: width 3, accepted 1 -> position 1 (bin 0) hit, position 2 (bin 1) miss, 3 and 4 unseen
    # row 1: width 2, accepted 2 -> positions 1, 2 (bin 3) hits; nothing rejected was verified
    cal.observe(conf, [3, 2], torch.tensor([1, 2]))
    p = cal.predict(torch.tensor([0.05, 0.3, 0.6, 0.95]))
    # each bin corrects a confidence by what it observed: bin 0 saw 0.1 accepted (+0.9), bin 1 saw 0.4
    # rejected (-0.4), bin 3 saw 0.9 accepted twice (+0.1); estimates stay probabilities
    assert p.tolist()[:2] == pytest.approx([0.95, 0.0], abs=1e-6) and float(p[3]) == pytest.approx(1.0)
    # bin 2 never observed: the confidence shifted by the drafter's mean miscalibration so far
    assert p[2] == pytest.approx(0.6 + (3 - (0.1 + 0.4 + 0.9 + 0.9)) / 4)
    assert cal.predict(torch.tensor([0.0]))[0] == pytest.approx(0.9)  # resolution kept inside a bin
    assert cal.observations == 4
    rates = cal.position_rates(4)
    assert rates[0] == pytest.approx(1.0) and rates[1] == pytest.approx(0.5)
    assert rates[3] == pytest.approx(cal.prior_rate)  # position 4 never observed


def test_unobserved_bins_follow_the_drafters_miscalibration() -> None:
    """A drafter that says 0.6 and is right 95 % of the time is underconfident; a bin the policy never
    verifies (0.15) is not left at its word."""
    cal = AcceptanceCalibration()
    gen = torch.Generator().manual_seed(4)
    for _ in range(20):
        hits = torch.rand(8, 3, generator=gen) < 0.95
        cal.observe(torch.full((8, 3), 0.6), [3] * 8, torch.cumprod(hits.long(), dim=1).sum(1))
    assert float(cal.predict(torch.tensor([0.15]))[0]) > 0.4
    assert float(cal.predict(torch.tensor([0.6]))[0]) == pytest.approx(0.95, abs=0.05)


def test_the_same_confidence_means_more_at_the_first_position() -> None:
    cal = AcceptanceCalibration()
    gen = torch.Generator().manual_seed(5)
    for _ in range(
        40
    ):  # drafter says 0.5 at both positions; the target takes 90 % of first drafts, 20 % of second
        first = torch.rand(16, generator=gen) < 0.9
        second = first & (torch.rand(16, generator=gen) < 0.2)
        cal.observe(torch.full((16, 2), 0.5), [2] * 16, first.long() + second.long())
    p = cal.predict(torch.full((3, 2), 0.5))
    assert p[:, 0].tolist() == pytest.approx([0.9] * 3, abs=0.06)
    assert p[:, 1].tolist() == pytest.approx([0.2] * 3, abs=0.08)


def _simulate(cal: AcceptanceCalibration, rate: float, steps: int, gen: torch.Generator) -> list[float]:
    """Requests whose drafter says ~0.9 while the target accepts each draft with ``rate``; returns the
    prediction at confidence 0.9 after every step."""
    out = []
    for _ in range(steps):
        conf = 0.86 + 0.08 * torch.rand(16, BLOCK - 1, generator=gen)
        hits = torch.rand(16, BLOCK - 1, generator=gen) < rate
        accepted = torch.cumprod(hits.long(), dim=1).sum(1)
        cal.observe(conf, [BLOCK - 1] * 16, accepted)
        out.append(float(cal.predict(torch.tensor([0.9]))[0]))
    return out


def test_calibration_follows_a_shift() -> None:
    gen = torch.Generator().manual_seed(0)
    cal = AcceptanceCalibration(half_life=300)
    before = _simulate(cal, 0.9, 60, gen)
    assert before[-1] == pytest.approx(0.9, abs=0.05)  # learnt the drafter is right 9 times in 10
    settled = cal.calibration_error()
    assert settled < 0.05
    after = _simulate(cal, 0.4, 60, gen)  # the workload shifts: the same confidence now means 0.4
    assert after[0] > 0.75  # one step is not enough evidence to forget the past
    assert after[-1] == pytest.approx(0.4, abs=0.06)  # followed within 60 steps (~half-lives of evidence)
    shifted = [s for s in range(60) if after[s] < 0.5]
    assert shifted and shifted[0] < 40
    assert cal.confidence_error() > 0.3  # the raw confidences are now far off; the calibration is not
    # a calibration that never forgets would still be far away
    slow = AcceptanceCalibration(half_life=1e9)
    gen = torch.Generator().manual_seed(0)
    _simulate(slow, 0.9, 60, gen)
    assert _simulate(slow, 0.4, 60, gen)[-1] > 0.6


def test_calibration_error_rises_when_beliefs_are_wrong() -> None:
    gen = torch.Generator().manual_seed(1)
    honest = calibrated(prior_strength=4.0)
    _simulate(honest, 0.9, 30, gen)  # the drafter says ~0.9 and is right 90 % of the time
    liar = calibrated(prior_strength=4.0)
    conf = torch.full((16, BLOCK - 1), 0.9)
    liar.observe(conf, [BLOCK - 1] * 16, torch.zeros(16, dtype=torch.long))  # all first drafts rejected
    assert liar.calibration_error() > 0.7 > 0.1 > honest.calibration_error()


# ---- the policy -----------------------------------------------------------------------------------------


def _policy(cost: StepCostModel, ragged: bool = True, **kw) -> VerifyWidthPolicy:
    """A policy that judges drafting from its first drafted step on (``min_history=1``)."""
    return VerifyWidthPolicy(cost, calibrated(), BLOCK, ragged=ragged, **{"min_history": 1, **kw})


@pytest.mark.parametrize("ragged", [True, False])
def test_whole_block_when_verifying_is_nearly_free(ragged: bool) -> None:
    policy = _policy(linear_cost(10.0, 1e-7, draft=0.5), ragged)  # even a 0.2 ** 7 chance pays
    conf = torch.tensor([[0.95, 0.9, 0.6, 0.5, 0.3, 0.2, 0.1]] * 3 + [[0.2] * 7])
    plan = policy.plan(conf)
    assert not plan.plain_decode and plan.draft_block == BLOCK
    assert plan.widths == [BLOCK - 1] * 4


@pytest.mark.parametrize("ragged", [True, False])
def test_plain_decode_when_verifying_costs_more_than_it_can_win(ragged: bool) -> None:
    # a verified token costs as much as a decode step: even sure drafts cannot pay for the draft forward
    policy = _policy(linear_cost(10.0, 10.0, draft=2.0), ragged)
    plan = policy.plan(torch.full((4, BLOCK - 1), 0.97))
    assert plan.plain_decode and plan.widths == [0] * 4
    assert plan.expected_tokens == 4 and plan.expected_ms == pytest.approx(2.0 + 10.0)  # the draft was paid
    before = policy.plan_for_batch(4)  # so the next step does not draft at all
    assert before.plain_decode and before.expected_ms == pytest.approx(10.0)
    # the same prices with a drafter that is usually right, and verifying cheap: speculate
    cheap = _policy(linear_cost(10.0, 0.5, draft=2.0), ragged)
    assert not cheap.plan(torch.full((4, BLOCK - 1), 0.97)).plain_decode


@pytest.mark.parametrize("ragged", [True, False])
def test_a_paid_draft_is_verified_where_it_beats_plain_decoding(ragged: bool) -> None:
    # the draft costs 6 decode steps: drafting does not pay, but once drafted, sure drafts are worth checking
    policy = _policy(linear_cost(10.0, 1.0, draft=60.0), ragged)
    plan = policy.plan(torch.full((4, BLOCK - 1), 0.97))
    assert not plan.plain_decode and plan.widths == [BLOCK - 1] * 4
    assert plan.tokens_per_ms < 4 / 10.0  # a worse rate than plain decoding, counting the draft
    assert policy.plan_for_batch(4).plain_decode  # so the next steps decode plainly
    assert policy.plan(torch.full((4, BLOCK - 1), 0.1)).plain_decode  # hopeless drafts: none verified


def test_more_width_to_confident_requests() -> None:
    policy = _policy(linear_cost(10.0, 1.5, draft=1.0))
    conf = torch.tensor([[0.97] * 7, [0.8] * 7, [0.45] * 7, [0.1] * 7])
    plan = policy.plan(conf)
    assert not plan.plain_decode
    w = plan.widths
    assert w[0] > w[1] > w[2] >= w[3] and w[0] >= 4  # width follows the drafter's belief
    # a padded engine cannot give rows different widths: one width for all, the best such one
    padded = _policy(linear_cost(10.0, 1.5, draft=1.0), ragged=False).plan(conf)
    assert len(set(padded.widths)) == 1


def _rate(widths: tuple[int, ...], q: torch.Tensor, cost: StepCostModel) -> float:
    bs = q.shape[0]
    tokens = bs + sum(float(q[i, :k].sum()) for i, k in enumerate(widths))
    return tokens / (cost.draft_ms(bs, BLOCK) + cost.verify_ms(bs, bs + sum(widths)))


def _value(widths: tuple[int, ...], q: torch.Tensor, cost: StepCostModel, rate: float) -> float:
    bs = q.shape[0]
    tokens = bs + sum(float(q[i, :k].sum()) for i, k in enumerate(widths))
    return tokens - rate * cost.verify_ms(bs, bs + sum(widths))


def test_plan_is_the_best_allocation_found_by_brute_force() -> None:
    """Widths give the step the best rate, tokens / (draft + verify ms), over every allocation; with a
    draft so dear that plain decoding's rate R is better, the draft is sunk and the widths maximise
    tokens - R x verify ms over every allocation."""
    gen = torch.Generator().manual_seed(3)
    # a concave verify cost (cheap first tokens, dearer later), so neither extreme is optimal
    verify = [(3, 3, 10.0), (3, 6, 10.6), (3, 9, 12.5), (3, 15, 18.0), (3, 24, 30.0)]
    cost = StepCostModel(verify, draft=[(3, BLOCK, 1.5)], decode=[(3, 9.5)])
    dear = StepCostModel(verify, draft=[(3, BLOCK, 40.0)], decode=[(3, 9.5)])
    allocations = list(itertools.product(range(BLOCK), repeat=3))
    checked_sunk = 0
    for _ in range(5):
        conf = torch.rand(3, BLOCK - 1, generator=gen) ** 0.3
        policy = _policy(cost)
        plan = policy.plan(conf)
        q = policy.calibration.predict(conf).cumprod(1)
        best_ratio = max(_rate(w, q, cost) for w in allocations)
        assert best_ratio > 3 / 9.5  # better than plain decoding: the best-rate allocation
        assert _rate(tuple(plan.widths), q, cost) == pytest.approx(best_ratio, rel=1e-9)
        sunk = _policy(dear).plan(conf)
        if max(_rate(w, q, dear) for w in allocations) < 3 / 9.5:
            checked_sunk += 1
            best = max(_value(w, q, dear, 3 / 9.5) for w in allocations)
            assert _value(tuple(sunk.widths), q, dear, 3 / 9.5) == pytest.approx(best, rel=1e-9)
    assert checked_sunk == 5


def _drafting(policy: VerifyWidthPolicy, confidences: torch.Tensor, steps: int) -> list[int]:
    """``steps`` steps as an engine runs them: plan_for_batch names the block, the drafter drafts it (the
    first block - 1 of ``confidences``' columns), plan() plans its verify. The blocks drafted."""
    blocks = []
    for _ in range(steps):
        before = policy.plan_for_batch(confidences.shape[0])
        if before.plain_decode:
            blocks.append(0)
            continue
        plan = policy.plan(confidences[:, : before.draft_block - 1])
        assert plan.draft_block == before.draft_block  # plan() plans the step that was drafted
        assert max(plan.widths) <= before.draft_block - 1
        blocks.append(before.draft_block)
    return blocks


def _short_block_cost() -> StepCostModel:
    """The whole block's draft is dear: a shorter one pays unless its tail is nearly sure."""
    return StepCostModel(
        verify=[(2, 2, 5.0), (2, 16, 5.5)], draft=[(2, 4, 0.5), (2, BLOCK, 3.0)], decode=[(2, 5.0)]
    )


def test_shorter_draft_block_when_its_cheaper_draft_pays() -> None:
    unsure_tail = torch.tensor([[0.95, 0.9, 0.85, 0.2, 0.1, 0.1, 0.1]] * 2)
    policy = VerifyWidthPolicy(_short_block_cost(), calibrated(), BLOCK, draft_blocks=[4, BLOCK])
    blocks = _drafting(policy, unsure_tail, 80)[20:]
    assert blocks.count(4) >= 0.9 * len(blocks)  # the longest block only as a probe, every 16 short drafts
    assert BLOCK in blocks and all(b == 4 for b in blocks[blocks.index(BLOCK) + 1 :][:16])
    not_offered = VerifyWidthPolicy(_short_block_cost(), calibrated(), BLOCK)
    assert set(_drafting(not_offered, unsure_tail, 40)) == {BLOCK}  # keeps the configured block
    sure = torch.full((2, BLOCK - 1), 0.99)
    policy = VerifyWidthPolicy(_short_block_cost(), calibrated(), BLOCK, draft_blocks=[4, BLOCK])
    assert set(_drafting(policy, sure, 40)[-20:]) == {BLOCK}


def test_a_shorter_draft_block_is_left_when_the_tail_becomes_worth_drafting() -> None:
    # drafting 4 shows nothing of positions 4..7: the longest block is drafted now and then to see them
    policy = VerifyWidthPolicy(
        _short_block_cost(), calibrated(), BLOCK, draft_blocks=[4, BLOCK], history=32, block_probe_interval=8
    )
    _drafting(policy, torch.tensor([[0.95, 0.9, 0.85, 0.2, 0.1, 0.1, 0.1]] * 2), 40)
    blocks = _drafting(policy, torch.full((2, BLOCK - 1), 0.99), 80)
    assert blocks[0] == 4 and BLOCK in blocks[:9]  # a probe within 8 short drafts in a row
    assert blocks[-20:].count(BLOCK) >= 19  # block 4 at most as a cost probe, once in 64 drafted steps


def test_every_allowed_block_is_drafted_now_and_then_so_its_costs_stay_measured() -> None:
    """The whole block pays (sure drafts): after cost_probe_interval drafted steps in a row on it, one step
    drafts each other allowed block in turn (its costs would otherwise never be measured again), then the
    policy goes back."""
    policy = VerifyWidthPolicy(
        _short_block_cost(), calibrated(), BLOCK, draft_blocks=[2, 4, BLOCK], cost_probe_interval=10
    )
    blocks = _drafting(policy, torch.full((2, BLOCK - 1), 0.99), 80)
    settled = blocks[blocks.index(BLOCK) :]  # a cold start explores block 4 first
    probes = [b for b in settled if b != BLOCK]
    assert set(probes) == {2, 4} and len(probes) <= len(settled) // 10
    first = settled.index(probes[0])
    assert settled[first + 1 : first + 11] == [BLOCK] * 10  # back at once, for another 10 in a row


def _blocks_at_batch_128_after_two_compiles(outlier_run: int) -> list[int]:
    """The blocks an adaptive block-8 server allowed to draft block 4 drafts on the shipped H100 costs and
    the synthetic trace: 100 steps at batch 16 (block 8 pays), then 300 at batch 128 (block 4 pays), where
    its first two block-4 steps take 10x their cost, as a new shape's first eager draft does while kernels
    compile. Each step is timed at the shipped costs, the policy learning from it as in the plugin."""
    from sglang_ext.sglang_plugin.adaptive import load_cost_table
    from sglang_ext.traces.format import accepted_in_window
    from sglang_ext.traces.shipped import load_shipped_trace

    cost, shorter = load_cost_table("NVIDIA H100 80GB HBM3", 8, [4])
    assert cost is not None and shorter == [4]
    true = StepCostModel.from_dict(cost.to_dict())
    cost.OUTLIER_RUN = outlier_run
    policy = VerifyWidthPolicy(cost, AcceptanceCalibration(), 8, draft_blocks=[4, 8])
    requests = load_shipped_trace("synthetic").requests
    rng = np.random.default_rng(0)
    blocks = []
    for batch, steps in ((16, 100), (128, 300)):
        cursors = [[int(rng.integers(len(requests))), int(rng.integers(64))] for _ in range(batch)]
        compiles, blocks = 2, []
        for _ in range(steps):
            now = [requests[r][s % len(requests[r])] for r, s in cursors]
            drafted = policy.plan_for_batch(batch).draft_block
            confidences = torch.tensor([s.confidences[: drafted - 1] for s in now], dtype=torch.float64)
            widths = policy.plan(confidences).widths
            accepted = [accepted_in_window(s, w) for s, w in zip(now, widths, strict=True)]
            tokens = batch + sum(widths)
            ms = true.draft_ms(batch, drafted) + true.verify_ms(batch, tokens)
            if drafted == 4 and compiles:
                ms, compiles = 10 * ms, compiles - 1
            policy.calibration.observe(confidences, widths, accepted)
            policy.observe_step(batch, tokens, ms, draft_block=drafted)
            blocks.append(drafted)
            for cursor in cursors:
                cursor[1] += 1
    return blocks


def test_two_slow_first_steps_of_a_block_do_not_rule_it_out() -> None:
    """A step over 3x its cell's estimate teaches nothing until the third in a row: the policy keeps
    drafting block 4 at batch 128. Learnt (clipped to 2x, as before), the two compile steps made block 4
    look dear for good, and only the cost probes drafted it again (an H100 server drafted block 8 at
    batch 128 throughout, its steps committing 16 % fewer tokens per ms than block 4's)."""
    assert _blocks_at_batch_128_after_two_compiles(outlier_run=3).count(4) >= 0.85 * 300
    assert _blocks_at_batch_128_after_two_compiles(outlier_run=1).count(4) <= 0.15 * 300


def test_the_draft_block_is_chosen_for_per_request_widths_not_for_the_mean_request() -> None:
    """Half the requests sure of every draft, half hopeless: verifying each request its own width, the whole
    block pays (the sure half verifies all 7: 34.9 tokens in 14.5 ms, against 19.8 in 8.7 ms at block 4).
    Judged by the mean request's acceptance, as if every request verified one width, block 4 looks better."""
    mixed = torch.tensor([[0.99] * 7] * 4 + [[0.05] * 7] * 4, dtype=torch.float64)

    def cost() -> StepCostModel:
        return StepCostModel(verify=[(8, 8, 5.0), (8, 64, 20.0)], draft=[(8, 4, 0.5), (8, BLOCK, 2.0)])

    policy = VerifyWidthPolicy(cost(), calibrated(), BLOCK, draft_blocks=[4, BLOCK])
    assert set(_drafting(policy, mixed, 48)[-12:]) == {BLOCK}

    class MeanRequest(VerifyWidthPolicy):
        HISTORY_GROUPS = 1

    assert set(
        _drafting(MeanRequest(cost(), calibrated(), BLOCK, draft_blocks=[4, BLOCK]), mixed, 48)[-12:]
    ) == {4}


def test_plan_for_batch_uses_the_prior_then_recent_plans_and_probes() -> None:
    cost = linear_cost(10.0, 0.3, draft=1.0)
    cal = AcceptanceCalibration(prior_rate=0.8)
    policy = VerifyWidthPolicy(cost, cal, BLOCK, probe_interval=3, min_history=1)
    first = policy.plan_for_batch(4)  # nothing known: a cold start drafts, as wide as the prior rates say
    assert isinstance(first, VerifyPlan) and not first.plain_decode and len(set(first.widths)) == 1
    assert first.widths[0] > 1
    cold = policy.plan(torch.full((4, BLOCK - 1), 0.03))  # hopeless drafts, but the first are verified
    assert not cold.plain_decode and min(cold.widths) >= 1
    assert policy.plan(torch.full((4, BLOCK - 1), 0.03)).plain_decode  # hopeless again: none verified
    plans = [policy.plan_for_batch(4) for _ in range(40)]
    # a probe once the plain plans in a row reach 3 x the probe's cost in plain steps, then plain again
    probe = next(i for i, p in enumerate(plans) if not p.plain_decode)
    ratio = plans[probe].expected_ms / policy.plain_ms(4)
    assert ratio > 1.05  # the drafted step costs more than a plain one: probes come less often
    assert probe + 1 == math.ceil(3 * ratio)  # the plain plan before these counted too
    assert plans[probe].extra.get("probe") and plans[probe].widths[0] > 0
    assert all(p.plain_decode for p in plans[probe + 1 : probe + 3])
    policy.plan_for_batch(4)
    probed = policy.plan(torch.full((4, BLOCK - 1), 0.03))  # the probe's draft: verified, not skipped
    assert not probed.plain_decode and min(probed.widths) >= 1
    assert policy.plan(torch.full((4, BLOCK - 1), 0.03)).plain_decode  # after the probe: plain again


def test_plan_at_batch_256_block_16_is_well_formed() -> None:
    cost = StepCostModel(
        verify=[(b, b * (k + 1), 5.0 + 0.01 * b * k) for b in (1, 256) for k in (0, 7, 15)],
        draft=[(b, 16, 1.0 + 0.01 * b) for b in (1, 256)],
        decode=[(1, 5.0), (256, 9.0)],
    )
    policy = VerifyWidthPolicy(cost, AcceptanceCalibration(), 16)
    conf = torch.rand(256, 15, generator=torch.Generator().manual_seed(0))
    plan = policy.plan(conf)
    assert len(plan.widths) == 256 and all(0 <= w <= 15 for w in plan.widths)
    assert math.isfinite(plan.expected_ms)


# ---- learning step costs online --------------------------------------------------------------------------


def test_online_costs_follow_a_step_cost_shift() -> None:
    """The profile says verifying the whole block costs little more than verifying none; the engine's
    steps then measure it three times dearer (the machine got busier for wide forwards): the model
    follows within a few dozen steps, shrugs off one preempted step, and the policy reading it verifies
    less. A slowdown of every kind of step alike reaches the widths never measured too."""
    cost = linear_cost(10.0, 0.1, draft=2.0, batches=(1,))
    policy = VerifyWidthPolicy(cost, calibrated(), BLOCK, ragged=False)
    conf = torch.full((1, BLOCK - 1), 0.75)
    before = policy.plan(conf).widths[0]
    assert before == BLOCK - 1  # nearly free: the whole block
    profiled = cost.verify_ms(1, BLOCK)
    for _ in range(48):  # measured: verifying none and plain steps as profiled, the whole block at 3x
        policy.observe_step(1, None, 10.0)
        policy.observe_step(1, 1, 2.0 + 10.0)
        policy.observe_step(1, BLOCK, 2.0 + 3 * profiled)
    assert cost.verify_ms(1, BLOCK) == pytest.approx(3 * profiled, rel=0.05)
    assert cost.verify_ms(1, 1) == pytest.approx(10.0, rel=0.01)
    assert cost.decode_ms(1) == pytest.approx(10.0, rel=0.01)
    assert policy.plan(conf).widths[0] < before  # and the policy narrows
    learnt = cost.verify_ms(1, BLOCK)
    cost.observe_step(1, BLOCK, 1000.0)  # one preempted step, 30x: an outlier, it teaches nothing
    assert cost.verify_ms(1, BLOCK) < 1.15 * learnt
    assert cost.to_dict()["learnt"]["steps"][-1]["profiled_ms"] == pytest.approx(2.0 + profiled)
    slower = linear_cost(10.0, 0.1, draft=2.0, batches=(1,))
    for _ in range(48):  # every step twice as slow; only the whole block is measured
        slower.observe_step(1, BLOCK, 2 * (2.0 + profiled))
    assert slower.verify_ms(1, 4) == pytest.approx(2 * (2.0 + 10.3) - 2.0, rel=0.05)
    assert slower.decode_ms(1) == pytest.approx(20.0, rel=0.05)


def test_steps_of_different_draft_blocks_teach_the_same_verify_cost() -> None:
    """Steps that drafted block 4 and steps that drafted the whole block, at the same verified tokens: the
    cell learns the verify (measured 1.5x the profile) whichever block each step drafted, and each block's
    draft stays the profile's."""
    cost = StepCostModel(verify=[(2, 2, 4.0), (2, 16, 6.0)], draft=[(2, 4, 1.0), (2, BLOCK, 3.0)])
    profiled = cost.verify_ms(2, 6)
    for i in range(64):
        block = 4 if i % 2 else BLOCK
        cost.observe_step(2, 6, cost.draft_ms(2, block) + 1.5 * profiled, draft_block=block)
    assert cost.verify_ms(2, 6) == pytest.approx(1.5 * profiled, rel=0.02)
    assert cost.draft_ms(2, 4) == 1.0 and cost.draft_ms(2, BLOCK) == 3.0


def test_costs_learn_only_from_ordinary_steps_and_when_asked() -> None:
    cost = linear_cost(10.0, 0.1, draft=2.0, batches=(1,))
    policy = VerifyWidthPolicy(cost, calibrated(), BLOCK)
    policy.observe_step(1, None, 30.0, clean=False)  # a step that also prefilled: teaches nothing
    assert cost.decode_ms(1) == pytest.approx(10.0) and cost.version == 0
    fixed = VerifyWidthPolicy(linear_cost(10.0, 0.1, batches=(1,)), calibrated(), BLOCK, learn_costs=False)
    fixed.observe_step(1, None, 30.0)
    assert fixed.cost.decode_ms(1) == pytest.approx(10.0)
    policy.observe_step(1, None, 30.0)
    assert cost.decode_ms(1) > 10.0 and cost.version == 1
    lazy = StepCostModel([(1, 1, 10.0), (1, 8, 12.0)], [(1, 8, 2.0)], [(1, 10.0)], learn_every=4)
    for _ in range(4):  # lessons reach the costs every learn_every steps
        assert lazy.decode_ms(1) == pytest.approx(10.0)
        lazy.observe_step(1, None, 20.0)
    assert lazy.decode_ms(1) > 10.0


# ---- drafting or plain decoding ----------------------------------------------------------------------------


def _drafted_steps(policy: VerifyWidthPolicy, confidence: float, steps: int, batch: int = 1) -> None:
    for _ in range(steps):
        policy.plan_for_batch(batch)
        policy.plan(torch.full((batch, BLOCK - 1), confidence))


def test_a_hard_stretch_is_drafted_while_drafting_beats_plain_decoding_per_token() -> None:
    """After many easy steps (the whole block at ~0.97), a hard stretch where a drafted step still commits
    more per ms than a plain one (1.5 tokens in 13 ms against 1 in 10): it is drafted and verified. A
    policy judging each step against the rate the easy steps reached decoded it plainly, at a worse time
    per token."""
    policy = _policy(linear_cost(10.0, 0.5, draft=2.0, batches=(1,)))
    _drafted_steps(policy, 0.97, 64)
    assert not policy.plan_for_batch(1).plain_decode
    hard = policy.plan(torch.full((1, BLOCK - 1), 0.5))
    assert hard.widths[0] >= 1 and hard.tokens_per_ms > 1 / 10.0
    for _ in range(8):
        assert not policy.plan_for_batch(1).plain_decode
        assert policy.plan(torch.full((1, BLOCK - 1), 0.5)).widths[0] >= 1


def test_a_hopeless_stretch_decodes_plainly_then_drafts_again_before_a_probe() -> None:
    """After a few hopeless steps (a drafted step commits fewer tokens per ms than a plain one) the policy
    decodes plainly; plain steps show nothing new, so it returns to the long run's judgement (drafting
    pays) within a few steps, well before a probe is due."""
    policy = _policy(linear_cost(10.0, 0.5, draft=2.0, batches=(1,)), probe_interval=1000)
    _drafted_steps(policy, 0.97, 64)
    _drafted_steps(policy, 0.02, 4)
    plans = [policy.plan_for_batch(1) for _ in range(12)]
    plain = [p.plain_decode for p in plans]
    assert plain[0] and not all(plain)
    first_draft = plain.index(False)
    assert 1 <= first_draft <= 8 and not any(p.extra.get("probe") for p in plans)


def test_plan_for_batch_drafts_until_it_has_seen_enough_drafted_steps() -> None:
    policy = VerifyWidthPolicy(linear_cost(10.0, 10.0, draft=2.0), calibrated(), BLOCK, min_history=5)
    decisions = []
    for _ in range(8):  # verifying is far too dear, but five drafted steps are needed to judge that
        decisions.append(policy.plan_for_batch(4).plain_decode)
        if not decisions[-1]:
            policy.plan(torch.full((4, BLOCK - 1), 0.5))
    assert decisions[:5] == [False] * 5 and decisions[5:] == [True] * 3


# ---- the calibration's folds -------------------------------------------------------------------------------


def test_calibration_folds_waiting_verifies_at_once() -> None:
    """With ``fold_every`` 4 the plans' lookups see nothing new for three verifies, then all four at once,
    as if learnt one by one (forgetting aside); every reader other than the plans' lookup folds first."""
    gen = torch.Generator().manual_seed(7)
    one, four = AcceptanceCalibration(half_life=1e12), AcceptanceCalibration(half_life=1e12, fold_every=4)
    probe = torch.full((1, 3), 0.9).numpy()
    start = four.predict_array(probe).copy()
    for step in range(8):
        conf = torch.rand(4, 3, generator=gen)
        accepted = torch.randint(0, 4, (4,), generator=gen)
        one.observe(conf, [3, 2, 3, 1], accepted)
        four.observe(conf, [3, 2, 3, 1], accepted)
        if step < 3:
            assert four.predict_array(probe).tolist() == start.tolist()
    assert four.predict_array(probe).ravel().tolist() == pytest.approx(
        one.predict_array(probe).ravel().tolist()
    )
    four.observe(torch.full((1, 3), 0.9), [3], [0])  # waiting, not yet folded
    assert four.observations == one.observations + 1  # a reader folds what waits
    with pytest.raises(ValueError, match="fold_every"):
        AcceptanceCalibration(fold_every=0)


def test_a_batch_of_one_is_planned_as_any_batch() -> None:
    """Batch 1 is planned on Python floats (cheaper between CPU forwards); it must choose what the array
    path chooses, cheap draft or dear (sunk), probe or not."""
    gen = torch.Generator().manual_seed(11)
    for draft in (1.0, 40.0):
        policy = _policy(linear_cost(10.0, 0.7, draft=draft, batches=(1,)))
        for _ in range(20):
            conf = torch.rand(1, BLOCK - 1, generator=gen) ** 0.5
            q = policy.calibration.predict(conf).cumprod(1).numpy()
            for min_width in (0, 1):
                one = policy._best_one(q[0].tolist(), [BLOCK], min_width)
                array = policy._best(q, [BLOCK], uniform=True, min_width=min_width)
                assert one.widths == array.widths and one.draft_block == array.draft_block
                assert one.expected_tokens == pytest.approx(array.expected_tokens)
                assert one.expected_ms == pytest.approx(array.expected_ms)
                assert one.extra["best_step"] == pytest.approx(array.extra["best_step"])


def test_a_token_grid_makes_planned_totals_land_on_its_values() -> None:
    """With verify graphs captured at 64-token steps a total of 65 costs 128: the policy plans totals on
    the grid (or pays for padding only where the next draft is worth it), and costs padded totals."""
    cost = linear_cost(10.0, 0.05, draft=1.0)
    gen = torch.Generator().manual_seed(7)
    conf = 0.3 + 0.69 * torch.rand((64, BLOCK - 1), generator=gen)
    free = VerifyWidthPolicy(cost, calibrated(), BLOCK).plan(conf)
    grid = list(range(64, 64 * BLOCK + 1, 64))
    gridded = VerifyWidthPolicy(cost, calibrated(), BLOCK)
    gridded.set_token_grid(grid)
    plan = gridded.plan(conf)
    total = 64 + sum(plan.widths)
    assert (64 + sum(free.widths)) % 64 != 0  # without the grid the total falls between its values ...
    assert total in grid  # ... with it, on one
    padded = gridded.padded_tokens(np.array([64.0, 65.0, 128.0, 64.0 * BLOCK + 1]))
    assert padded.tolist() == [64.0, 128.0, 128.0, 64.0 * BLOCK + 1]
