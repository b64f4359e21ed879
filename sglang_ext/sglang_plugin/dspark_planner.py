"""SGLang's DSPARK verify planner driving the DFLARE drafter: the baseline our verify-width policy must beat.

``DFLARE_VERIFY=dspark_planner`` runs the same adaptive step (adaptive_step.py: draft, ragged verify,
accept, commit) with the per-request widths chosen by SGLang 0.5.17's DSPARK planning math instead of
our policy, so a benchmark compares the two planners on one drafter, one verify path and one cost table:

* the verify-token budget: ``compute_verify_token_budget`` (the budget that maximises expected tokens x
  steps per second over the batch's survival probabilities, the cumulative products of the confidences);
* the per-request lengths: ``schedule_verify_lens_topk_from_survival`` (that many (request, position)
  candidates in order of survival).

What DSPARK gets from us, each in its most favourable form: an exact steps-per-second table of the current
batch size built from our step-cost table (DSPARK's own profiler samples batch token counts only), draft
included; the drafter's current top-1 probabilities as confidences (DSPARK relays its head's confidences
two steps late); no temperature calibration (DSPARK's STS table is fit for its confidence head). What it
does not do, as in SGLang: skip the draft for a plain decode step, or learn step costs online.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sglang_ext.dflare.verify_policy import StepCostModel, VerifyPlan


class DsparkPlannerPolicy:
    """The verify-width policy interface of ``VerifyWidthPolicy`` (``plan_for_batch``, ``plan``,
    ``observe_step``) over SGLang's DSPARK planner functions."""

    def __init__(self, cost: StepCostModel, block: int) -> None:
        from sglang.srt.speculative.dspark_components.dspark_planner import DSparkScheduleConfig

        self.cost = cost
        self.block = int(block)
        self.cfg = DSparkScheduleConfig(gamma=self.block - 1)
        self.cfg.validate()
        self._tables: dict[int, Any] = {}

    def sps_table(self, batch: int) -> Any:
        """DSPARK's steps-per-second table for ``batch`` requests: one probe per total of verified tokens
        (``batch`` .. ``batch * block``), each step's time the draft plus the verify of that many tokens."""
        from sglang.srt.speculative.dspark_components.dspark_sps import SpsCostTable

        table = self._tables.get(batch)
        if table is None:
            tokens = np.arange(batch, batch * self.block + 1)
            step_ms = self.cost.verify_ms_array(batch, tokens) + self.cost.draft_ms(batch, self.block)
            table = SpsCostTable(
                sample_batch_tokens=[int(t) for t in tokens],
                sample_steps_per_sec=[float(1000.0 / ms) for ms in step_ms],
                max_batch_tokens=int(tokens[-1]),
            )
            self._tables[batch] = table
        return table

    def plan_for_batch(self, batch: int) -> VerifyPlan:
        """DSPARK always drafts: never a plain decode step."""
        return VerifyPlan([self.block - 1] * batch, False, self.block, float("nan"), float("nan"))

    def plan(self, confidences: torch.Tensor | np.ndarray) -> VerifyPlan:
        """Widths (drafts verified per request) for [bs, block - 1] confidences."""
        from sglang.kernels.ops.speculative.dspark.dspark_schedule import (
            schedule_verify_lens_topk_from_survival,
        )
        from sglang.srt.speculative.dspark_components.dspark_planner import compute_verify_token_budget

        conf = torch.as_tensor(confidences, dtype=torch.float32).cpu()
        bs = int(conf.shape[0])
        survival = torch.cumprod(conf.clamp(0.0, 1.0), dim=1)
        decision = compute_verify_token_budget(
            history_survival_probs=survival, sps_table=self.sps_table(bs), cfg=self.cfg
        )
        budget = decision.budget
        lens = schedule_verify_lens_topk_from_survival(survival_probs=survival, budget=budget, cfg=self.cfg)
        widths = [int(n) - 1 for n in lens.tolist()]
        seconds = decision.predicted_step_seconds or float("nan")
        expected = (decision.predicted_theta or 0.0) * seconds
        return VerifyPlan(widths, False, self.block, float(expected), 1000.0 * seconds, {"budget": budget})

    def observe_step(self, *_: Any, **__: Any) -> None:
        """DSPARK's table is fixed: measured steps (as ``VerifyWidthPolicy.observe_step``) are not learnt."""
