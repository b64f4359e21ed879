"""Tiny random Qwen3 targets and drafters: tests, `dflare generate --random`, benchmarks without weights."""

from __future__ import annotations

import torch

from sglang_ext.dflare.config import DFlareConfig, DrafterKind, build_target_layer_ids
from sglang_ext.dflare.model import DFlareDrafter


def tiny_target(
    vocab_size: int = 128,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_position_embeddings: int = 4096,
) -> torch.nn.Module:
    """A randomly initialised ``Qwen3ForCausalLM`` (untied head so that logits are not trivially peaked)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).to(dtype)
    return model.eval()


def tiny_drafter(
    target: torch.nn.Module,
    kind: DrafterKind = "dflare",
    block_size: int = 4,
    num_layers: int = 2,
    num_taps: int | None = None,
    seed: int = 1,
) -> DFlareDrafter:
    """A random drafter shaped for ``target`` (same hidden size, heads and dtype); mask id = last vocab id."""
    tcfg = target.config
    depth = tcfg.num_hidden_layers
    taps = num_taps or min(depth, 3)
    layer_ids = build_target_layer_ids(depth, taps) if depth > 3 else []
    if len(set(layer_ids)) < taps:  # too shallow for the upstream rule: spread over every layer
        if taps > depth:
            raise ValueError(f"{taps} taps need a target with at least {taps} layers, got {depth}")
        layer_ids = [round(i * (depth - 1) / max(taps - 1, 1)) for i in range(taps)]
    cfg = DFlareConfig(
        kind=kind,
        hidden_size=tcfg.hidden_size,
        intermediate_size=tcfg.intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=tcfg.num_attention_heads,
        num_key_value_heads=tcfg.num_key_value_heads,
        head_dim=getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads,
        vocab_size=tcfg.vocab_size,
        target_layer_ids=layer_ids,
        target_num_hidden_layers=depth,
        block_size=block_size,
        mask_token_id=tcfg.vocab_size - 1,
        rms_norm_eps=tcfg.rms_norm_eps,
        rope_theta=float(
            (getattr(tcfg, "rope_parameters", None) or {}).get("rope_theta")
            or getattr(tcfg, "rope_theta", 10000.0)
        ),
        max_position_embeddings=tcfg.max_position_embeddings,
    )
    torch.manual_seed(seed)
    drafter = DFlareDrafter(cfg)
    drafter.init_fusion_weights()
    return drafter.to(next(target.parameters()).dtype).eval()
