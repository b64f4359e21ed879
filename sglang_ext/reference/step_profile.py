"""A short profile of the reference engine's own steps: the cost model of its verify-width policy.

What a verified token costs depends on the machine, the model and how many rows a forward carries (on a
CPU, small products scale with rows long before they are compute-bound), so the engine measures rather
than assumes. It times whole engine steps, not bare forwards, because a step also samples, accepts,
commits and feeds the drafter its context, and those costs are part of what a width or a draft buys: on
a scratch engine sharing the models, for a batch of 1 and the largest batch (at most 16), steps that
decode plainly, that draft and verify nothing, and that draft and verify 1..B-1 drafts per row. Then
decode = the fastest plain step; draft = the drafted step without verified drafts minus the plain step;
the verify of width w = decode + the step at width w minus the step that verified none. Every kind runs
once per round and the differences are taken within a round, median over rounds, so the load of a shared
machine, which drifts within seconds, cancels out of the ratios the policy acts on. About 0.9 s on the
demo pair at batch 1 and 4.4 s up to batch 8 (one thread); kept in memory (``StepCostModel.to_json``
stores it for inspection), then corrected by the engine's measured steps.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from sglang_ext.dflare.verify_policy import (
    AcceptanceCalibration,
    StepCostModel,
    VerifyPlan,
    VerifyWidthPolicy,
)
from sglang_ext.reference.sampling import SamplingParams

if TYPE_CHECKING:
    from sglang_ext.reference.engine import SpeculativeEngine

CONTEXT = 128  # prompt tokens per profiled request: a typical chat prompt's length
PLAIN = -1  # a step key: plain decode (no draft)
# steps between the policy's lessons (costs, calibration): a step of the demo pair at batch 1 is a few ms,
# and learning after every one of them cost the policy a few % of its speed
LEARN_EVERY = 8


class _FixedWidth(VerifyWidthPolicy):
    """Makes every step of the scratch engine the kind being timed: ``width`` drafts per row, or PLAIN, of a
    draft of ``draft_block``."""

    def __init__(self, block_size: int) -> None:
        cost = StepCostModel([(1, 1, 1.0)], [(1, block_size, 1.0)])
        super().__init__(cost, AcceptanceCalibration(), block_size)
        self.width, self.draft_block = PLAIN, block_size

    def plan_for_batch(self, batch: int) -> VerifyPlan:
        return VerifyPlan([0] * batch, self.width == PLAIN, self.draft_block, 0.0, 1.0)

    def plan(self, confidences: torch.Tensor) -> VerifyPlan:
        return VerifyPlan([self.width] * confidences.shape[0], False, confidences.shape[1] + 1, 0.0, 1.0)

    def observe_step(self, *args, **kwargs) -> None:
        """The profile times the steps itself."""


def _widths(block_size: int) -> list[int]:
    """Drafts per row to time: none, a few small widths (where CPU cost bends), and the whole block."""
    return sorted({0, 1, 2, 3, block_size // 2, block_size - 1} & set(range(block_size)))


def _step_ms(
    engine: SpeculativeEngine, policy: _FixedWidth, width: int, rows: int, draft_block: int | None = None
) -> float:
    """One timed step of ``rows`` decoding requests at ``width`` of a draft of ``draft_block`` (default the
    engine's block; refilled untimed when some finished)."""
    from sglang_ext.reference.engine import Request

    vocab, prompt = engine.runner.config.vocab_size, min(CONTEXT, engine.max_context // 4)
    if sum(s.prefilled for s in engine._slots) < rows or len(engine._slots) > rows:
        while engine.has_work():  # finish what is left, then start fresh rows
            for s in engine._slots:
                engine.abort(s.req.request_id)
            engine.step()
        for r in range(rows):
            ids = torch.randint(0, vocab - 1, (prompt,)).tolist()
            engine.add_request(Request(f"profile-{time.perf_counter_ns()}-{r}", ids, _PARAMS))
        policy.width = PLAIN
        engine.step()  # prefill
    policy.width, policy.draft_block = width, draft_block or engine.block_size
    start = time.perf_counter()
    engine.step()
    return (time.perf_counter() - start) * 1e3


_PARAMS = SamplingParams(max_tokens=10**6)


@torch.inference_mode()
def measure_step_costs(
    engine: SpeculativeEngine, repeats: int = 9, max_batch: int = 16, draft_blocks: Sequence[int] = ()
) -> StepCostModel:
    """Time the engine's steps by kind (see the module docstring) into a cost model; ``draft_blocks``:
    shorter blocks whose drafts are timed too (a drafted step verifying none, minus the plain step)."""
    from sglang_ext.reference.engine import SpeculativeEngine

    if engine.drafter is None:
        raise ValueError("a step profile needs a drafter (block size > 1)")
    block = engine.block_size
    verify, drafts, decodes = [], [], []
    for batch in sorted({1, min(engine.max_batch, max_batch)}):
        policy = _FixedWidth(block)
        scratch = SpeculativeEngine(
            engine.runner, engine.drafter, block, max_batch=batch, verify_policy=policy
        )
        kinds = [(PLAIN, block), *((w, block) for w in _widths(block)), *((0, b) for b in draft_blocks)]
        for width, drafted in kinds:  # first calls: allocations out of the timing
            _step_ms(scratch, policy, width, batch, drafted)
        rounds = []
        for _ in range(repeats):  # every kind once per round, close in time: a load change hits all alike
            rounds.append({(w, b): _step_ms(scratch, policy, w, batch, b) for w, b in kinds})
        decode = min(r[(PLAIN, block)] for r in rounds)
        decodes.append((batch, decode))
        for drafted in (block, *draft_blocks):
            draft = max(statistics.median(r[(0, drafted)] - r[(PLAIN, block)] for r in rounds), 0.0)
            drafts.append((batch, drafted, draft))
        for w in _widths(block):  # the step at width w over the step that verified none, paired per round
            extra = max(statistics.median(r[(w, block)] - r[(0, block)] for r in rounds), 0.0)
            verify.append((batch, batch * (w + 1), decode + extra))
    runner, kind = engine.runner, engine.drafter.config.kind
    return StepCostModel(
        verify,
        drafts,
        decodes,
        device=f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        if runner.device.type == "cpu"
        else str(runner.device),
        model=f"{type(runner.model).__name__} {runner.num_layers} layers + {kind} drafter",
        block_size=block,
        learn_every=LEARN_EVERY,
    )


def measured_policy(
    engine: SpeculativeEngine, draft_blocks: Sequence[int] = (), **policy_args
) -> VerifyWidthPolicy:
    """The engine's verify-width policy: its own steps profiled now, a fresh calibration, and the padded
    cost of the reference engine (every row verifies as many tokens as the longest). ``draft_blocks``:
    shorter blocks it may draft (their drafts profiled too)."""
    shorter = sorted({int(b) for b in draft_blocks} - {engine.block_size})
    return VerifyWidthPolicy(
        measure_step_costs(engine, draft_blocks=shorter),
        AcceptanceCalibration(fold_every=LEARN_EVERY),
        engine.block_size,
        ragged=False,
        draft_blocks=[*shorter, engine.block_size],
        **policy_args,
    )
