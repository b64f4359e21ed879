"""SGLang-side DFlare context path == the pure-PyTorch reference drafter, for the same checkpoint.

The reference (``sglang_ext.dflare.DFlareDrafter``) writes a checkpoint in the published AngelSlim
layout; the SGLang class loads it through its strict ``load_weights`` and computes the fused features
and the context K/V after ``k_norm`` and RoPE with SGLang's own layers. Block logits need RadixAttention
(GPU only) and are compared by ``tests/gpu/``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.plugin.conftest import draft_config

pytestmark = pytest.mark.sglang


def _reference(tmp_path, dtype):
    from sglang_ext.dflare.checkpoint import load_drafter, save_drafter
    from sglang_ext.dflare.config import parse_config
    from sglang_ext.dflare.model import DFlareDrafter

    cfg, _ = parse_config(draft_config())
    torch.manual_seed(0)
    ref = DFlareDrafter(cfg)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name == "layer_fusion_weights":
                p.normal_(0.0, 1.5)  # far from uniform: a wrong tap/layer pairing shows
            else:
                p.normal_(0.0, 0.2)
    save_drafter(ref.to(dtype), tmp_path / "drafter")
    # reloaded the way the reference engine loads it (RoPE tables stay float32 in a bf16 model)
    return load_drafter(tmp_path / "drafter"), tmp_path / "drafter"


def _sglang_model(path, dtype):
    from sglang.srt.utils.hf_transformers_utils import get_config

    from sglang_ext.dflare.checkpoint import read_tensors
    from sglang_ext.sglang_plugin.model import DFlareDraftModel

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # SGLang builds models under the serving dtype
    try:
        model = DFlareDraftModel(get_config(str(path), trust_remote_code=False))
    finally:
        torch.set_default_dtype(default)
    model.load_weights(iter(read_tensors(path).items()))
    return model.eval()


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 2e-5), (torch.bfloat16, 6e-2)])
def test_context_kv_matches_reference(sglang_runtime, tmp_path, dtype, atol):
    ref, path = _reference(tmp_path, dtype)
    model = _sglang_model(path, dtype)
    n, t, h = 11, ref.config.num_taps, ref.config.hidden_size
    taps = torch.randn(n, t, h, generator=torch.Generator().manual_seed(1)).to(dtype) * 3
    positions = torch.tensor([0, 1, 2, 3, 4, 17, 18, 19, 250, 251, 900])

    with torch.no_grad():
        feats = model.project_target_hidden(taps.reshape(n, t * h))
        torch.testing.assert_close(feats, ref.context_features(taps), atol=atol, rtol=0)
        ref_k, ref_v = ref.context_kv(taps, positions)  # [D, N, nkv, hd]
        for i, (k, v) in enumerate(model.context_kv(feats, positions)):
            torch.testing.assert_close(k, ref_k[i], atol=atol, rtol=0, msg=lambda m, i=i: f"layer {i} k: {m}")
            torch.testing.assert_close(v, ref_v[i], atol=atol, rtol=0, msg=lambda m, i=i: f"layer {i} v: {m}")
    # the check can fail: positions shifted by one give different keys (RoPE is really applied)
    assert not torch.allclose(model.context_kv(feats, positions + 1)[0][0], ref_k[0], atol=atol)


def test_k_proj_and_k_proj_target_land_in_their_own_parameters(sglang_runtime, tmp_path):
    ref, path = _reference(tmp_path, torch.float32)
    model = _sglang_model(path, torch.float32)
    attn, ref_attn = model.layers[1].self_attn, ref.layers[1].self_attn
    q, kv = attn.q_size, attn.kv_size
    torch.testing.assert_close(attn.qkv_proj.weight[q : q + kv], ref_attn.k_proj.weight, atol=0, rtol=0)
    torch.testing.assert_close(model.context_kv_weight[1, :kv], ref_attn.k_proj_target.weight, atol=0, rtol=0)
    torch.testing.assert_close(model.context_kv_weight[1, kv:], ref_attn.v_proj_target.weight, atol=0, rtol=0)
    torch.testing.assert_close(model.fusion_probs, torch.softmax(ref.layer_fusion_weights.float(), -1))


def _load(model, tensors):
    model.load_weights(iter(tensors.items()))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda ts: ts.pop("layers.0.self_attn.v_proj_target.weight"), "missing"),
        (lambda ts: ts.pop("layer_fusion_weights"), "layer_fusion_weights"),
        (lambda ts: ts.pop("layers.1.self_attn.k_proj.weight"), "qkv_proj"),
        (lambda ts: ts.__setitem__("fc.weight", torch.zeros(64, 256)), "unexpected tensors ['fc.weight']"),
        (lambda ts: ts.__setitem__("context_norm.weight", torch.ones(64)), "dflare convert"),
        (
            lambda ts: ts.__setitem__("layers.0.self_attn.k_proj_target.weight", torch.zeros(16, 64)),
            "k_proj_target: shape (16, 64)",
        ),
    ],
    ids=["missing-v-target", "missing-fusion", "missing-k-proj", "dflash-fc", "angelspec-name", "bad-shape"],
)
def test_strict_loading(sglang_runtime, tmp_path, change, message):
    from sglang_ext.dflare.checkpoint import read_tensors
    from sglang_ext.sglang_plugin.model import DFlareWeightError

    _, path = _reference(tmp_path, torch.float32)
    model = _sglang_model(path, torch.float32)
    tensors = read_tensors(path)
    change(tensors)
    with pytest.raises(DFlareWeightError, match=None) as err:
        _load(model, tensors)
    assert message in str(err.value)


def test_model_prefix_is_accepted(sglang_runtime, tmp_path):
    """Some exporters prefix every tensor with ``model.``; names are otherwise matched exactly."""
    from sglang_ext.dflare.checkpoint import read_tensors

    ref, path = _reference(tmp_path, torch.float32)
    model = _sglang_model(path, torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            nn.init.zeros_(p)
    _load(model, {f"model.{k}": v for k, v in read_tensors(path).items()})
    torch.testing.assert_close(model.norm.weight, ref.norm.weight)
