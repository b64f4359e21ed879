"""Load a target (+ drafter) into a ready :class:`OpenAIServing` (imports torch; call off the loop)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from sglang_ext.engine_server.runner import EngineRunner
from sglang_ext.engine_server.serving import OpenAIServing

logger = logging.getLogger(__name__)
NO_TOKENIZER_LIMIT = 2**62  # longer than any prompt: the tokenizer's own length check never fires


def _generation_config(target_dir: Path) -> dict[str, Any]:
    path = target_dir / "generation_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def stop_token_ids(tokenizer: Any, generation_config: dict[str, Any]) -> tuple[int, ...]:
    """End-of-sequence ids: the generation config's (int or list) plus the tokenizer's."""
    ids: list[int] = []
    eos = generation_config.get("eos_token_id")
    ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(int(i) for i in ids))


def sampling_defaults(generation_config: dict[str, Any]) -> dict[str, Any]:
    """The model's own sampling defaults, as SGLang applies them when a request leaves them unset."""
    return {k: generation_config[k] for k in ("temperature", "top_p", "top_k") if k in generation_config}


def load_serving(
    target_dir: Path | str,
    drafter_dir: Path | str | None,
    *,
    model_name: str,
    block_size: int | None = None,
    max_batch: int = 8,
    max_waiting: int = 64,
    threads: int = 0,
    device: str = "cpu",
    min_draft_confidence: float | None = None,
    verify_policy: bool | None = None,
) -> OpenAIServing:
    """Engine + tokenizer + serving; start ``serving.runner`` inside the event loop afterwards."""
    import torch
    from transformers import AutoTokenizer

    from sglang_ext.reference import load_engine

    if threads:
        torch.set_num_threads(threads)
    target_dir = Path(target_dir)
    engine = load_engine(
        target_dir,
        Path(drafter_dir) if drafter_dir else None,
        block_size=block_size,
        device=device,
        max_batch=max_batch,
        min_draft_confidence=min_draft_confidence,
        verify_policy=verify_policy,
    )
    if engine.tokenizer is None:  # the engine matches stop strings, so it needs the tokenizer too
        engine.tokenizer = AutoTokenizer.from_pretrained(target_dir)
    tokenizer = engine.tokenizer
    # The serving layer refuses a prompt beyond the context itself, with an OpenAI error. The
    # tokenizer's own length check would only add a transformers warning to the log for every such
    # prompt ("sequence length is longer than the specified maximum"), so it is lifted.
    tokenizer.model_max_length = NO_TOKENIZER_LIMIT
    gen_config = _generation_config(target_dir)
    logger.info(
        "engine ready: %s, drafter %s, block size %s, context %d",
        target_dir,
        drafter_dir,
        getattr(engine, "block_size", None),
        engine.max_context,
    )
    return OpenAIServing(
        EngineRunner(engine, max_waiting),
        tokenizer,
        model_name,
        max_context=int(engine.max_context),
        stop_token_ids=stop_token_ids(tokenizer, gen_config),
        sampling_defaults=sampling_defaults(gen_config),
    )
