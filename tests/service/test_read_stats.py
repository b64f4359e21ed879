"""ReadStats (the gateway's cached view of SpecStats read from an answer) agrees with SpecStats."""

from __future__ import annotations

import pytest

from service.backends.sglang_http import ReadStats, stats_from_body
from sglang_ext.stats import SpecStats

HISTOGRAMS = [[3, 0, 0, 0], [1, 2, 0, 1], [0, 0, 0, 5], [4, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]]


@pytest.mark.parametrize("hist", HISTOGRAMS)
def test_same_numbers_and_wire_form_as_spec_stats(hist):
    plain = SpecStats(block_size=len(hist), histogram=list(hist))
    read = ReadStats.from_usage(plain.to_usage())
    for name in ("verify_steps", "draft_tokens", "accepted_tokens", "acceptance_length", "acceptance_rate"):
        assert getattr(read, name) == getattr(plain, name), name
    assert read.to_usage() == plain.to_usage()
    assert read == plain and plain == read
    assert read != SpecStats(block_size=len(hist), histogram=[*hist[:-1], hist[-1] + 1])


def test_read_only():
    read = ReadStats(block_size=4, histogram=[1, 0, 0, 0])
    assert read.verify_steps == 1
    with pytest.raises(TypeError):
        read.record_step(1)


def test_stats_from_body_returns_read_stats_from_meta_info():
    meta = {
        "spec_verify_ct": 4,
        "spec_num_correct_drafts": 7,
        "spec_num_proposed_drafts": 12,
        "spec_correct_drafts_histogram": [1, 0, 2, 1],
    }
    body = {"choices": [{"index": 0, "meta_info": meta}], "usage": {"prompt_tokens": 3}}
    stats = stats_from_body(body)
    assert isinstance(stats, ReadStats)
    assert body["usage"]["speculative"] == SpecStats.from_sglang_meta_info(meta).to_usage()
    assert "meta_info" not in body["choices"][0]
