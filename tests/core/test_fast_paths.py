"""The CPU decoding shortcuts of the target runner and the drafter change op counts, not results.

Each shortcut (sign-folded RoPE, position tables, stacked projections, cached inference weights) is
checked against the plain computation it replaces, including the cases a short test would not reach:
positions past the first table size, rows at different positions, weights changed after first use.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from sglang_ext.dflare import ops
from sglang_ext.dflare.linear import StackedLinear
from sglang_ext.dflare.model import DFlareDrafter
from sglang_ext.reference.sampling import greedy_tokens
from sglang_ext.reference.target import TargetRunner
from sglang_ext.reference.tiny import tiny_drafter, tiny_target

F64 = torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_signed_sin_rope_is_bitwise_rotate_half(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, 16, generator=g).to(dtype)
    cos, sin = ops.rope_cos_sin(torch.arange(300, 305), ops.rope_inv_freq(16, 1e6), dtype)
    cos, sin = cos[:, None], sin[:, None]
    assert torch.equal(ops.apply_rope_signed(x, cos, ops.signed_sin(sin)), ops.apply_rope(x, cos, sin))


@pytest.mark.parametrize("copy", [True, False])
def test_stacked_linear_equals_its_modules(copy: bool) -> None:
    torch.manual_seed(0)
    linears = [nn.Linear(8, n, bias=True, dtype=F64) for n in (4, 2, 2)]
    x = torch.randn(3, 5, 8, dtype=F64)
    want = torch.cat([lin(x) for lin in linears], dim=-1)
    torch.testing.assert_close(StackedLinear(linears, copy)(x), want, rtol=1e-12, atol=1e-12)


def test_target_runner_matches_the_hf_forward_past_the_first_rope_table() -> None:
    """Prefill, one-token steps across position 256 (the table grows), then rows at different positions."""
    model = tiny_target(
        vocab_size=40, hidden_size=32, num_layers=3, dtype=F64, seed=4, max_position_embeddings=1024
    )
    runner = TargetRunner(model)
    g = torch.Generator().manual_seed(5)
    seq = torch.randint(0, 40, (2, 300), generator=g)
    with torch.no_grad():
        want = model(seq).logits  # [2, 300, V]
        cache = runner.new_cache(2)
        hidden, _ = runner.forward(cache, seq[:, :250], [0, 0])
        got = [runner.logits(hidden)]
        for pos in range(250, 260):  # both rows at one position: slice writes, [q] tables
            hidden, _ = runner.forward(cache, seq[:, pos : pos + 1], [pos, pos])
            got.append(runner.logits(hidden))
        torch.testing.assert_close(torch.cat(got, dim=1), want[:, :260], rtol=1e-9, atol=1e-9)
        # rows at different positions: row 0 continues at 260, row 1 re-runs 255.. (its cache is cropped)
        hidden, _ = runner.forward(cache, torch.stack([seq[0, 260:264], seq[1, 255:259]]), [260, 255])
        logits = runner.logits(hidden)
    torch.testing.assert_close(logits[0], want[0, 260:264], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logits[1], want[1, 255:259], rtol=1e-9, atol=1e-9)


def test_drafter_rope_table_equals_computing_each_position() -> None:
    drafter = tiny_drafter(tiny_target(seed=0), kind="dflare", seed=0)
    positions = torch.tensor([[3, 700, 255], [256, 0, 1023]])  # past the first table size of 256
    cos, sin, signed = drafter._rope(positions, torch.float32)
    want_cos, want_sin = ops.rope_cos_sin(positions, drafter.inv_freq, torch.float32)
    assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
    assert torch.equal(signed, ops.signed_sin(want_sin))


def test_drafter_rope_tables_stay_small_when_dtypes_alternate() -> None:
    """Under autocast the context keys (bf16) and the block stream (fp32) ask for RoPE in turn. One shared
    table rebuilt on each dtype change doubled every call and ran an H200 out of memory within one
    training probe; a table per dtype keeps both at the size the positions need."""
    drafter = tiny_drafter(tiny_target(seed=0), kind="dflare", seed=0)
    positions = torch.arange(40)
    for _ in range(30):
        for dtype in (torch.bfloat16, torch.float32):
            cos, _, _ = drafter._rope(positions, dtype)
            assert cos.dtype == dtype
    assert {d: t[0].shape[0] for d, t in drafter._rope_tables.items()} == {
        torch.bfloat16: 256,
        torch.float32: 256,
    }


def _draft(drafter, cache, taps: torch.Tensor) -> torch.Tensor:
    n = taps.shape[0]
    drafter.append_context(cache, torch.zeros(n, dtype=torch.int64), torch.arange(n), taps)
    cache.lengths[0] = n
    return drafter.draft_hidden(cache, torch.tensor([[3, 39, 39, 39]]), [n])


@pytest.mark.parametrize("kind", ["dflare", "dflash"])
def test_cached_inference_weights_follow_weight_changes(kind: str) -> None:
    """Stacked copies are rebuilt after an in-place update (an optimizer step) and after ``.to()``."""
    target = tiny_target(vocab_size=40, hidden_size=32, num_layers=6, dtype=F64, seed=3)
    drafter = tiny_drafter(target, kind=kind, num_layers=2, num_taps=3, seed=4)
    drafter.bind_target(target.model.embed_tokens, target.lm_head)
    taps = torch.randn(6, 3, 32, dtype=F64, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        first = _draft(drafter, drafter.new_cache(1), taps)
    with torch.no_grad():
        drafter.layers[1].mlp.up_proj.weight.mul_(1.5)
        drafter.layers[0].self_attn.k_norm.weight.add_(0.25)
        changed = _draft(drafter, drafter.new_cache(1), taps)
        with torch.enable_grad():  # the uncached training path: the reference for the new weights
            reference = _draft(drafter, drafter.new_cache(1), taps)
    assert not torch.allclose(first, changed)
    torch.testing.assert_close(changed, reference, rtol=1e-12, atol=1e-12)
    target.to(torch.float32)
    drafter.to(torch.float32)
    with torch.inference_mode():
        as_f32 = _draft(drafter, drafter.new_cache(1, torch.float32), taps.float())
    assert as_f32.dtype == torch.float32
    torch.testing.assert_close(as_f32.double(), reference.detach(), rtol=1e-4, atol=1e-4)


def test_training_gradients_reach_every_stacked_weight() -> None:
    target = tiny_target(vocab_size=40, hidden_size=32, num_layers=6, dtype=F64, seed=3)
    drafter = tiny_drafter(target, kind="dflare", num_layers=2, num_taps=3, seed=4).train()
    drafter.bind_target(target.model.embed_tokens, target.lm_head)
    with torch.inference_mode():  # cached inference weights first: training must not reuse them
        _draft(drafter, drafter.new_cache(1), torch.randn(5, 3, 32, dtype=F64))
    ids = torch.tensor([[3, 39, 39, 39]])
    taps = torch.randn(1, 5, 3, 32, dtype=F64)
    hidden = drafter(drafter.embed(ids), torch.arange(5, 9)[None], taps, torch.arange(5)[None])
    drafter.logits(hidden).logsumexp(-1).sum().backward()
    for name, p in drafter.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", ["dflare", "dflash"])
def test_biased_drafter_inference_equals_its_training_path(kind: str) -> None:
    """q/k/v/o biases (attention_bias=True) in the stacked copies and in the stacked context K/V."""
    target = tiny_target(vocab_size=40, hidden_size=32, num_layers=6, dtype=F64, seed=3)
    cfg = dataclasses.replace(tiny_drafter(target, kind=kind).config, attention_bias=True)
    torch.manual_seed(8)
    drafter = DFlareDrafter(cfg).to(F64)
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    drafter.bind_target(target.model.embed_tokens, target.lm_head)
    taps = torch.randn(6, cfg.num_taps, 32, dtype=F64, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        cached = _draft(drafter, drafter.new_cache(1), taps)
    reference = _draft(drafter, drafter.new_cache(1), taps)  # gradients on: the modules themselves
    torch.testing.assert_close(cached, reference.detach(), rtol=1e-12, atol=1e-12)


def test_float32_rms_norm_is_bitwise_the_explicit_formula() -> None:
    g = torch.Generator().manual_seed(10)
    x = torch.randn(3, 5, 6, 16, generator=g) * 30
    for weight in (torch.randn(16, generator=g), torch.randn(6, 16, generator=g)):  # last dim, or broadcast
        want = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        assert torch.equal(ops.rms_norm(x, weight, 1e-6), want)


def test_greedy_tokens_equal_argmax_with_ties_and_nan() -> None:
    logits = torch.randint(0, 4, (3, 5, 64)).float()  # many ties: the first maximum must win
    logits[1, 2, 9] = float("nan")
    assert torch.equal(greedy_tokens(logits), logits.argmax(-1))
