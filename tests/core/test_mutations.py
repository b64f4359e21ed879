"""Committed mutation tests: the lossless checks must FAIL when the engine is broken by one position.

Each mutation is patched in for one test only; the unpatched control runs the same check and passes.
(Accepting one draft too FEW is not a losslessness bug, only a slower one: it is not a mutant here.)
"""

from __future__ import annotations

import pytest
import torch

from sglang_ext.dflare import ops
from sglang_ext.reference.engine import SpeculativeEngine

from .helpers import greedy_mismatches, oracle_run, prompts_for, target

_accept = ops.accept_lengths


def _accept_one_more(draft: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    return (_accept(draft, tgt) + 1).clamp(max=draft.shape[1])


def _accept_all_matches(draft: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Counts every matching position instead of the matching PREFIX."""
    return (draft == tgt).sum(dim=1)


def test_control_unmutated_engine_is_lossless() -> None:
    assert oracle_run(4, 2)[0] == []


@pytest.mark.parametrize("mutant", [_accept_one_more, _accept_all_matches], ids=["accept+1", "not-a-prefix"])
def test_broken_accept_rule_is_caught(monkeypatch: pytest.MonkeyPatch, mutant) -> None:
    monkeypatch.setattr(ops, "accept_lengths", mutant)
    assert oracle_run(4, 2)[0] != []


@pytest.mark.parametrize("shift", [1, -1], ids=["keep-one-rejected", "drop-one-accepted"])
def test_kv_crop_off_by_one_is_caught(monkeypatch: pytest.MonkeyPatch, shift: int) -> None:
    mutant = staticmethod(lambda start, a: start + a + 1 + shift)
    monkeypatch.setattr(SpeculativeEngine, "_kept_length", mutant)
    assert oracle_run(4, 2)[0] != []


def test_kv_crop_off_by_one_is_caught_with_a_real_drafter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Also through the plain greedy check with the random drafter (block size 1 path included)."""
    from sglang_ext.reference.tiny import tiny_drafter

    monkeypatch.setattr(SpeculativeEngine, "_kept_length", staticmethod(lambda start, a: start + a + 2))
    model = target(0)
    engine = SpeculativeEngine(model, tiny_drafter(model, block_size=1), 1, max_batch=2)
    assert greedy_mismatches(engine, 0, prompts_for(0, 3), 16) != []
