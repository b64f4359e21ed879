"""DFlareDrafter math against a naive re-derivation from the published description, and its three paths
(stateless/training forward, training block mask, cached inference) against each other."""

from __future__ import annotations

import pytest
import torch

from sglang_ext.dflare import ops
from sglang_ext.dflare.model import DFlareDrafter
from sglang_ext.reference.tiny import tiny_drafter, tiny_target

F64 = torch.float64


def make(kind: str) -> DFlareDrafter:
    target = tiny_target(vocab_size=40, hidden_size=32, num_layers=6, dtype=F64, seed=3)
    drafter = tiny_drafter(target, kind=kind, num_layers=3, num_taps=4, seed=4)
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if "norm" in name or "fusion" in name:
                p.uniform_(0.5, 1.5)  # non-trivial norm weights and fusion logits
    drafter.bind_target(target.model.embed_tokens, target.lm_head)
    return drafter


def naive_forward(
    m: DFlareDrafter, x: torch.Tensor, pos: torch.Tensor, taps: torch.Tensor, ctx_pos: torch.Tensor
) -> torch.Tensor:
    """One sequence, loops and explicit softmax, written from docs/core.md ("The drafter in formulas").

    x [Q, H]."""
    cfg = m.config
    eps, hd, nh, nkv = cfg.rms_norm_eps, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads

    def norm(v, w):
        return w * (v / torch.sqrt((v * v).mean(-1, keepdim=True) + eps))

    def rope(v, p):  # v [n, heads, hd]
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=F64) / hd))
        ang = p[:, None].to(F64) * inv[None]  # [n, hd/2]
        cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
        rot = torch.cat([-v[..., hd // 2 :], v[..., : hd // 2]], -1)
        return v * cos + rot * sin

    if cfg.kind == "dflare":
        probs = torch.softmax(m.layer_fusion_weights.to(F64), dim=-1)
    for i, layer in enumerate(m.layers):
        a = layer.self_attn
        if cfg.kind == "dflare":
            mixed = sum(probs[i, t] * taps[:, t] for t in range(cfg.num_taps))
            f = norm(mixed, m.hidden_norm.weight)
            kc, vc = f @ a.k_proj_target.weight.T, f @ a.v_proj_target.weight.T
        else:
            f = norm(taps.flatten(-2) @ m.fc.weight.T, m.hidden_norm.weight)
            kc, vc = f @ a.k_proj.weight.T, f @ a.v_proj.weight.T
        h = norm(x, layer.input_layernorm.weight)
        q = rope(norm((h @ a.q_proj.weight.T).view(-1, nh, hd), a.q_norm.weight), pos)
        k = torch.cat([kc, h @ a.k_proj.weight.T]).view(-1, nkv, hd)
        k = rope(norm(k, a.k_norm.weight), torch.cat([ctx_pos, pos]))
        v = torch.cat([vc, h @ a.v_proj.weight.T]).view(-1, nkv, hd)
        out = []
        for head in range(nh):
            kv_head = head // (nh // nkv)
            w = torch.softmax(q[:, head] @ k[:, kv_head].T / hd**0.5, dim=-1)  # no causal mask
            out.append(w @ v[:, kv_head])
        x = x + torch.cat(out, -1) @ a.o_proj.weight.T
        hm = norm(x, layer.post_attention_layernorm.weight)
        gate, up = hm @ layer.mlp.gate_proj.weight.T, hm @ layer.mlp.up_proj.weight.T
        x = x + (torch.nn.functional.silu(gate) * up) @ layer.mlp.down_proj.weight.T
    return norm(x, m.norm.weight)


@pytest.mark.parametrize("kind", ["dflare", "dflash"])
def test_forward_matches_naive_formulas(kind: str) -> None:
    m = make(kind)
    g = torch.Generator().manual_seed(0)
    s, blk = 9, 4
    taps = torch.randn(s, m.config.num_taps, 32, generator=g, dtype=F64)
    ids = torch.tensor([[5, 39, 39, 39]])
    with torch.no_grad():
        got = m(m.embed(ids), torch.arange(s, s + blk)[None], taps[None], torch.arange(s)[None])[0]
        want = naive_forward(m, m.embed(ids)[0], torch.arange(s, s + blk), taps, torch.arange(s))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # RoPE tables are float32, as in HF


def test_fusion_ops_shapes_and_single_bmm() -> None:
    m = make("dflare")
    taps = torch.randn(7, 4, 32, dtype=F64)
    probs = ops.fusion_probabilities(m.layer_fusion_weights)
    assert probs.dtype == torch.float32 and torch.allclose(probs.sum(-1), torch.ones(3))
    feats = ops.fuse_context(taps, probs, m.hidden_norm.weight, 1e-6)
    assert feats.shape == (7, 3, 32)
    torch.testing.assert_close(ops.fuse_context(taps.flatten(-2), probs, m.hidden_norm.weight, 1e-6), feats)
    k, v = ops.context_kv(feats, m.context_kv_weight())
    assert k.shape == v.shape == (3, 7, 16)
    layer1 = m.layers[1].self_attn
    torch.testing.assert_close(k[1], layer1.k_proj_target(feats[:, 1]))
    torch.testing.assert_close(v[1], layer1.v_proj_target(feats[:, 1]))


@pytest.mark.parametrize("kind", ["dflare", "dflash"])
def test_cached_inference_equals_stateless_forward(kind: str) -> None:
    """Rows of different lengths, context appended in two chunks: cache path == full forward per row."""
    m = make(kind)
    g = torch.Generator().manual_seed(1)
    lengths, blk = [5, 11, 2], 4
    taps = [torch.randn(n, 4, 32, generator=g, dtype=F64) for n in lengths]
    block = torch.tensor([[3, 39, 39, 39], [7, 39, 39, 39], [1, 39, 39, 39]])
    cache = m.new_cache(4)
    with torch.inference_mode():
        for lo, hi in ((0, 0.5), (0.5, 1.0)):  # two appends, packed over rows
            rows, pos, chunk = [], [], []
            for r, n in enumerate(lengths):
                a, b = int(n * lo), int(n * hi)
                rows += [r] * (b - a)
                pos += list(range(a, b))
                chunk.append(taps[r][a:b])
            m.append_context(cache, torch.tensor(rows), torch.tensor(pos), torch.cat(chunk))
        cache.lengths[:3] = lengths
        got = m.draft_hidden(cache, block, lengths)
        for r, n in enumerate(lengths):
            want = m(
                m.embed(block[r : r + 1]),
                torch.arange(n, n + blk)[None],
                taps[r][None],
                torch.arange(n)[None],
            )
            torch.testing.assert_close(got[r], want[0], rtol=1e-10, atol=1e-10)


def test_training_mask_equals_separate_blocks_and_trains() -> None:
    """One masked forward over N blocks == each block alone over the context strictly before its anchor."""
    m = make("dflare").train()
    g = torch.Generator().manual_seed(2)
    s, blk = 12, 4
    taps = torch.randn(1, s, 4, 32, generator=g, dtype=F64)
    anchors = torch.tensor([[3, 7, 1]])
    seq = torch.randint(0, 39, (s + blk,), generator=g)
    ids = torch.full((1, 3 * blk), 39)
    ids[0, ::blk] = seq[anchors[0]]
    positions = (anchors[0][:, None] + torch.arange(blk)).flatten()[None]
    mask = ops.block_training_mask(anchors, s, blk)
    assert mask.shape == (1, 3 * blk, s + 3 * blk)
    hidden = m(m.embed(ids), positions, taps, torch.arange(s)[None], mask)
    for n, a in enumerate(anchors[0].tolist()):
        alone = m(
            m.embed(ids[:, n * blk : (n + 1) * blk]),
            positions[:, n * blk : (n + 1) * blk],
            taps[:, :a],
            torch.arange(a)[None],
        )
        torch.testing.assert_close(hidden[:, n * blk : (n + 1) * blk], alone, rtol=1e-10, atol=1e-10)
    # gradients reach the drafter; the borrowed target modules are not drafter parameters
    m.logits(hidden).logsumexp(-1).sum().backward()
    assert m.layer_fusion_weights.grad is not None and m.layer_fusion_weights.grad.abs().sum() > 0
    assert m.layers[0].self_attn.k_proj_target.weight.grad.abs().sum() > 0
    names = {n for n, _ in m.named_parameters()}
    assert not any("embed" in n or "lm_head" in n for n in names)
    assert set(m.state_dict()) == names


def test_invalid_blocks_see_only_themselves() -> None:
    mask = ops.block_training_mask(torch.tensor([[4, 0]]), 6, 2, valid=torch.tensor([[True, False]]))
    assert mask[0, :2, :4].all() and not mask[0, :2, 4:6].any()  # block 0: context < 4
    assert not mask[0, 2:, :6].any() and mask[0, 2:, 8:].all()  # invalid block: only itself
    assert not mask[0, :2, 8:].any() and not mask[0, 2:, 6:8].any()  # blocks never see each other


def test_dtype_cast_keeps_the_rope_table_in_float32():
    """`.to(bf16)` must not round inv_freq: keys at long positions would drift from the target's."""
    drafter = tiny_drafter(tiny_target(seed=0), kind="dflare", seed=0)
    before = drafter.inv_freq.clone()
    drafter.to(torch.bfloat16)
    assert drafter.inv_freq.dtype == torch.float32
    assert torch.equal(drafter.inv_freq, before)
    assert drafter.norm.weight.dtype == torch.bfloat16
