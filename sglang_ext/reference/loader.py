"""Build a :class:`SpeculativeEngine` from checkpoint directories (HF target + drafter of any dialect)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sglang_ext.dflare.checkpoint import dtype_from_name, load_drafter
from sglang_ext.reference.engine import CPU_MIN_DRAFT_CONFIDENCE, SpeculativeEngine

log = logging.getLogger(__name__)


def resolve_dtype(dtype: torch.dtype | str | None, device: str) -> torch.dtype:
    """None -> float32 on CPU (bf16 matmuls are slow there), bfloat16 on accelerators."""
    if dtype is None:
        return torch.float32 if device == "cpu" else torch.bfloat16
    return dtype if isinstance(dtype, torch.dtype) else dtype_from_name(dtype)


def load_target(target_dir: str | Path, dtype: torch.dtype, device: str = "cpu") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval()


def load_tokenizer(target_dir: str | Path) -> Any:
    """The target's tokenizer if the directory ships one (an engine without one cannot use stop strings).

    Checked by file: transformers would otherwise build an empty tokenizer from the model config.
    """
    from transformers import AutoTokenizer

    files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((Path(target_dir) / name).is_file() for name in files):
        log.info("no tokenizer files in %s: token ids only", target_dir)
        return None
    return AutoTokenizer.from_pretrained(str(target_dir))


def build_engine(
    target: torch.nn.Module,
    drafter: Any,
    block_size: int | None = None,
    tokenizer: Any = None,
    max_batch: int = 8,
    min_draft_confidence: float | None = None,
    verify_policy: bool | None = None,
    draft_blocks: Sequence[int] = (),
) -> SpeculativeEngine:
    """The engine with the CLIs' adaptivity. ``verify_policy`` True: the verify-width policy chooses each
    step's widths (its cost model profiled here: on the demo pair, one thread, 0.9 s at max_batch 1 and
    4.4 s at 8; then learnt from the engine's steps); False: the fixed threshold ``min_draft_confidence``
    (0 = the whole block; None = 0.02 on CPU, the whole block elsewhere); None (the default): the policy
    on CPU unless a threshold is given, the whole block elsewhere. On the demo pair the policy matches the
    0.02 threshold's speed (0.99-1.0x, docs/benchmarks.md) and adapts where a fixed threshold cannot
    (batch, machine load, drafter drift). ``draft_blocks``: shorter blocks the policy may also draft."""
    if verify_policy and min_draft_confidence is not None:
        raise ValueError("verify_policy and min_draft_confidence are alternatives: pass one")
    device = getattr(target, "device", None) or next(target.parameters()).device
    on_cpu = torch.device(device).type == "cpu"
    if verify_policy is None:
        verify_policy = on_cpu and min_draft_confidence is None
    if min_draft_confidence is None and not verify_policy:
        min_draft_confidence = CPU_MIN_DRAFT_CONFIDENCE if on_cpu else 0.0
    engine = SpeculativeEngine(target, drafter, block_size, tokenizer, max_batch, min_draft_confidence or 0.0)
    if verify_policy and engine.drafter is not None and engine.block_size > 1:
        from sglang_ext.reference.step_profile import measured_policy

        start = time.perf_counter()
        engine.verify_policy = policy = measured_policy(engine, draft_blocks)
        cost, block = policy.cost, engine.block_size
        log.info(
            "verify-width policy on, block %d; step costs measured in %.2f s (batch 1: decode %.2f ms, "
            "whole-block verify %.2f ms, draft %.2f ms)",
            block,
            time.perf_counter() - start,
            cost.decode_ms(1),
            cost.verify_ms(1, block),
            cost.draft_ms(1, block),
        )
    return engine


def load_engine(
    target_dir: str | Path,
    drafter_dir: str | Path | None,
    block_size: int | None = None,
    dtype: torch.dtype | str | None = None,
    device: str = "cpu",
    max_batch: int = 8,
    min_draft_confidence: float | None = None,
    verify_policy: bool | None = None,
) -> SpeculativeEngine:
    """Target (HF causal LM directory) + optional drafter; ``block_size`` defaults to the drafter's,
    ``min_draft_confidence`` and ``verify_policy`` as :func:`build_engine`."""
    torch_dtype = resolve_dtype(dtype, device)
    target = load_target(target_dir, torch_dtype, device)
    drafter = load_drafter(drafter_dir, dtype=torch_dtype, device=device) if drafter_dir else None
    return build_engine(
        target,
        drafter,
        block_size,
        load_tokenizer(target_dir),
        max_batch,
        min_draft_confidence,
        verify_policy,
    )
