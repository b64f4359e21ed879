"""The planners over the shipped H100 cost table and the synthetic trace, simulated (tests/perf/
simulate_planners.py): a policy change that plans worse than a static block, plain decoding or SGLang's
DSPARK planner on the table the plugin ships fails here before any GPU time is spent."""

from __future__ import annotations

import pytest

from sglang_ext.traces.shipped import load_shipped_trace
from tests.perf.simulate_planners import DEFAULT_TABLE, run


@pytest.fixture(scope="module")
def rows() -> dict[tuple[int, str], float]:
    result = run(DEFAULT_TABLE, load_shipped_trace("synthetic"), [1, 64, 128, 256], steps=120)
    return {(r["batch"], r["planner"]): r["x_ar"] for r in result["rows"]}


@pytest.mark.parametrize("batch", [1, 64, 128, 256])
def test_the_policy_is_never_far_behind_any_other_planner(rows, batch: int) -> None:
    others = {name: x for (b, name), x in rows.items() if b == batch and name != "adaptive"}
    assert rows[(batch, "adaptive")] >= 0.97 * max(others.values()), others


def test_the_policy_beats_every_static_block_under_load_and_decodes_plainly_when_drafting_loses(rows) -> None:
    def static(b: int) -> float:
        return max(x for (bb, name), x in rows.items() if bb == b and name.startswith("static"))

    assert rows[(64, "adaptive")] >= 1.08 * static(64)
    assert rows[(128, "adaptive")] >= 1.05 * static(128)
    assert static(256) < 0.9 and rows[(256, "adaptive")] >= 0.97  # every block loses; the policy does not
