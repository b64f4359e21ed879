"""``DFlareDrafter``: the pure-PyTorch DFlare and DFlash block drafters from one code path.

A drafter reads tapped target hidden states (the *context*) and a block of ``B`` token embeddings
(``[last committed token, MASK x (B-1)]``) and predicts the block's tokens in one non-causal forward.
DFlash turns the concatenated taps into one context feature (``fc`` + ``hidden_norm``) shared by every
draft layer and projects it with the layer's ``k_proj``/``v_proj``; DFlare mixes the taps per draft layer
(softmax rows of ``layer_fusion_weights``), applies the shared ``hidden_norm`` and projects with per-layer
``k_proj_target``/``v_proj_target``. Module names equal checkpoint tensor names. The target's
``embed_tokens`` and ``lm_head`` are borrowed (:meth:`DFlareDrafter.bind_target`), never stored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from sglang_ext.dflare import ops
from sglang_ext.dflare.config import DFlareConfig

if TYPE_CHECKING:
    from sglang_ext.dflare.cache import RowKVCache

# attention(q [b, nh, Q, hd], k [b, nkv, S, hd], v, mask [b, 1, Q|1, S] bool | None, scale) -> [b, nh, Q, hd]
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, float], torch.Tensor]


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Non-causal grouped-query attention; ``mask`` True = may attend."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class DraftMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftAttention(nn.Module):
    """Q from the block only; K/V = [context ; block]; no causal mask."""

    def __init__(self, cfg: DFlareConfig) -> None:
        super().__init__()
        h, hd, bias = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = hd
        self.scale = hd**-0.5
        self.q_proj = nn.Linear(h, self.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * hd, h, bias=bias)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)  # per head
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)  # per head, shared by context and block keys
        if cfg.kind == "dflare":
            self.k_proj_target = nn.Linear(h, self.num_kv_heads * hd, bias=bias)
            self.v_proj_target = nn.Linear(h, self.num_kv_heads * hd, bias=bias)

    def block_qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [b, Q, H] -> q [b, nh, Q, hd], k/v [b, nkv, Q, hd] (normed, rotated)."""
        q = self.q_norm(self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim)))  # [b, Q, nh, hd]
        k = self.k_norm(self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim)))
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [b, Q, 1, hd]
        q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


class DraftLayer(nn.Module):
    def __init__(self, cfg: DFlareConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DraftAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = DraftMLP(cfg.hidden_size, cfg.intermediate_size)


class DFlareDrafter(nn.Module):
    """DFlare (``cfg.kind == "dflare"``) or DFlash (``"dflash"``) drafter; see the module docstring."""

    def __init__(self, cfg: DFlareConfig, attention: AttentionFn = sdpa_attention) -> None:
        super().__init__()
        self.config = cfg
        self.attention = attention
        h, t, d = cfg.hidden_size, cfg.num_taps, cfg.num_hidden_layers
        self.layers = nn.ModuleList(DraftLayer(cfg) for _ in range(d))
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        if cfg.kind == "dflare":
            self.layer_fusion_weights = nn.Parameter(torch.zeros(d, t))
        else:
            self.fc = nn.Linear(t * h, h, bias=False)
        self.register_buffer("inv_freq", ops.rope_inv_freq(cfg.head_dim, cfg.rope_theta), persistent=False)
        self._embed: nn.Module | None = None
        self._lm_head: nn.Module | None = None
        self._frozen_kv: tuple[tuple[int, ...], torch.Tensor] | None = None

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        """Move the RoPE table with the module but never change its dtype.

        ``drafter.to(torch.bfloat16)`` would otherwise round ``inv_freq`` to bf16, and keys at long
        absolute positions would drift from the target's float32 rotary table.
        """
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(device=self.inv_freq.device)
        return self

    # ---- borrowed target modules -----------------------------------------------------------------
    def bind_target(self, embed_tokens: nn.Module, lm_head: nn.Module) -> None:
        """Borrow the target's embedding and LM head (kept out of ``state_dict`` and ``parameters``)."""
        object.__setattr__(self, "_embed", embed_tokens)
        object.__setattr__(self, "_lm_head", lm_head)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self._embed is None:
            raise RuntimeError("DFlareDrafter.bind_target(embed_tokens, lm_head) was not called")
        return self._embed(ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._lm_head is None:
            raise RuntimeError("DFlareDrafter.bind_target(embed_tokens, lm_head) was not called")
        return self._lm_head(hidden)

    def init_fusion_weights(self) -> None:
        """AngelSlim's training init: logit 2.0 at tap ``min(T-1, d*T//D)`` for draft layer d, else 0."""
        if self.config.kind != "dflare":
            return
        d, t = self.layer_fusion_weights.shape
        with torch.no_grad():
            self.layer_fusion_weights.zero_()
            for i in range(d):
                self.layer_fusion_weights[i, min(t - 1, i * t // d)] = 2.0

    # ---- context -----------------------------------------------------------------------------------
    def context_features(self, taps: torch.Tensor) -> torch.Tensor:
        """taps [..., T, H] -> normalised context features [..., D, H] (DFlare) or [..., 1, H] (DFlash)."""
        eps = self.config.rms_norm_eps
        if self.config.kind == "dflare":
            probs = ops.fusion_probabilities(self.layer_fusion_weights)
            return ops.fuse_context(taps, probs, self.hidden_norm.weight, eps)
        return ops.dflash_context(taps, self.fc.weight, self.hidden_norm.weight, eps)

    def context_kv_weight(self) -> torch.Tensor:
        """[D, H, 2*nkv*hd]: the layers' context K/V projections stacked for one bmm.

        Cached while no gradient is tracked (inference); rebuilt if any weight changed in place.
        """
        attn = [layer.self_attn for layer in self.layers]
        dflare = self.config.kind == "dflare"
        ks = [a.k_proj_target.weight if dflare else a.k_proj.weight for a in attn]
        vs = [a.v_proj_target.weight if dflare else a.v_proj.weight for a in attn]
        if torch.is_grad_enabled():
            return ops.stack_context_kv_weights(ks, vs)
        try:
            key = tuple(w._version for w in ks + vs) + tuple(id(w) for w in ks)
        except RuntimeError:  # inference tensors (built under inference_mode) have no version counter
            key = tuple(id(w) for w in ks + vs)
        if self._frozen_kv is None or self._frozen_kv[0] != key:
            self._frozen_kv = (key, ops.stack_context_kv_weights(ks, vs))
        return self._frozen_kv[1]

    def context_kv(self, taps: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Context keys/values of all draft layers for N context tokens.

        taps [N, T, H] (or [N, T*H]), positions [N] -> k, v [D, N, nkv, hd] (k normed and rotated).
        """
        cfg = self.config
        feats = self.context_features(taps)  # [N, D|1, H]
        k, v = ops.context_kv(feats, self.context_kv_weight())  # [D, N, nkv*hd]
        if cfg.attention_bias:
            attn = [layer.self_attn for layer in self.layers]
            kb = [a.k_proj_target.bias if cfg.kind == "dflare" else a.k_proj.bias for a in attn]
            vb = [a.v_proj_target.bias if cfg.kind == "dflare" else a.v_proj.bias for a in attn]
            k, v = k + torch.stack(kb)[:, None], v + torch.stack(vb)[:, None]
        norms = torch.stack([layer.self_attn.k_norm.weight for layer in self.layers])  # [D, hd]
        cos, sin = ops.rope_cos_sin(positions.to(self.inv_freq.device), self.inv_freq, k.dtype)
        k = ops.finish_context_keys(k, norms, cfg.rms_norm_eps, cos, sin)
        return k, v.unflatten(-1, (-1, cfg.head_dim))

    # ---- the layer stack -----------------------------------------------------------------------------
    def _run_layers(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        keys_values: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]],
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """x [b, Q, H] block stream; ``keys_values(i, k_blk, v_blk)`` gives layer i's full K/V."""
        cos, sin = ops.rope_cos_sin(positions, self.inv_freq, x.dtype)  # [b, Q, hd]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k_blk, v_blk = attn.block_qkv(layer.input_layernorm(x), cos, sin)
            k, v = keys_values(i, k_blk, v_blk)
            out = self.attention(q, k, v, mask, attn.scale)  # [b, nh, Q, hd]
            x = x + attn.o_proj(out.transpose(1, 2).flatten(-2))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x)

    def forward(
        self,
        block_embeds: torch.Tensor,
        block_positions: torch.Tensor,
        context_taps: torch.Tensor,
        context_positions: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Training / stateless forward over [context ; block].

        block_embeds [b, Q, H] (target embeddings of the blocks), block_positions [b, Q] absolute,
        context_taps [b, S, T, H] (or [b, S, T*H]), context_positions [b, S],
        attention_mask [b, Q, S+Q] or [Q, S+Q] bool (True = may attend; None = everything visible,
        e.g. one block over its whole context). Returns final-normed hidden states [b, Q, H];
        ``logits(...)`` of them gives draft logits.
        """
        b, s = context_positions.shape
        k_ctx, v_ctx = self.context_kv(context_taps.flatten(0, 1), context_positions.flatten())
        k_ctx = k_ctx.unflatten(1, (b, s)).transpose(2, 3)  # [D, b, nkv, S, hd]
        v_ctx = v_ctx.unflatten(1, (b, s)).transpose(2, 3)
        mask = None if attention_mask is None else attention_mask.unsqueeze(-3)  # [b|1, 1, Q, S+Q]

        def keys_values(i: int, k_blk: torch.Tensor, v_blk: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return torch.cat([k_ctx[i], k_blk], dim=2), torch.cat([v_ctx[i], v_blk], dim=2)

        return self._run_layers(block_embeds, block_positions, keys_values, mask)

    # ---- inference with a draft KV cache (context K/V only) ------------------------------------------
    def new_cache(
        self, rows: int, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> RowKVCache:
        from sglang_ext.dflare.cache import RowKVCache

        cfg = self.config
        dtype = dtype or self.norm.weight.dtype
        return RowKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, rows, dtype, device)

    def append_context(
        self, cache: RowKVCache, rows: torch.Tensor, positions: torch.Tensor, taps: torch.Tensor
    ) -> None:
        """Project N new context tokens (packed over rows) into the cache; the caller sets lengths."""
        k, v = self.context_kv(taps, positions)  # [D, N, nkv, hd]
        rows, positions = rows.to(cache.device), positions.to(cache.device)
        for i in range(self.config.num_hidden_layers):
            cache.write_packed(i, k[i], v[i], rows, positions)

    def draft_hidden(self, cache: RowKVCache, block_ids: torch.Tensor, starts: list[int]) -> torch.Tensor:
        """One draft forward of rows ``0..b-1``: block ids [b, B] at positions ``starts[r] + 0..B-1``.

        Row r attends to its cached context (positions < ``starts[r]``) and its whole block. Block K/V are
        written past the row's context length (scratch), i.e. never kept. Returns hidden [b, B, H].
        """
        b, blk = block_ids.shape
        upto = max(starts) + blk
        cache.ensure_capacity(upto)
        uniform = min(starts) == upto - blk
        dev = self.inv_freq.device
        block_ids = block_ids.to(dev)
        st = torch.tensor(starts, dtype=torch.int64, device=dev)
        positions = st[:, None] + torch.arange(blk, device=dev)[None, :]  # [b, B]
        mask = None
        if not uniform:
            keys = torch.arange(upto, device=dev)
            mask = (keys[None, :] < (st + blk)[:, None])[:, None, None, :]  # [b, 1, 1, upto]
        offsets: torch.Tensor | int = starts[0] if uniform else st

        def keys_values(i: int, k_blk: torch.Tensor, v_blk: torch.Tensor) -> tuple[torch.Tensor, ...]:
            cache.write(i, k_blk, v_blk, offsets)
            return cache.view(i, b, upto)

        return self._run_layers(self.embed(block_ids), positions, keys_values, mask)
