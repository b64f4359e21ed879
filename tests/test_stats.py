"""SpecStats: the one definition of acceptance shared by engine, plugin and gateway."""

import pytest

from sglang_ext.stats import SpecStats, total


def _stats(block_size: int, accepted: list[int]) -> SpecStats:
    stats = SpecStats(block_size=block_size)
    for a in accepted:
        stats.record_step(a)
    return stats


def test_derived_counts_follow_the_definition():
    stats = _stats(4, [3, 0, 1, 3])
    assert stats.verify_steps == 4
    assert stats.draft_tokens == 4 * 3
    assert stats.accepted_tokens == 7
    assert stats.acceptance_length == pytest.approx(1 + 7 / 4)
    assert stats.acceptance_rate == pytest.approx(7 / 12)
    # position i accepted when more than i drafts were (steps 3,1,3 | 3,3 | 3,3)
    assert stats.accepted_per_position == [3, 2, 2]
    assert stats.histogram == [1, 1, 0, 2]


def test_no_verify_step_means_plain_decoding():
    stats = SpecStats(block_size=16)
    assert stats.acceptance_length == 1.0
    assert stats.acceptance_rate == 0.0
    assert stats.accepted_per_position == [0] * 15


def test_record_step_rejects_impossible_accept_counts():
    stats = SpecStats(block_size=4)
    with pytest.raises(ValueError):
        stats.record_step(4)
    with pytest.raises(ValueError):
        stats.record_step(-1)


def test_usage_round_trip_and_tamper_detection():
    stats = _stats(8, [7, 2, 5])
    usage = stats.to_usage()
    assert SpecStats.from_usage(usage) == stats
    usage["verify_steps"] += 1
    with pytest.raises(ValueError):
        SpecStats.from_usage(usage)


def test_aggregate_over_requests_is_one_plus_sum_accepted_over_sum_steps():
    a, b = _stats(4, [3, 3]), _stats(4, [0, 0, 0, 1])
    agg = total([a, b])
    assert agg.acceptance_length == pytest.approx(1 + 7 / 6)
    assert total([]) is None


def test_from_sglang_meta_info_ignores_spec_accept_length_which_counts_prefill():
    meta = {
        "completion_tokens": 12,
        "spec_verify_ct": 3,
        "spec_num_correct_drafts": 8,
        "spec_num_proposed_drafts": 21,
        "spec_accept_length": 4.0,
        "spec_correct_drafts_histogram": [0, 1, 0, 1, 1, 0, 0, 0],
    }
    stats = SpecStats.from_sglang_meta_info(meta)
    assert stats.block_size == 8
    assert stats.accepted_tokens == 8
    assert stats.acceptance_length == pytest.approx(1 + 8 / 3)


def test_from_sglang_meta_info_without_speculation_and_inconsistent_input():
    assert SpecStats.from_sglang_meta_info({"completion_tokens": 5}) is None
    bad = {
        "spec_verify_ct": 2,
        "spec_num_correct_drafts": 5,
        "spec_num_proposed_drafts": 6,
        "spec_correct_drafts_histogram": [1, 1, 0, 0],
    }
    with pytest.raises(ValueError):
        SpecStats.from_sglang_meta_info(bad)


def test_steps_that_verify_fewer_drafts_count_only_those():
    """The reference engine's adaptive draft length verifies a prefix of the block: acceptance rate is
    accepted / verified, while steps that verify the whole block keep the SGLang form (no count kept)."""
    whole = _stats(8, [7, 2])
    assert whole.verified_drafts is None and whole.draft_tokens == 14
    cut = SpecStats(block_size=8)
    cut.record_step(2, verified=3)
    cut.record_step(0, verified=1)
    cut.record_step(7)  # a whole block after cut ones
    assert cut.draft_tokens == 3 + 1 + 7 and cut.verified_drafts == 11
    assert cut.acceptance_rate == pytest.approx(9 / 11)
    assert cut.acceptance_length == pytest.approx(1 + 9 / 3)  # tau does not depend on it
    with pytest.raises(ValueError):
        cut.record_step(3, verified=2)  # cannot accept more than were verified
    with pytest.raises(ValueError):
        cut.record_step(0, verified=8)  # B - 1 at most
    merged = whole.merge(cut)
    assert merged.draft_tokens == 14 + 11 and merged.verified_drafts == 25
    assert whole.merge(_stats(8, [1])).verified_drafts is None


def test_verified_drafts_travel_through_usage_and_meta_info():
    cut = SpecStats(block_size=4)
    cut.record_step(1, verified=1)
    cut.record_step(2, verified=2)
    usage = cut.to_usage()
    assert usage["draft_tokens"] == 3 and usage["acceptance_rate"] == 1.0
    assert SpecStats.from_usage(usage) == cut
    for bad in (2, 7):  # below accepted; above whole blocks
        with pytest.raises(ValueError):
            SpecStats.from_usage({**usage, "draft_tokens": bad})
    meta = {"spec_verify_ct": 2, "spec_num_proposed_drafts": 6, "spec_num_correct_drafts": 3,
            "spec_correct_drafts_histogram": [0, 1, 1], "spec_num_verified_drafts": 3}  # fmt: skip
    assert SpecStats.from_sglang_meta_info(meta) == cut  # block size still from proposed: 6 // 2 + 1
    assert SpecStats.from_sglang_meta_info({**meta, "spec_num_verified_drafts": 6}).verified_drafts is None


def test_plain_steps_travel_through_usage_meta_info_and_merge():
    stats = SpecStats(block_size=4)
    stats.record_step(2, verified=3)
    stats.record_plain_step()
    stats.record_plain_step()
    # tau is the verify steps' own: plain steps do not dilute it
    assert (stats.verify_steps, stats.plain_steps, stats.acceptance_length) == (1, 2, 3.0)
    usage = stats.to_usage()
    assert usage["plain_decode_steps"] == 2
    assert SpecStats.from_usage(usage) == stats
    older = {k: v for k, v in usage.items() if k != "plain_decode_steps"}  # an engine without plain steps
    assert SpecStats.from_usage(older).plain_steps == 0
    with pytest.raises(ValueError):
        SpecStats.from_usage({**usage, "plain_decode_steps": -1})
    meta = {"spec_verify_ct": 1, "spec_num_proposed_drafts": 3, "spec_num_correct_drafts": 2,
            "spec_correct_drafts_histogram": [0, 0, 1, 0]}  # fmt: skip
    assert SpecStats.from_sglang_meta_info(meta).plain_steps == 0  # stock SGLang: no such field
    assert SpecStats.from_sglang_meta_info({**meta, "spec_num_plain_steps": 2}) == stats
    # a request that only decoded plainly: no verify step, still stats
    only_plain = {"spec_verify_ct": 0, "spec_num_plain_steps": 5, "spec_correct_drafts_histogram": [0] * 4}
    read = SpecStats.from_sglang_meta_info(only_plain)
    assert read is not None and (read.block_size, read.verify_steps, read.plain_steps) == (4, 0, 5)
    assert SpecStats.from_sglang_meta_info({"spec_verify_ct": 0}) is None
    assert stats.merge(read).plain_steps == 7 and stats.merge(_stats(4, [1])).plain_steps == 2


def test_merging_block_sizes_counts_each_sides_own_blocks():
    merged = _stats(4, [1]).merge(_stats(8, [0]))
    assert merged.block_size == 8 and merged.draft_tokens == 3 + 7
