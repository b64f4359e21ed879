"""A short profile of the reference engine's own forwards: the cost model of its verify-width policy.

What a verified token costs depends on the machine, the model and how many rows a forward carries (on a
CPU, small products scale with rows long before they are compute-bound), so the engine measures rather
than assumes: at start, for a batch of 1 and its largest batch, the target forward + LM head over 1..B
tokens per row (1 token = a plain decode step) and the drafter's forward + LM head over a block, each the
median of a few runs on scratch caches. About a second on the demo pair; the table is kept in memory
(``StepCostModel.to_json`` stores it for inspection).
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import TYPE_CHECKING

import torch

from sglang_ext.dflare.verify_policy import AcceptanceCalibration, StepCostModel, VerifyWidthPolicy

if TYPE_CHECKING:
    from sglang_ext.reference.engine import SpeculativeEngine

CONTEXT = 128  # cached tokens per row during the profile: a typical chat prompt's length


def _median_ms(fn, repeats: int) -> float:
    fn()  # first call: allocations and lazy weight copies out of the timing
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _widths(block_size: int) -> list[int]:
    """Tokens per row to time: 1 (decode), a few small widths (where CPU cost bends), and the block."""
    return sorted({1, 2, 3, 4, (block_size + 1) // 2 + 1, block_size} & set(range(1, block_size + 1)))


@torch.inference_mode()
def measure_step_costs(engine: SpeculativeEngine, repeats: int = 5, max_batch: int = 16) -> StepCostModel:
    """Time the engine's target and drafter forwards (see the module docstring) into a cost model."""
    runner, drafter = engine.runner, engine.drafter
    if drafter is None:
        raise ValueError("a step profile needs a drafter (block size > 1)")
    block = engine.block_size
    verify, drafts, decode = [], [], []
    for batch in sorted({1, min(engine.max_batch, max_batch)}):
        starts = [CONTEXT + r for r in range(batch)]  # rows at different lengths, as in a real batch
        cache = runner.new_cache(batch)
        dcache = drafter.new_cache(batch, runner.dtype, runner.device)
        for q in _widths(block):
            ids = torch.randint(0, runner.config.vocab_size, (batch, q), device=runner.device)

            def target(ids: torch.Tensor = ids, cache=cache, starts=starts) -> None:
                hidden, _ = runner.forward(cache, ids, starts)
                runner.logits(hidden)

            ms = _median_ms(target, repeats)
            verify.append((batch, batch * q, ms))
            if q == 1:
                decode.append((batch, ms))
        mask = drafter.config.mask_token_id
        ids = torch.tensor([[0] + [mask] * (block - 1)] * batch, device=runner.device)

        def draft(ids: torch.Tensor = ids, dcache=dcache, starts=starts) -> None:
            hidden = drafter.draft_hidden(dcache, ids, starts)
            logits = runner.logits(hidden[:, 1:])
            (logits.max(-1).values - logits.logsumexp(-1)).exp()  # the confidences the policy reads

        drafts.append((batch, block, _median_ms(draft, repeats)))
    return StepCostModel(
        verify,
        drafts,
        decode,
        device=f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        if runner.device.type == "cpu"
        else str(runner.device),
        model=f"{type(runner.model).__name__} {runner.num_layers} layers + {drafter.config.kind} drafter",
        block_size=block,
    )


def measured_policy(engine: SpeculativeEngine, **policy_args) -> VerifyWidthPolicy:
    """The engine's verify-width policy: its own forwards profiled now, a fresh calibration, and the
    padded cost of the reference engine (every row verifies as many tokens as the longest)."""
    return VerifyWidthPolicy(
        measure_step_costs(engine), AcceptanceCalibration(), engine.block_size, ragged=False, **policy_args
    )
