"""SGLang's DSPARK planner driving DFLARE widths (DFLARE_VERIFY=dspark_planner), the benchmark's baseline."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sglang_ext.dflare.verify_policy import StepCostModel
from sglang_ext.sglang_plugin import adaptive
from sglang_ext.sglang_plugin.adaptive_step import AdaptiveStep
from sglang_ext.sglang_plugin.dspark_planner import DsparkPlannerPolicy

BLOCK = 8


def cost(per_token_ms: float) -> StepCostModel:
    """Verify costs 5 ms plus ``per_token_ms`` per verified token at batch 1 and 64; the draft 0.5 ms."""
    verify = [(b, t, 5.0 + per_token_ms * t) for b in (1, 64) for t in (b, b * BLOCK)]
    return StepCostModel(verify, [(1, BLOCK, 0.5), (64, BLOCK, 0.5)], [(1, 5.0), (64, 5.0)], block_size=BLOCK)


def test_nearly_free_verify_takes_every_draft_and_costly_verify_none() -> None:
    confident = torch.full((64, BLOCK - 1), 0.9)
    assert DsparkPlannerPolicy(cost(0.0001), BLOCK).plan(confident).widths == [BLOCK - 1] * 64
    assert DsparkPlannerPolicy(cost(50.0), BLOCK).plan(confident).widths == [0] * 64


def test_the_budget_goes_to_the_most_confident_requests() -> None:
    conf = torch.tensor([[0.99] * (BLOCK - 1), [0.1] * (BLOCK - 1)] * 32)
    widths = DsparkPlannerPolicy(cost(0.02), BLOCK).plan(conf).widths
    assert min(widths[0::2]) > max(widths[1::2])
    assert all(0 <= w <= BLOCK - 1 for w in widths)


def test_widths_are_sglangs_own_schedule_for_the_budget_it_chose() -> None:
    """Against SGLang's planner run directly: the same budget and the same lengths (the adapter only
    builds its table and reads widths = lengths - 1)."""
    from sglang.kernels.ops.speculative.dspark.dspark_schedule import schedule_verify_lens_topk
    from sglang.srt.speculative.dspark_components.dspark_planner import compute_verify_token_budget

    policy = DsparkPlannerPolicy(cost(0.01), BLOCK)
    conf = torch.rand((64, BLOCK - 1), generator=torch.Generator().manual_seed(3))
    plan = policy.plan(conf)
    budget = compute_verify_token_budget(
        history_survival_probs=torch.cumprod(conf, 1), sps_table=policy.sps_table(64), cfg=policy.cfg
    ).budget
    assert plan.extra["budget"] == budget and 0 < budget < 64 * (BLOCK - 1)
    lens = schedule_verify_lens_topk(confidence=conf, budget=budget, cfg=policy.cfg)
    assert plan.widths == [int(n) - 1 for n in lens]
    assert sum(plan.widths) == budget


def test_it_never_takes_a_plain_decode_step_and_the_step_uses_it() -> None:
    policy = DsparkPlannerPolicy(cost(50.0), BLOCK)
    assert not policy.plan_for_batch(64).plain_decode
    step = AdaptiveStep(SimpleNamespace(block_size=BLOCK), cost(50.0), dspark_planner=True)
    assert isinstance(step.greedy_policy, DsparkPlannerPolicy) and step.clock is None


@pytest.mark.parametrize(("backend", "ok"), [("fa3", True), ("triton", False)])
def test_the_mode_resolves_like_adaptive(backend: str, ok: bool) -> None:
    env = {"DFLARE_VERIFY": "dspark_planner"}
    if ok:
        assert adaptive.resolve_mode(backend, env) == "dspark_planner"
    else:
        with pytest.raises(adaptive.AdaptiveConfigError, match="ragged-verify CUDA graphs"):
            adaptive.resolve_mode(backend, env)
