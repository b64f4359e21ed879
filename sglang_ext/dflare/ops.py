"""Pure tensor functions of DFlare/DFlash, shared by the CPU reference engine, training and the SGLang plugin.

No module state and no SGLang imports: the plugin calls these on its own tensors. Shapes use
N = context tokens, T = taps, D = draft layers, H = hidden size, nkv/hd = KV heads / head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3 RMSNorm: statistics in float32, result cast back before the weight (bitwise like HF)."""
    dtype = x.dtype
    if dtype == torch.float32 and weight.dtype == torch.float32:
        # the casts are identities, and torch's fused norm computes these same bits in one call (small
        # models on CPU pay per op); a weight broadcast over more than the last dim multiplies after it
        if weight.shape == x.shape[-1:]:
            return F.rms_norm(x, weight.shape, weight, eps)
        return weight * F.rms_norm(x, x.shape[-1:], eps=eps)
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def fusion_probabilities(layer_fusion_weights: torch.Tensor) -> torch.Tensor:
    """Softmax over taps of the [D, T] fusion logits, once, in float32 (a constant at inference)."""
    return torch.softmax(layer_fusion_weights.to(torch.float32), dim=-1)


def fuse_context(
    taps: torch.Tensor, probs: torch.Tensor, norm_weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """DFlare per-layer context features: mix the T taps with each draft layer's softmax row, then the
    ONE shared ``hidden_norm`` (mix first, then normalise, as the reference implementations do).

    taps: [..., T, H] (or [..., T*H] when T > 1); probs: [D, T] float32 -> [..., D, H] in the taps' dtype.
    """
    num_taps = probs.shape[-1]
    if taps.shape[-2:] != (num_taps, norm_weight.shape[0]):
        taps = taps.unflatten(-1, (num_taps, -1))  # [..., T, H]
    mixed = torch.matmul(probs.to(taps.dtype), taps)  # [D, T] @ [..., T, H] -> [..., D, H]
    return rms_norm(mixed, norm_weight, eps)


def dflash_context(
    taps: torch.Tensor, fc_weight: torch.Tensor, norm_weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """DFlash shared context ``hidden_norm(fc(concat taps))``: taps [..., T, H] -> [..., 1, H]."""
    flat = taps.flatten(-2)  # [..., T*H], concatenated in tap order
    return rms_norm(F.linear(flat, fc_weight), norm_weight, eps).unsqueeze(-2)


def stack_context_kv_weights(k_weights: list[torch.Tensor], v_weights: list[torch.Tensor]) -> torch.Tensor:
    """Per-layer context K/V projections as one [D, H, 2*nkv*hd] operand for :func:`context_kv`."""
    return torch.stack([torch.cat([k, v], dim=0).t() for k, v in zip(k_weights, v_weights, strict=True)])


def context_kv(features: torch.Tensor, kv_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Context keys/values of every draft layer in ONE batched matmul.

    features: [N, D, H] (DFlare, one feature per layer) or [N, 1, H] (DFlash, shared);
    kv_weight: [D, H, 2*nkv*hd] from :func:`stack_context_kv_weights`.
    Returns k, v: [D, N, nkv*hd] each (before k_norm and RoPE).
    """
    x = features.transpose(0, 1)  # [D or 1, N, H]
    if x.shape[0] != kv_weight.shape[0]:
        x = x.expand(kv_weight.shape[0], -1, -1)
    kv = torch.bmm(x, kv_weight.to(x.dtype))  # [D, N, 2*nkv*hd]
    return kv.chunk(2, dim=-1)


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """Default RoPE inverse frequencies (float32, as HF computes them)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(torch.float32) / head_dim
    return 1.0 / (theta**exponent)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [..., hd] for integer absolute positions, computed in float32 then cast (HF's way)."""
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq.float()  # [..., hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE; x [..., hd] with cos/sin broadcastable to it."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` [..., hd] with its first half negated: the sign of rotate-half folded into the table."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rope_signed(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rope` with a :func:`signed_sin` table, bitwise equal (negation is exact) in 4 ops
    instead of 7: ``rotate_half(x) * sin == roll(x, hd/2) * signed_sin``. For per-token CPU decoding."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


def finish_context_keys(
    k: torch.Tensor, k_norm_weights: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """Per-layer ``k_norm`` then RoPE on context keys.

    k: [D, N, nkv*hd]; k_norm_weights: [D, hd]; cos/sin: [N, hd] -> [D, N, nkv, hd].
    """
    head_dim = k_norm_weights.shape[-1]
    k = k.unflatten(-1, (-1, head_dim))  # [D, N, nkv, hd]
    k = rms_norm(k, k_norm_weights[:, None, None, :], eps)
    return apply_rope(k, cos[None, :, None, :], sin[None, :, None, :])


def accept_lengths(draft: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Accepted drafts per row: longest prefix with ``draft[:, i] == target[:, i]``.

    draft: [b, B-1] proposed tokens of block slots 1..B-1; target: [b, B-1] the target's own tokens for
    the same positions (its samples at slots 0..B-2). Returns [b] int64 in 0..B-1.
    """
    return (draft == target).to(torch.int64).cumprod(dim=1).sum(dim=1)


def block_training_mask(
    anchors: torch.Tensor, context_len: int, block_size: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean attention mask of the DFlare training forward, [b, N*B, S + N*B].

    Block n (anchored at ``anchors[:, n]``) sees context positions strictly before its anchor and all B
    tokens of its own block; blocks never see each other. Invalid blocks (``valid`` [b, N] False) see only
    their own block, never context, so no attention row is empty (an empty row would give NaN): leave them
    out of the loss.
    """
    b, n = anchors.shape
    q = n * block_size
    block_of_query = torch.arange(q, device=anchors.device) // block_size  # [Q]
    ctx_pos = torch.arange(context_len, device=anchors.device)
    anchor_of_query = anchors[:, block_of_query]  # [b, Q]
    sees_ctx = ctx_pos[None, None, :] < anchor_of_query[:, :, None]  # [b, Q, S]
    sees_blk = (block_of_query[:, None] == block_of_query[None, :]).expand(b, q, q)  # [b, Q, Q]
    if valid is not None:
        sees_ctx = sees_ctx & valid[:, block_of_query, None]
    return torch.cat([sees_ctx, sees_blk], dim=-1)
