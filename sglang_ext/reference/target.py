"""Batched forward of a Hugging Face causal LM over a per-row KV cache, with tapped hidden states.

The reference engine needs what ``model.generate`` cannot give it: rows of one batch at different lengths
(continuous batching), K/V cropped per row after verification, and the hidden states of chosen layers. So
this runs the HF model's own weights (embeddings, projections, norms, MLP, rotary table, final norm, LM
head) with its own attention over a :class:`~sglang_ext.dflare.cache.RowKVCache`. Supported: Qwen3 and
the Llama/Qwen2 family layout (``q_norm``/``k_norm`` optional, SiLU MLP); sliding-window layers are refused.

Small models are overhead-bound on CPU (a decode step is hundreds of tiny ops), so the forward keeps the op
count per layer low without changing a bit of its results: q and k heads share one per-head norm and one
RoPE call, RoPE reads cos/sin tables built once, a boolean mask becomes additive once per forward instead
of once per layer, and for models below 300M parameters (``fuse=None``) each layer's q/k/v and gate/up
projections run as one product each, and those and the LM head from transposed copies
(:class:`~sglang_ext.dflare.linear.StackedLinear`; the HF model is untouched).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sglang_ext.dflare import ops
from sglang_ext.dflare.cache import RowKVCache
from sglang_ext.dflare.linear import COPY_BELOW_PARAMS, DecoderLayerWeights, StackedLinear

_REQUIRED = ("q_proj", "k_proj", "v_proj", "o_proj")


class UnsupportedTargetError(ValueError):
    """The target model's architecture is not one this runner implements."""


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
            fuse = sum(p.numel() for p in params) < COPY_BELOW_PARAMS
        self.layers = [self._prepare(i, layer, fuse) for i, layer in enumerate(inner.layers)]
        self._lm_head = StackedLinear([self.lm_head], fuse)  # a transposed copy for small models
        rope_type = getattr(self.rotary_emb, "rope_type", "default")
        self._rope_by_length = rope_type in ("dynamic", "longrope")
        # cos and signed sin of positions 0..n-1 (see _rope); grown on demand
        self._cos = self._sin_signed = torch.empty(0, self.head_dim, dtype=self.dtype, device=self.device)

    def _prepare(self, index: int, layer: nn.Module, fuse: bool) -> DecoderLayerWeights:
        attn = getattr(layer, "self_attn", None)
        if attn is None or any(not hasattr(attn, n) for n in _REQUIRED) or not hasattr(layer, "mlp"):
            name = type(self.model).__name__
            raise UnsupportedTargetError(f"layer {index} of {name} is not Llama/Qwen-style")
        if getattr(attn, "sliding_window", None):
            raise UnsupportedTargetError("sliding-window attention layers are not supported")
        return DecoderLayerWeights.of(layer, self.num_heads, self.num_kv_heads, fuse)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def new_cache(self, rows: int) -> RowKVCache:
        return RowKVCache(self.num_layers, self.num_kv_heads, self.head_dim, rows, self.dtype, self.device)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (:func:`~sglang_ext.dflare.ops.signed_sin`) [..., hd] of integer positions.

        Read from tables built once by the model's own rotary embedding (so its scaling applies), except
        for rope types whose tables depend on the sequence length ("dynamic", "longrope")."""
        if self._rope_by_length:
            cos, sin = self.rotary_emb(self._cos, positions.reshape(1, -1))
            return cos[0].view(*positions.shape, -1), ops.signed_sin(sin[0]).view(*positions.shape, -1)
        upto = int(positions.max()) + 1
        if self._cos.shape[0] < upto:
            n = max(upto, 2 * self._cos.shape[0], 256)
            cos, sin = self.rotary_emb(self._cos, torch.arange(n, device=self.device)[None])
            self._cos, self._sin_signed = cos[0], ops.signed_sin(sin[0])
        return self._cos[positions], self._sin_signed[positions]

    def _additive(self, visible: torch.Tensor) -> torch.Tensor:
        """Boolean mask -> 0 / -inf, the form SDPA converts a boolean mask to (here once, not per layer)."""
        return torch.zeros(visible.shape, dtype=self.dtype, device=visible.device).masked_fill_(
            visible.logical_not(), float("-inf")
        )

    def forward(
        self, cache: RowKVCache, ids: torch.Tensor, starts: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run rows ``0..b-1``: ``ids`` [b, q] (a row shorter than q is right-padded with any id) at
        positions ``starts[r] + 0..q-1``; their K/V are written into ``cache`` at those positions.

        Returns the final-normed hidden states [b, q, H] and the taps [b, q, T, H] (None without taps).
        The caller sets ``cache.lengths``: padding K/V lands past a row's length and is overwritten later.
        """
        q = ids.shape[1]
        upto = max(starts) + q
        cache.ensure_capacity(upto)
        dev = ids.device
        offsets: torch.Tensor | int
        if min(starts) == max(starts):  # every row at the same positions: [q] tables, slice writes
            offsets = starts[0]
            positions = torch.arange(offsets, upto, device=dev)  # [q]
        else:
            offsets = torch.tensor(starts, dtype=torch.int64, device=dev)
            positions = offsets[:, None] + torch.arange(q, device=dev)[None, :]  # [b, q]
        cos, sin = self._rope(positions)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [(b,) q, 1, hd]: broadcast over heads
        mask = None  # one query per row at a common position: every cached key is visible
        if positions.dim() == 2 or q > 1:  # causal: key j visible to query i iff j <= position of i
            visible = torch.arange(upto, device=dev) <= positions.unsqueeze(-1)  # [(b,) q, upto]
            mask = self._additive(visible if visible.dim() == 2 else visible[:, None])
        x = self.embed_tokens(ids)  # [b, q, H]
        taps: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            h = ops.rms_norm(x, layer.input_norm, self.eps)
            x = x + self._attention(i, layer, h, cos, sin, cache, offsets, upto, mask)
            h = ops.rms_norm(x, layer.post_norm, self.eps)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
            if i in self._tap_slot:
                taps[i] = x
        # [b, q, T, H], in the drafter's tap order (its concatenation order)
        tapped = torch.stack([taps[t] for t in self.tap_layers], dim=2) if taps else None
        return ops.rms_norm(x, self.norm.weight, self.eps), tapped

    def _attention(
        self,
        index: int,
        layer: DecoderLayerWeights,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: RowKVCache,
        offsets: torch.Tensor | int,
        upto: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        b = h.shape[0]
        nq, nqk = self.num_heads, self.num_heads + self.num_kv_heads
        heads = layer.qkv(h).unflatten(-1, (-1, self.head_dim))  # [b, q, nq + 2 nkv, hd]
        qk = heads[:, :, :nqk]
        if layer.qk_norm is not None:  # Qwen3: per-head norms before RoPE
            qk = ops.rms_norm(qk, layer.qk_norm, self.eps)
        qk = ops.apply_rope_signed(qk, cos, sin)
        q, k = qk[:, :, :nq].transpose(1, 2), qk[:, :, nq:].transpose(1, 2)  # [b, heads, q, hd]
        v = heads[:, :, nqk:].transpose(1, 2)
        cache.write(index, k, v, offsets)
        k_all, v_all = cache.view(index, b, upto)
        out = F.scaled_dot_product_attention(
            q, k_all, v_all, attn_mask=mask, scale=self.scale, enable_gqa=True
        )  # [b, nh, q, hd]
        return layer.o(out.transpose(1, 2).flatten(-2))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._lm_head(hidden)
