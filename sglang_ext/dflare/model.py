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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from sglang_ext.dflare import ops
from sglang_ext.dflare.config import DFlareConfig
from sglang_ext.dflare.draft_vocab import DraftVocab
from sglang_ext.dflare.linear import COPY_BELOW_PARAMS, DecoderLayerWeights

if TYPE_CHECKING:
    from sglang_ext.dflare.cache import RowKVCache

# attention(q [b, nh, Q, hd], k [b, nkv, S, hd], v, mask [b, 1, Q|1, S] bool | None, scale) -> [b, nh, Q, hd]
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, float], torch.Tensor]


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Non-causal grouped-query attention; ``mask`` True = may attend."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


# The modules below hold parameters under their checkpoint names; the math that uses them is
# DFlareDrafter._run_layers (block stream) and DFlareDrafter.context_kv (context), in ops' functions.


class RMSNorm(nn.Module):
    """The weight of an RMSNorm (``ops.rms_norm``; eps is ``config.rms_norm_eps``)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))


class DraftMLP(nn.Module):
    """SiLU-gated MLP: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)


class DraftAttention(nn.Module):
    """Q from the block only; K/V = [context ; block]; no causal mask."""

    def __init__(self, cfg: DFlareConfig) -> None:
        super().__init__()
        h, hd, bias = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
        nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.q_proj = nn.Linear(h, nh * hd, bias=bias)
        self.k_proj = nn.Linear(h, nkv * hd, bias=bias)
        self.v_proj = nn.Linear(h, nkv * hd, bias=bias)
        self.o_proj = nn.Linear(nh * hd, h, bias=bias)
        self.q_norm = RMSNorm(hd)  # per head
        self.k_norm = RMSNorm(hd)  # per head, shared by context and block keys
        if cfg.kind == "dflare":
            self.k_proj_target = nn.Linear(h, nkv * hd, bias=bias)
            self.v_proj_target = nn.Linear(h, nkv * hd, bias=bias)


class DraftLayer(nn.Module):
    def __init__(self, cfg: DFlareConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size)
        self.self_attn = DraftAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size)
        self.mlp = DraftMLP(cfg.hidden_size, cfg.intermediate_size)


@dataclass
class _ContextWeights:
    """What the context path needs besides the taps (see ``DFlareDrafter._context_weights``)."""

    probs: torch.Tensor | None  # DFlare: [D, T] fusion softmax rows; DFlash: None (``fc`` is used)
    kv: torch.Tensor  # [D, H, 2*nkv*hd]: every layer's context K/V projection, for one bmm
    kv_biases: tuple[torch.Tensor, ...] | None  # K and V biases [D, 1, nkv*hd]
    k_norms: torch.Tensor  # [D, hd]


class DFlareDrafter(nn.Module):
    """DFlare (``cfg.kind == "dflare"``) or DFlash (``"dflash"``) drafter; see the module docstring."""

    def __init__(self, cfg: DFlareConfig, attention: AttentionFn = sdpa_attention) -> None:
        super().__init__()
        self.config = cfg
        self.attention = attention
        h, t, d = cfg.hidden_size, cfg.num_taps, cfg.num_hidden_layers
        self.layers = nn.ModuleList(DraftLayer(cfg) for _ in range(d))
        self.hidden_norm = RMSNorm(h)
        self.norm = RMSNorm(h)
        if cfg.kind == "dflare":
            self.layer_fusion_weights = nn.Parameter(torch.zeros(d, t))
        else:
            self.fc = nn.Linear(t * h, h, bias=False)
        self.register_buffer("inv_freq", ops.rope_inv_freq(cfg.head_dim, cfg.rope_theta), persistent=False)
        self._embed: nn.Module | None = None
        self._lm_head: nn.Module | None = None
        # the target tokens it may propose (draft_vocab.py); None: the whole vocabulary
        self.draft_vocab: DraftVocab | None = None
        self._param_slots: list[tuple[dict[str, Any], str]] | None = None
        self._frozen: dict[str, tuple[tuple[int, ...], Any]] = {}
        self._rope_tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        """Move the RoPE table with the module but never change its dtype.

        ``drafter.to(torch.bfloat16)`` would otherwise round ``inv_freq`` to bf16, and keys at long
        absolute positions would drift from the target's float32 rotary table.
        """
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(device=self.inv_freq.device)
        self._frozen, self._rope_tables = {}, {}
        return self

    # ---- inference constants -------------------------------------------------------------------------
    def _cached(self, name: str, build: Callable[[], Any]) -> Any:
        """``build()``, kept under ``name`` while no gradient is tracked and no parameter changed.

        Training (gradients on) builds on every call, so gradients reach the parameters. A change is seen
        by storage address (``.to()``, ``load_state_dict(assign=True)``) and version counter (in-place
        updates; inference tensors, built under ``inference_mode``, have none).
        """
        if torch.is_grad_enabled():
            return build()
        if self._param_slots is None:  # the modules' own parameter dicts: cheap to re-read every call
            self._param_slots = [(m._parameters, n) for m in self.modules() for n in m._parameters]
        params = [slots[n] for slots, n in self._param_slots if slots[n] is not None]  # bias=False is None
        try:
            key = tuple([(p.data_ptr(), p._version) for p in params])
        except RuntimeError:
            key = tuple([p.data_ptr() for p in params])
        hit = self._frozen.get(name)
        if hit is None or hit[0] != key:
            hit = self._frozen[name] = (key, build())
        return hit[1]

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(cos, sin, signed sin) [..., hd] of integer positions, from tables grown on demand.

        Entry p equals ``ops.rope_cos_sin(p)`` (float32 math, then cast): a lookup replaces five ops. One
        table per dtype: under autocast the context keys (bf16) and the block stream (fp32) alternate, and
        a single table rebuilt on every dtype change doubled in size each time (out of GPU memory).
        """
        upto = int(positions.max()) + 1 if positions.numel() else 0
        tables = self._rope_tables.get(dtype)
        if tables is None or tables[0].shape[0] < upto:
            n = max(upto, 2 * tables[0].shape[0] if tables is not None else 0, 256)
            cos, sin = ops.rope_cos_sin(torch.arange(n, device=self.inv_freq.device), self.inv_freq, dtype)
            tables = self._rope_tables[dtype] = (cos, sin, ops.signed_sin(sin))
        positions = positions.to(tables[0].device)
        return tuple(t[positions] for t in tables)

    def _layer_weights(self) -> list[DecoderLayerWeights]:
        """The draft layers as :class:`StackedLinear` products (q|k|v, o, gate|up, down) and joint q/k norm
        weights; at inference small drafters keep stacked copies (see ``sglang_ext.dflare.linear``)."""

        def build() -> list[DecoderLayerWeights]:
            small = sum(p.numel() for p in self.parameters()) < COPY_BELOW_PARAMS
            copy = small and not torch.is_grad_enabled()
            heads, kv_heads = self.config.num_attention_heads, self.config.num_key_value_heads
            return [DecoderLayerWeights.of(lay, heads, kv_heads, copy, trainable=True) for lay in self.layers]

        return self._cached("layers", build)

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
    def _context_weights(self) -> _ContextWeights:
        def build() -> _ContextWeights:
            attn = [layer.self_attn for layer in self.layers]
            dflare = self.config.kind == "dflare"
            ks = [a.k_proj_target if dflare else a.k_proj for a in attn]
            vs = [a.v_proj_target if dflare else a.v_proj for a in attn]
            biases = None
            if self.config.attention_bias:
                biases = tuple(torch.stack([p.bias for p in projs])[:, None] for projs in (ks, vs))
            return _ContextWeights(
                probs=ops.fusion_probabilities(self.layer_fusion_weights) if dflare else None,
                kv=ops.stack_context_kv_weights([k.weight for k in ks], [v.weight for v in vs]),
                kv_biases=biases,
                k_norms=torch.stack([a.k_norm.weight for a in attn]),
            )

        return self._cached("context", build)

    def context_features(self, taps: torch.Tensor) -> torch.Tensor:
        """taps [..., T, H] -> normalised context features [..., D, H] (DFlare) or [..., 1, H] (DFlash)."""
        return self._features(taps, self._context_weights())

    def _features(self, taps: torch.Tensor, w: _ContextWeights) -> torch.Tensor:
        eps = self.config.rms_norm_eps
        if w.probs is not None:
            return ops.fuse_context(taps, w.probs, self.hidden_norm.weight, eps)
        return ops.dflash_context(taps, self.fc.weight, self.hidden_norm.weight, eps)

    def context_kv_weight(self) -> torch.Tensor:
        """[D, H, 2*nkv*hd]: the layers' context K/V projections stacked for one bmm (cached at inference)."""
        return self._context_weights().kv

    def context_kv(self, taps: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Context keys/values of all draft layers for N context tokens.

        taps [N, T, H] (or [N, T*H]), positions [N] -> k, v [D, N, nkv, hd] (k normed and rotated).
        """
        cfg = self.config
        w = self._context_weights()
        k, v = ops.context_kv(self._features(taps, w), w.kv)  # [D, N, nkv*hd]
        if w.kv_biases is not None:
            k, v = k + w.kv_biases[0], v + w.kv_biases[1]
        cos, sin, _ = self._rope(positions, k.dtype)
        k = ops.finish_context_keys(k, w.k_norms, cfg.rms_norm_eps, cos, sin)
        return k, v.unflatten(-1, (-1, cfg.head_dim))

    # ---- the layer stack -----------------------------------------------------------------------------
    def _run_layers(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        keys_values: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]],
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """x [b, Q, H] block stream; ``keys_values(i, k_blk, v_blk)`` gives layer i's full K/V.

        Per layer: q/k/v from one product, one norm and one RoPE call over the q and k heads together
        (per-head norms and rotations: bitwise what separate calls give), attention, o, the SiLU MLP."""
        cfg = self.config
        eps, nh, hd = cfg.rms_norm_eps, cfg.num_attention_heads, cfg.head_dim
        nqk, scale = nh + cfg.num_key_value_heads, hd**-0.5
        cos, _, sin = self._rope(positions, x.dtype)  # cos, signed sin [b, Q, hd]
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
        for i, w in enumerate(self._layer_weights()):
            heads = w.qkv(ops.rms_norm(x, w.input_norm, eps)).unflatten(-1, (-1, hd))  # [b, Q, nh+2nkv, hd]
            qk = ops.apply_rope_signed(ops.rms_norm(heads[:, :, :nqk], w.qk_norm, eps), cos, sin)
            q, k_blk = qk[:, :, :nh].transpose(1, 2), qk[:, :, nh:].transpose(1, 2)  # [b, heads, Q, hd]
            k, v = keys_values(i, k_blk, heads[:, :, nqk:].transpose(1, 2))
            out = self.attention(q, k, v, mask, scale)  # [b, nh, Q, hd]
            x = x + w.o(out.transpose(1, 2).flatten(-2))
            gate, up = w.gate_up(ops.rms_norm(x, w.post_norm, eps)).chunk(2, dim=-1)
            x = x + w.down(F.silu(gate) * up)
        return ops.rms_norm(x, self.norm.weight, eps)

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
        dev = self.inv_freq.device
        block_ids = block_ids.to(dev)
        mask = None
        offsets: torch.Tensor | int
        if min(starts) == max(starts):  # every row at the same positions: [B] positions, slice writes
            offsets = starts[0]
            positions = torch.arange(offsets, upto, device=dev)
        else:
            offsets = torch.tensor(starts, dtype=torch.int64, device=dev)
            positions = offsets[:, None] + torch.arange(blk, device=dev)[None, :]  # [b, B]
            keys = torch.arange(upto, device=dev)
            mask = (keys[None, :] < (offsets + blk)[:, None])[:, None, None, :]  # [b, 1, 1, upto]

        def keys_values(i: int, k_blk: torch.Tensor, v_blk: torch.Tensor) -> tuple[torch.Tensor, ...]:
            cache.write(i, k_blk, v_blk, offsets)
            return cache.view(i, b, upto)

        return self._run_layers(self.embed(block_ids), positions, keys_values, mask)
