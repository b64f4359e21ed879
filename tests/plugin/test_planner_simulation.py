"""The planners over the shipped H100 cost tables and the synthetic trace, simulated (tests/perf/
simulate_planners.py): a policy change that plans worse than a static block, plain decoding or SGLang's
DSPARK planner on the tables the plugin ships fails here before any GPU time is spent.

Two policies: ``adaptive`` drafts the whole block every drafted step (what the plugin runs today), and
``adaptive_draft_8_16`` may draft block 8 instead (what a plugin drafting the block the policy names would
reach). Static blocks whose draft cost is extrapolated (2 and 4: no draft measured there) are left out of
the comparisons: their numbers are guesses, not measurements."""

from __future__ import annotations

import pytest

from sglang_ext.traces.shipped import load_shipped_trace
from tests.perf.simulate_planners import DEFAULT_TABLE, run

DRAFTING_8_16 = "adaptive_draft_8_16"


@pytest.fixture(scope="module")
def rows() -> dict[tuple[int, str], float]:
    result = run(DEFAULT_TABLE, load_shipped_trace("synthetic"), [1, 64, 128, 256], steps=120)
    return {(r["batch"], r["planner"]): r["x_ar"] for r in result["rows"] if "draft_cost" not in r}


@pytest.mark.parametrize("batch", [1, 64, 128, 256])
def test_the_policy_with_a_shorter_draft_is_never_far_behind_any_other_planner(rows, batch: int) -> None:
    others = {name: x for (b, name), x in rows.items() if b == batch and name != DRAFTING_8_16}
    assert rows[(batch, DRAFTING_8_16)] >= 0.97 * max(others.values()), others


@pytest.mark.parametrize("batch", [1, 64, 128, 256])
def test_the_whole_block_policy_is_never_far_behind_planners_of_the_same_draft(rows, batch: int) -> None:
    same_draft = {name: rows[(batch, name)] for name in ("ar", "static_16", "dspark_planner")}
    assert rows[(batch, "adaptive")] >= 0.97 * max(same_draft.values()), same_draft


def test_the_policy_decodes_plainly_when_every_block_loses(rows) -> None:
    static = max(x for (b, name), x in rows.items() if b == 256 and name.startswith("static"))
    assert static < 0.95 and rows[(256, DRAFTING_8_16)] >= 0.97 and rows[(256, "adaptive")] >= 0.97
