"""Batched forward of a Hugging Face causal LM over a per-row KV cache, with tapped hidden states.

The reference engine needs what ``model.generate`` cannot give it: rows of one batch at different lengths
(continuous batching), K/V cropped per row after verification, and the hidden states of chosen layers. So
this runs the HF model's own modules (embeddings, decoder layers' projections / norms / MLP, rotary table,
final norm, LM head: the weights and numerics are the model's) with its own attention over a
:class:`~sglang_ext.dflare.cache.RowKVCache`. Supported: Qwen3 and the Llama/Qwen2 family layout
(``q_norm``/``k_norm`` optional); sliding-window layers are refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sglang_ext.dflare.cache import RowKVCache

_REQUIRED = ("q_proj", "k_proj", "v_proj", "o_proj")


class UnsupportedTargetError(ValueError):
    """The target model's architecture is not one this runner implements."""


class TargetRunner:
    """Runs ``model`` (a HF ``*ForCausalLM``) on padded token blocks; taps ``tap_layers`` (0-based)."""

    def __init__(self, model: nn.Module, tap_layers: list[int] | tuple[int, ...] = ()) -> None:
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
            raise UnsupportedTargetError(f"{type(model).__name__}: expected a decoder-only *ForCausalLM")
        cfg = model.config
        self.model, self.config = model, cfg
        self.embed_tokens, self.layers, self.norm = inner.embed_tokens, inner.layers, inner.norm
        self.rotary_emb, self.lm_head = inner.rotary_emb, model.lm_head
        for i, layer in enumerate(self.layers):
            attn = getattr(layer, "self_attn", None)
            if attn is None or any(not hasattr(attn, n) for n in _REQUIRED):
                raise UnsupportedTargetError(f"layer {i} of {type(model).__name__} is not Llama/Qwen-style")
            if getattr(attn, "sliding_window", None):
                raise UnsupportedTargetError("sliding-window attention layers are not supported")
        num_layers = len(self.layers)
        if any(not 0 <= t < num_layers for t in tap_layers):
            raise UnsupportedTargetError(f"tap layers {list(tap_layers)} outside 0..{num_layers - 1}")
        self.tap_layers = list(tap_layers)
        self._tap_slot = {layer: i for i, layer in enumerate(self.tap_layers)}
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.max_context = int(getattr(cfg, "max_position_embeddings", 32768))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def new_cache(self, rows: int) -> RowKVCache:
        return RowKVCache(self.num_layers, self.num_kv_heads, self.head_dim, rows, self.dtype, self.device)

    def forward(
        self, cache: RowKVCache, ids: torch.Tensor, starts: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run rows ``0..b-1``: ``ids`` [b, q] (a row shorter than q is right-padded with any id) at
        positions ``starts[r] + 0..q-1``; their K/V are written into ``cache`` at those positions.

        Returns the final-normed hidden states [b, q, H] and the taps [b, q, T, H] (None without taps).
        The caller sets ``cache.lengths``: padding K/V lands past a row's length and is overwritten later.
        """
        b, q = ids.shape
        upto = max(starts) + q
        cache.ensure_capacity(upto)
        st = torch.tensor(starts, dtype=torch.int64, device=ids.device)
        positions = st[:, None] + torch.arange(q, device=ids.device)[None, :]  # [b, q]
        uniform = min(starts) == max(starts)
        offsets: torch.Tensor | int = starts[0] if uniform else st
        # causal over each row's own positions: key j visible to query i iff j <= starts[r] + i
        key_pos = torch.arange(upto, device=ids.device)
        mask = (key_pos[None, None, :] <= positions[:, :, None])[:, None]  # [b, 1, q, upto]
        if uniform and q == 1:
            mask = None  # one query per row, everything up to it is valid
        x = self.embed_tokens(ids)  # [b, q, H]
        cos, sin = self.rotary_emb(x, positions)  # [b, q, hd]
        cos, sin = cos[:, None], sin[:, None]  # [b, 1, q, hd]
        taps: list[torch.Tensor | None] = [None] * len(self.tap_layers)
        for i, layer in enumerate(self.layers):
            x = x + self._attention(i, layer.self_attn, layer.input_layernorm(x), cos, sin, cache, offsets,
                                    b, upto, mask)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            slot = self._tap_slot.get(i)
            if slot is not None:
                taps[slot] = x
        tapped = torch.stack(taps, dim=2) if taps else None  # type: ignore[arg-type]
        return self.norm(x), tapped

    def _attention(
        self,
        index: int,
        attn: nn.Module,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: RowKVCache,
        offsets: torch.Tensor | int,
        b: int,
        upto: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        shape = (*h.shape[:-1], -1, self.head_dim)
        q = attn.q_proj(h).view(shape)
        k = attn.k_proj(h).view(shape)
        if hasattr(attn, "q_norm"):  # Qwen3: per-head norms before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [b, heads, q, hd]
        v = attn.v_proj(h).view(shape).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        cache.write(index, k, v, offsets)
        k_all, v_all = cache.view(index, b, upto)
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=self.scale,
                                             enable_gqa=True)
        return attn.o_proj(out.transpose(1, 2).flatten(-2))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
