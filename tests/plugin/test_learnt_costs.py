"""learnt_costs.py: an adaptive server writes what its policy learnt and plans with, as it runs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from sglang_ext.dflare.verify_policy import StepCostModel
from sglang_ext.sglang_plugin import learnt_costs
from sglang_ext.sglang_plugin.adaptive_step import AdaptiveStep


def _cost() -> StepCostModel:
    verify = [(b, b * k, 5.0 + 0.02 * b * k) for b in (1, 64) for k in (1, 4, 8)]
    draft = [(b, k, 0.5 + 0.01 * b * k) for b in (1, 64) for k in (4, 8)]
    return StepCostModel(verify, draft, [(1, 5.0), (64, 6.0)], block_size=8, learn_every=1)


def test_the_file_holds_the_steps_by_block_and_the_costs_the_policy_reads_now(tmp_path: Path) -> None:
    """Rewritten every ``every`` steps: the steps run per drafted block (0 = plain), every learnt cell with
    its weight and the block that drafted it, and each allowed block's whole step as the policy reads it
    after learning (here: block 8's steps measured twice their profile)."""
    cost = _cost()
    path = tmp_path / "learnt.json"
    dump = learnt_costs.LearntCostsDump(path, cost, [8, 4], every=4)
    profiled = cost.draft_ms(64, 8) + cost.verify_ms(64, 512)
    for drafted in (8, 8, 8):
        cost.observe_step(64, 512, 2 * profiled, draft_block=drafted)
        dump.record(drafted)
    assert not path.exists()  # not yet every 4 steps
    dump.record(None)
    data = json.loads(path.read_text())
    assert data["steps_by_drafted_block"] == {"0": 1, "8": 3}
    (cell,) = data["cost_model"]["learnt"]["steps"]
    assert (cell["batch"], cell["tokens"], cell["draft_block"]) == (64, 512, 8) and cell["weight"] > 2
    planned = data["planned"]["64"]
    assert set(planned) == {"4", "8"}
    assert planned["8"]["step_ms_whole_block"] > 1.3 * profiled  # the learnt cost, not the profile's
    assert planned["4"]["draft_ms"] == round(cost.draft_ms(64, 4), 4)
    assert not list(tmp_path.glob("*.partial"))


def test_only_an_adaptive_step_asked_for_it_writes_one(tmp_path: Path, monkeypatch) -> None:
    assert learnt_costs.from_environment(_cost(), [8], environ={}) is None
    assert learnt_costs.from_environment(None, [8], environ={"DFLARE_LEARNT_COSTS": "x"}) is None
    monkeypatch.setenv("DFLARE_LEARNT_COSTS", str(tmp_path / "a.json"))
    step = AdaptiveStep(SimpleNamespace(block_size=8), _cost(), draft_blocks=[4])
    assert step.costs_dump is not None and step.costs_dump.path == tmp_path / "a.json"
    assert step.costs_dump.blocks == [4, 8]
    monkeypatch.delenv("DFLARE_LEARNT_COSTS")
    assert AdaptiveStep(SimpleNamespace(block_size=8), _cost()).costs_dump is None
