"""The GPU block-logit check pairs each prompt with its own first draft block (``first_blocks``).

Why a CPU test: the first GPU run matched captures on their start position alone and compared 2 of 12
prompts against another request's second block (cosine ~0). The matching is pure bookkeeping, so it is
pinned here with the start positions that run actually captured.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

GPU_DIR = Path(__file__).resolve().parents[1] / "gpu"


def _first_blocks():
    sys.path.insert(0, str(GPU_DIR))
    try:
        return importlib.import_module("check_block_logits").first_blocks
    finally:
        sys.path.remove(str(GPU_DIR))


def _record(start: int, tag: float) -> dict[str, torch.Tensor]:
    return {"positions": torch.arange(start, start + 4), "hidden": torch.full((4, 2), tag)}


def test_with_record_ends_each_prompt_searches_only_its_own_records() -> None:
    first_blocks = _first_blocks()
    # warm-up (11, 12); prompt A = 39 tokens (blocks at 39, 41); prompt B = 41 tokens (blocks at 41, 42)
    starts_tags = [(11, -1), (12, -2), (39, 0), (41, 9), (41, 1), (42, 8)]
    records = [_record(start, tag) for start, tag in starts_tags]
    got = first_blocks(records, [[5] * 39, [5] * 41], ends=[4, 6])
    assert [float(h[0, 0]) for h in got] == [0.0, 1.0]


def test_without_ends_a_block_of_an_earlier_prompt_is_skipped() -> None:
    """The 13:31 UTC capture: prompt 0 (39 tokens) drafted at 39 and 41; prompt 9 has 41 tokens."""
    first_blocks = _first_blocks()
    starts_tags = [(39, 0), (41, 9), (107, 1), (112, 9), (41, 2), (42, 9)]
    records = [_record(start, tag) for start, tag in starts_tags]
    got = first_blocks(records, [[5] * 39, [5] * 107, [5] * 41])
    assert [float(h[0, 0]) for h in got] == [0.0, 1.0, 2.0]


def test_a_prompt_without_its_block_is_reported_missing() -> None:
    first_blocks = _first_blocks()
    got = first_blocks([_record(39, 0)], [[5] * 39, [5] * 50])
    assert got[1] is None and float(got[0][0, 0]) == 0.0
