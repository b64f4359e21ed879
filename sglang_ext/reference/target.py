"""Batched forward of a Hugging Face causal LM over a per-row KV cache, with tapped hidden states.

The reference engine needs what ``model.generate`` cannot give it: rows of one batch at different lengths
(continuous batching), K/V cropped per row after verification, and the hidden states of chosen layers. So
this runs the HF model's own weights (embeddings, projections, norms, MLP, rotary table, final norm, LM
head) with its own attention over a :class:`~sglang_ext.dflare.cache.RowKVCache`. Supported: Qwen3 and
the Llama/Qwen2 family layout (``q_norm``/``k_norm`` optional, SiLU MLP); sliding-window layers are refused.

Small models are overhead-bound on CPU, so for them (``fuse=None``: below 300M parameters) each layer's
q/k/v and gate/up weights are concatenated once into one matmul each (a copy; the HF model is untouched).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sglang_ext.dflare import ops
from sglang_ext.dflare.cache import RowKVCache

_REQUIRED = ("q_proj", "k_proj", "v_proj", "o_proj")
_FUSE_BELOW_PARAMS = 300_000_000


class UnsupportedTargetError(ValueError):
    """The target model's architecture is not one this runner implements."""


@dataclass
class _Layer:
    """One decoder layer's weights as plain tensors (fused where ``qkv``/``gate_up`` are set)."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    qkv: torch.Tensor | None
    qkv_bias: torch.Tensor | None
    gate_up: torch.Tensor | None
    module: nn.Module


class TargetRunner:
    """Runs ``model`` (a HF ``*ForCausalLM``) on padded token blocks; taps ``tap_layers`` (0-based)."""

    def __init__(
        self, model: nn.Module, tap_layers: list[int] | tuple[int, ...] = (), fuse: bool | None = None
    ) -> None:
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
            raise UnsupportedTargetError(f"{type(model).__name__}: expected a decoder-only *ForCausalLM")
        cfg = model.config
        self.model, self.config = model, cfg
        self.embed_tokens, self.norm = inner.embed_tokens, inner.norm
        self.rotary_emb, self.lm_head = inner.rotary_emb, model.lm_head
        num_layers = len(inner.layers)
        if any(not 0 <= t < num_layers for t in tap_layers):
            raise UnsupportedTargetError(f"tap layers {list(tap_layers)} outside 0..{num_layers - 1}")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise UnsupportedTargetError(f"only SiLU-gated MLPs are supported, got {cfg.hidden_act!r}")
        self.tap_layers = list(tap_layers)
        self._tap_slot = set(self.tap_layers)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5
        self.eps = float(getattr(cfg, "rms_norm_eps", 1e-6))
        params = list(model.parameters())
        self.dtype, self.device = params[0].dtype, params[0].device
        self.max_context = int(getattr(cfg, "max_position_embeddings", 32768))
        if fuse is None:
            fuse = sum(p.numel() for p in params) < _FUSE_BELOW_PARAMS
        self.layers = [self._prepare(i, layer, fuse) for i, layer in enumerate(inner.layers)]

    def _prepare(self, index: int, layer: nn.Module, fuse: bool) -> _Layer:
        attn = getattr(layer, "self_attn", None)
        if attn is None or any(not hasattr(attn, n) for n in _REQUIRED) or not hasattr(layer, "mlp"):
            name = type(self.model).__name__
            raise UnsupportedTargetError(f"layer {index} of {name} is not Llama/Qwen-style")
        if getattr(attn, "sliding_window", None):
            raise UnsupportedTargetError("sliding-window attention layers are not supported")
        projs = (attn.q_proj, attn.k_proj, attn.v_proj)
        has_bias = attn.q_proj.bias is not None
        with torch.no_grad():
            qkv = torch.cat([p.weight for p in projs]) if fuse else None
            qkv_bias = torch.cat([p.bias for p in projs]) if fuse and has_bias else None
            mlp = layer.mlp
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]) if fuse else None
        q_norm = attn.q_norm.weight if hasattr(attn, "q_norm") else None
        k_norm = attn.k_norm.weight if hasattr(attn, "k_norm") else None
        return _Layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight, q_norm, k_norm,
                      qkv, qkv_bias, gate_up, layer)

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
        uniform = min(starts) == max(starts)
        if uniform:
            positions = torch.arange(starts[0], starts[0] + q, device=ids.device)[None].expand(b, q)
        else:
            st = torch.tensor(starts, dtype=torch.int64, device=ids.device)
            positions = st[:, None] + torch.arange(q, device=ids.device)[None, :]  # [b, q]
        offsets: torch.Tensor | int = starts[0] if uniform else positions[:, 0]
        mask = None  # one query per row at a common position: every cached key is visible
        if not (uniform and q == 1):
            # causal over each row's own positions: key j visible to query i iff j <= starts[r] + i
            key_pos = torch.arange(upto, device=ids.device)
            mask = (key_pos[None, None, :] <= positions[:, :, None])[:, None]  # [b, 1, q, upto]
        x = self.embed_tokens(ids)  # [b, q, H]
        cos, sin = self.rotary_emb(x, positions)  # [b, q, hd]
        cos, sin = cos[:, None], sin[:, None]  # [b, 1, q, hd]
        taps: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            h = ops.rms_norm(x, layer.input_norm, self.eps)
            x = x + self._attention(i, layer, h, cos, sin, cache, offsets, b, upto, mask)
            x = x + self._mlp(layer, ops.rms_norm(x, layer.post_norm, self.eps))
            if i in self._tap_slot:
                taps[i] = x
        # [b, q, T, H], in the drafter's tap order (its concatenation order)
        tapped = torch.stack([taps[t] for t in self.tap_layers], dim=2) if taps else None
        return self.norm(x), tapped

    def _qkv(self, layer: _Layer, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if layer.qkv is None:
            attn = layer.module.self_attn
            return attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        nq, nkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return F.linear(h, layer.qkv, layer.qkv_bias).split((nq, nkv, nkv), dim=-1)

    def _mlp(self, layer: _Layer, h: torch.Tensor) -> torch.Tensor:
        mlp = layer.module.mlp
        if layer.gate_up is None:
            return mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        gate, up = F.linear(h, layer.gate_up).chunk(2, dim=-1)
        return mlp.down_proj(F.silu(gate) * up)

    def _attention(
        self,
        index: int,
        layer: _Layer,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: RowKVCache,
        offsets: torch.Tensor | int,
        b: int,
        upto: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        q, k, v = self._qkv(layer, h)
        shape = (*h.shape[:-1], -1, self.head_dim)
        q, k, v = q.view(shape), k.view(shape), v.view(shape)
        if layer.q_norm is not None:  # Qwen3: per-head norms before RoPE
            q, k = ops.rms_norm(q, layer.q_norm, self.eps), ops.rms_norm(k, layer.k_norm, self.eps)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, heads, q, hd]
        q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
        cache.write(index, k, v, offsets)
        k_all, v_all = cache.view(index, b, upto)
        out = F.scaled_dot_product_attention(
            q, k_all, v_all, attn_mask=mask, scale=self.scale, enable_gqa=True
        )  # [b, nh, q, hd]
        return layer.module.self_attn.o_proj(out.transpose(1, 2).flatten(-2))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
