"""A short profile of the reference engine's own forwards: the cost model of its verify-width policy.

What a verified token costs depends on the machine, the model and how many rows a forward carries (on a
CPU, small products scale with rows long before they are compute-bound), so the engine measures rather
than assumes: at start, for a batch of 1 and its largest batch, the target forward + LM head over 1..B
tokens per row (1 token = a plain decode step) and the drafter's forward + LM head over a block, each the
fastest of a few runs taking turns, on scratch caches. Under a second on the demo pair; the table is kept
in memory (``StepCostModel.to_json`` stores it for inspection).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch

from sglang_ext.dflare.verify_policy import AcceptanceCalibration, StepCostModel, VerifyWidthPolicy

if TYPE_CHECKING:
    from sglang_ext.dflare.cache import RowKVCache
    from sglang_ext.dflare.model import DFlareDrafter
    from sglang_ext.reference.engine import SpeculativeEngine
    from sglang_ext.reference.target import TargetRunner

CONTEXT = 128  # cached tokens per row during the profile: a typical chat prompt's length


def _fastest_ms(calls: dict[tuple[str, int, int], Callable[[], None]], repeats: int) -> dict:
    """Each call's fastest of ``repeats`` runs, in ms, the calls taking turns (round-robin) so a change
    in the machine's load hits all of them alike. The fastest, not the median: on a shared machine other
    processes only ever add time, and the policy needs the costs' ratios, not one moment's slowdown."""
    for fn in calls.values():
        fn()  # first call: allocations and lazy weight copies out of the timing
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats):
        for key, fn in calls.items():
            start = time.perf_counter()
            fn()
            best[key] = min(best[key], (time.perf_counter() - start) * 1e3)
    return best


def _widths(block_size: int) -> list[int]:
    """Tokens per row to time: 1 (decode), a few small widths (where CPU cost bends), and the block."""
    return sorted({1, 2, 3, 4, (block_size + 1) // 2 + 1, block_size} & set(range(1, block_size + 1)))


@torch.inference_mode()
def measure_step_costs(engine: SpeculativeEngine, repeats: int = 7, max_batch: int = 16) -> StepCostModel:
    """Time the engine's target and drafter forwards (see the module docstring) into a cost model."""
    runner, drafter = engine.runner, engine.drafter
    if drafter is None:
        raise ValueError("a step profile needs a drafter (block size > 1)")
    block = engine.block_size
    calls: dict[tuple[str, int, int], Callable[[], None]] = {}
    for batch in sorted({1, min(engine.max_batch, max_batch)}):
        starts = [CONTEXT + r for r in range(batch)]  # rows at different lengths, as in a real batch
        cache = runner.new_cache(batch)
        for q in _widths(block):
            ids = torch.randint(0, runner.config.vocab_size, (batch, q), device=runner.device)
            calls["verify", batch, q] = partial(_target_step, runner, cache, ids, starts)
        dcache = drafter.new_cache(batch, runner.dtype, runner.device)
        mask = drafter.config.mask_token_id
        ids = torch.tensor([[0] + [mask] * (block - 1)] * batch, device=runner.device)
        calls["draft", batch, block] = partial(_draft_step, drafter, runner, dcache, ids, starts)
    ms = _fastest_ms(calls, repeats)
    verify = [(b, b * q, t) for (kind, b, q), t in ms.items() if kind == "verify"]
    return StepCostModel(
        verify,
        [(b, k, t) for (kind, b, k), t in ms.items() if kind == "draft"],
        [(b, t) for (kind, b, q), t in ms.items() if kind == "verify" and q == 1],
        device=f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        if runner.device.type == "cpu"
        else str(runner.device),
        model=f"{type(runner.model).__name__} {runner.num_layers} layers + {drafter.config.kind} drafter",
        block_size=block,
    )


def _target_step(runner: TargetRunner, cache: RowKVCache, ids: torch.Tensor, starts: list[int]) -> None:
    hidden, _ = runner.forward(cache, ids, starts)
    runner.logits(hidden)


def _draft_step(
    drafter: DFlareDrafter, runner: TargetRunner, cache: RowKVCache, ids: torch.Tensor, starts: list[int]
) -> None:
    hidden = drafter.draft_hidden(cache, ids, starts)
    logits = runner.logits(hidden[:, 1:])
    (logits.max(-1).values - logits.logsumexp(-1)).exp()  # the confidences the policy reads


def measured_policy(engine: SpeculativeEngine, **policy_args) -> VerifyWidthPolicy:
    """The engine's verify-width policy: its own forwards profiled now, a fresh calibration, and the
    padded cost of the reference engine (every row verifies as many tokens as the longest)."""
    return VerifyWidthPolicy(
        measure_step_costs(engine), AcceptanceCalibration(), engine.block_size, ragged=False, **policy_args
    )
