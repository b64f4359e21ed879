"""The reference engine under the verify-width policy: lossless (float64 greedy equals transformers'
``generate``) while rows switch between widths and plain decode steps, the calibration learns from what
the target accepted, and the CPU step profile gives a usable cost model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sglang_ext.dflare.verify_policy import (
    AcceptanceCalibration,
    StepCostModel,
    VerifyPlan,
    VerifyWidthPolicy,
)
from sglang_ext.reference.engine import CPU_MIN_DRAFT_CONFIDENCE, SpeculativeEngine
from sglang_ext.reference.loader import build_engine
from sglang_ext.reference.sampling import SamplingParams
from sglang_ext.reference.step_profile import measure_step_costs
from sglang_ext.reference.tiny import tiny_drafter

from .helpers import greedy_mismatches, prompts_for, target

N_TOKENS = 30


def flat_cost(block: int, verify_per_token: float, draft: float = 1.0) -> StepCostModel:
    return StepCostModel(
        [(b, b * q, 10.0 + verify_per_token * b * (q - 1)) for b in (1, 4) for q in (1, block)],
        [(b, block, draft) for b in (1, 4)],
        device="test",
        model="tiny",
        block_size=block,
    )


class ScriptedPolicy(VerifyWidthPolicy):
    """Cycles through every kind of step, per engine step: a plain decode step (no draft), a drafted step
    whose plan verifies nothing, and drafted steps with per-row widths 1..B-1 that differ between rows.
    Each drafted step checks that the drafter's context holds every token the target has."""

    def __init__(self, block: int, engine: SpeculativeEngine) -> None:
        super().__init__(flat_cost(block, 0.0), AcceptanceCalibration(), block)
        self.engine = engine
        self.step = 0
        self.kinds: list[str] = []
        self.context_gaps: list[tuple[int, int]] = []

    def plan_for_batch(self, batch: int) -> VerifyPlan:
        self.step += 1
        plain = self.step % 4 == 0
        if plain:
            self.kinds.append("plain")
        return VerifyPlan([0] * batch, plain, self.block_size, 0.0, 1.0)

    def plan(self, confidences: torch.Tensor) -> VerifyPlan:
        bs = confidences.shape[0]
        for r, slot in enumerate(self.engine._slots[:bs]):
            if self.engine.draft_cache.lengths[r] != slot.length:
                self.context_gaps.append((self.engine.draft_cache.lengths[r], slot.length))
        if self.step % 4 == 1:
            self.kinds.append("width 0")
            return VerifyPlan([0] * bs, True, self.block_size, 0.0, 1.0)
        widths = [1 + (self.step + r) % (self.block_size - 1) for r in range(bs)]
        self.kinds.append("widths")
        return VerifyPlan(widths, False, self.block_size, 0.0, 1.0)


@pytest.mark.parametrize("block_size", [2, 4, 8])
@pytest.mark.parametrize("batch", [1, 4])
def test_switching_between_widths_and_plain_decoding_is_lossless(block_size: int, batch: int) -> None:
    seed = 1
    model = target(seed)
    engine = SpeculativeEngine(
        model, tiny_drafter(model, block_size=block_size, seed=5), block_size, max_batch=batch
    )
    policy = ScriptedPolicy(block_size, engine)
    engine.verify_policy = policy
    prompts = prompts_for(seed, 6 if batch > 1 else 2)
    assert greedy_mismatches(engine, seed, prompts, N_TOKENS) == []
    assert {"plain", "width 0", "widths"} <= set(policy.kinds)
    assert policy.context_gaps == []  # plain steps' tokens reached the drafter's context before it drafted
    assert engine.plain_decode_steps == policy.kinds.count("plain") + policy.kinds.count("width 0")
    assert policy.calibration.observations > 0  # learnt from the drafted steps' accepts


class RowScriptedPolicy(VerifyWidthPolicy):
    """Every third step a plain decode step for the batch; otherwise row ``r`` verifies
    ``(step + r) % B`` drafts, so some rows verify none while others verify some. Remembers each
    request's widths (0 for a plain step) to check the request's stats against."""

    def __init__(self, block: int, engine: SpeculativeEngine) -> None:
        super().__init__(flat_cost(block, 0.0), AcceptanceCalibration(), block)
        self.engine = engine
        self.step = 0
        self.widths: dict[str, list[int]] = {}

    def _chose(self, widths: list[int]) -> None:
        for slot, width in zip(self.engine._slots, widths, strict=False):
            self.widths.setdefault(slot.req.request_id, []).append(width)

    def plan_for_batch(self, batch: int) -> VerifyPlan:
        self.step += 1
        plain = self.step % 3 == 0
        if plain:
            self._chose([0] * batch)
        return VerifyPlan([0] * batch, plain, self.block_size, 0.0, 1.0)

    def plan(self, confidences: torch.Tensor) -> VerifyPlan:
        widths = [(self.step + r) % self.block_size for r in range(confidences.shape[0])]
        self._chose(widths)
        return VerifyPlan(widths, False, self.block_size, 0.0, 1.0)


def test_each_request_counts_its_plain_steps_and_verified_drafts() -> None:
    """A request's stats count the steps it decoded without speculation (the batch's plain steps and
    its own width-0 rows) apart from its verify steps; the engine's width counts add them up."""
    seed, block = 2, 4
    model = target(seed)
    engine = SpeculativeEngine(model, tiny_drafter(model, block_size=block, seed=3), block, max_batch=4)
    policy = RowScriptedPolicy(block, engine)
    engine.verify_policy = policy
    prompts = prompts_for(seed, 6)
    results = engine.generate(prompts, SamplingParams(max_tokens=N_TOKENS))
    for res in results:
        widths = policy.widths[res.request_id]
        verified = [w for w in widths if w]
        assert res.stats.plain_steps == len(widths) - len(verified) > 0
        assert res.stats.verify_steps == len(verified) > 0
        assert res.stats.draft_tokens == sum(verified)
        # every decode step commits at least its bonus token: the output is at least one per step
        assert len(res.output_ids) >= 1 + len(widths) - (res.finish_reason == "length")
    chosen = [w for ws in policy.widths.values() for w in ws]
    assert engine.verify_widths == [chosen.count(k) for k in range(block)]
    # a width-0 row beside verifying rows is a plain step of that request, not of the engine
    assert sum(r.stats.plain_steps for r in results) > engine.plain_decode_steps > 0
    assert greedy_mismatches(engine, seed, prompts, N_TOKENS) == []  # and it stays lossless


def test_a_real_policy_switches_one_request_and_stays_lossless() -> None:
    """A cost model where verifying is too dear to pay: the policy decodes plainly and probes every
    third step; one request sees both kinds of step, and its output equals generate's."""
    seed, block = 0, 4
    model = target(seed)
    policy = VerifyWidthPolicy(
        flat_cost(block, 10.0),
        AcceptanceCalibration(),
        block,
        probe_interval=2,
        min_history=1,
        learn_costs=False,
    )
    engine = SpeculativeEngine(model, tiny_drafter(model, block_size=block, seed=2), block, max_batch=1)
    engine.verify_policy = policy
    assert greedy_mismatches(engine, seed, prompts_for(seed, 1), N_TOKENS) == []
    assert engine.plain_decode_steps >= 10 and engine.verified_drafts >= 5


def test_cheap_verify_gives_whole_blocks_and_the_calibration_counts_real_accepts() -> None:
    seed, block = 3, 4
    model = target(seed)
    policy = VerifyWidthPolicy(
        flat_cost(block, 0.0, draft=0.0), AcceptanceCalibration(), block, ragged=False, learn_costs=False
    )
    engine = SpeculativeEngine(model, tiny_drafter(model, block_size=block, seed=4), block, max_batch=4)
    engine.verify_policy = policy
    prompts = prompts_for(seed, 6)
    assert greedy_mismatches(engine, seed, prompts, N_TOKENS) == []
    results = engine.generate(prompts, SamplingParams(max_tokens=N_TOKENS))
    steps = sum(r.stats.verify_steps for r in results)
    accepted = sum(r.stats.accepted_tokens for r in results)
    assert engine.plain_decode_steps == 0
    assert all(r.stats.verified_drafts is None for r in results)  # every step verified the whole block
    # each verify observes the accepted drafts and, when one was rejected, that one: between a and a + 1
    observed = policy.calibration.observations
    assert accepted > 0
    assert 2 * (accepted + 0) <= observed <= 2 * (accepted + steps)  # two generate runs fed it


def test_step_profile_measures_the_engines_steps(tmp_path: Path) -> None:
    model = target(0)
    engine = SpeculativeEngine(model, tiny_drafter(model, block_size=8), 8, max_batch=4)
    cost = measure_step_costs(engine, repeats=3)
    data = cost.to_dict()
    assert {p["batch"] for p in data["verify"]} == {1, 4}
    assert {p["tokens"] for p in data["verify"] if p["batch"] == 1} == {1, 2, 3, 4, 5, 8}
    assert [p["batch"] for p in data["decode"]] == [1, 4] and [p["block"] for p in data["draft"]] == [8, 8]
    assert all(p["ms"] > 0 for p in data["decode"]) and all(
        p["ms"] >= 0 for p in data["verify"] + data["draft"]
    )
    assert engine.verify_policy is None and not engine.has_work()  # profiled on a scratch engine
    assert data["block_size"] == 8 and data["device"].startswith("cpu") and "drafter" in data["model"]
    cost.to_json(tmp_path / "cpu.json")
    assert StepCostModel.from_json(tmp_path / "cpu.json").decode_ms(2) > 0


def test_cli_default_on_cpu_is_the_policy_and_the_threshold_stays_available() -> None:
    model = target(0)
    drafter = tiny_drafter(model, block_size=4)
    default = build_engine(model, drafter, 4, max_batch=2)
    assert isinstance(default.verify_policy, VerifyWidthPolicy) and not default.verify_policy.ragged
    assert default._log_min_confidence == -math.inf  # no threshold beside it
    threshold = build_engine(model, drafter, 4, max_batch=2, verify_policy=False)
    assert threshold.verify_policy is None
    assert threshold._log_min_confidence == math.log(CPU_MIN_DRAFT_CONFIDENCE)
    assert build_engine(model, drafter, 1, max_batch=2).verify_policy is None  # block 1: nothing to verify
    assert build_engine(model, None, max_batch=2).verify_policy is None
    policy = build_engine(model, drafter, 4, max_batch=2, verify_policy=True)
    assert isinstance(policy.verify_policy, VerifyWidthPolicy) and not policy.verify_policy.ragged
    with pytest.raises(ValueError, match="alternatives"):
        build_engine(model, drafter, 4, max_batch=2, min_draft_confidence=0.02, verify_policy=True)
    fixed = build_engine(model, drafter, 4, max_batch=2, min_draft_confidence=0.02)
    assert fixed.verify_policy is None
    whole = build_engine(model, drafter, 4, max_batch=2, min_draft_confidence=0.0)
    assert whole.verify_policy is None
    with pytest.raises(ValueError, match="alternatives"):
        SpeculativeEngine(model, drafter, 4, min_draft_confidence=0.1, verify_policy=policy.verify_policy)


class RecordingPolicy(VerifyWidthPolicy):
    """A real policy that also records every step the engine reports (batch, verified tokens, clean)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reports: list[tuple[int, int | None, float, bool]] = []

    def observe_step(self, batch: int, verified_tokens: int | None, ms: float, clean: bool = True) -> None:
        self.reports.append((batch, verified_tokens, ms, clean))
        super().observe_step(batch, verified_tokens, ms, clean)


def test_the_engine_reports_its_steps_and_the_cost_model_learns_them() -> None:
    """Every decoding step reaches the policy with its wall time: plain steps without verified tokens,
    drafted ones with the tokens the padded verify processed (rows x (width + 1)); steps that also
    prefilled or fed a new request's prompt to the drafter are marked unclean and teach nothing. The
    learnt costs are the engine's own (a tiny model: far below the 10 ms the profile claimed)."""
    seed, block = 4, 4
    model = target(seed)
    cost = flat_cost(block, 0.0)
    policy = RecordingPolicy(cost, AcceptanceCalibration(), block, ragged=False, probe_interval=2)
    engine = SpeculativeEngine(model, tiny_drafter(model, block_size=block, seed=1), block, max_batch=3)
    engine.verify_policy = policy
    prompts = prompts_for(seed, 5)
    assert greedy_mismatches(engine, seed, prompts, N_TOKENS) == []
    assert policy.reports and all(ms > 0 for _, _, ms, _ in policy.reports)
    drafted = [(b, t) for b, t, _, clean in policy.reports if t is not None]
    assert drafted and all(t % b == 0 and 1 <= t // b <= block for b, t in drafted)
    unclean = [r for r in policy.reports if not r[3]]
    assert len(unclean) >= 5 and len(unclean) < len(policy.reports)  # each request's first steps
    learnt = cost.to_dict()["learnt"]["steps"]
    # most cells, not all: on a shared machine under the whole suite's load a cell of a few steps can
    # catch a preempted one (a step over 10 ms); were nothing learnt, every cell would sit at the profile
    below = [p for p in learnt if p["ms"] < p["profiled_ms"]]
    assert learnt and len(below) >= 0.8 * len(learnt)


class ScriptedDraftBlocks(ScriptedPolicy):
    """ScriptedPolicy whose drafted steps also cycle through shorter draft blocks (2, 4, the whole block):
    every width of each block, plain steps between."""

    def plan_for_batch(self, batch: int) -> VerifyPlan:
        plan = super().plan_for_batch(batch)
        plan.draft_block = [2, 4, self.block_size][self.step % 3]
        return plan

    def plan(self, confidences: torch.Tensor) -> VerifyPlan:
        drafted = confidences.shape[1] + 1
        self.kinds.append(f"block {drafted}")
        plan = super().plan(confidences)
        plan.widths = [min(w, drafted - 1) for w in plan.widths]
        return plan


@pytest.mark.parametrize("batch", [1, 4])
def test_switching_draft_blocks_is_lossless(batch: int) -> None:
    seed, block = 2, 8
    model = target(seed)
    engine = SpeculativeEngine(model, tiny_drafter(model, block_size=block, seed=5), block, max_batch=batch)
    policy = ScriptedDraftBlocks(block, engine)
    engine.verify_policy = policy
    assert greedy_mismatches(engine, seed, prompts_for(seed, 6), N_TOKENS) == []
    assert {"block 2", "block 4", "block 8", "plain"} <= set(policy.kinds)
    assert policy.context_gaps == []  # the drafter's context holds every committed token at each draft


def test_a_real_policy_drafts_the_cheaper_shorter_block_and_stays_lossless() -> None:
    """Block 8's draft made 20x dearer than block 4's: the real policy drafts block 4 and probes block 8
    now and then, and the output equals generate's."""
    seed, block = 4, 8
    model = target(seed)
    cost = StepCostModel(
        [(b, b * q, 10.0 + 0.01 * b * (q - 1)) for b in (1, 4) for q in (1, block)],
        [(b, k, ms) for b in (1, 4) for k, ms in ((4, 0.5), (block, 10.0))],
        block_size=block,
    )
    policy = VerifyWidthPolicy(
        cost,
        AcceptanceCalibration(),
        block,
        draft_blocks=[4, block],
        block_probe_interval=4,
        learn_costs=False,
    )
    drafted = []
    original = policy.plan

    def plan(confidences: torch.Tensor) -> VerifyPlan:
        drafted.append(confidences.shape[1] + 1)
        return original(confidences)

    policy.plan = plan
    engine = SpeculativeEngine(model, tiny_drafter(model, block_size=block, seed=6), block, max_batch=2)
    engine.verify_policy = policy
    assert greedy_mismatches(engine, seed, prompts_for(seed, 4), N_TOKENS) == []
    assert drafted.count(4) > drafted.count(block) > 0, drafted


def test_step_profile_times_the_shorter_drafts_too() -> None:
    model = target(0)
    engine = SpeculativeEngine(model, tiny_drafter(model, block_size=8), 8, max_batch=4)
    data = measure_step_costs(engine, repeats=3, draft_blocks=[4]).to_dict()
    assert sorted((p["batch"], p["block"]) for p in data["draft"]) == [(1, 4), (1, 8), (4, 4), (4, 8)]
    assert all(p["ms"] >= 0 for p in data["draft"])
