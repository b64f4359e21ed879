"""The target runner beyond Qwen3: Llama (no q/k norms) and Qwen2 (q/k/v biases), greedy == generate."""

from __future__ import annotations

import pytest
import torch

from sglang_ext.reference.engine import SpeculativeEngine
from sglang_ext.reference.sampling import SamplingParams
from sglang_ext.reference.target import TargetRunner, UnsupportedTargetError
from sglang_ext.reference.tiny import tiny_drafter


def build(family: str) -> torch.nn.Module:
    import transformers

    common = dict(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    torch.manual_seed(5)
    model = model_cls(cfg_cls(**common)).to(torch.float64).eval()
    if family == "qwen2":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_()  # non-zero biases: the fused path must add them
                layer.self_attn.k_proj.bias.normal_()
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("fuse", [True, False])
def test_other_families_are_lossless(family: str, fuse: bool) -> None:
    model = build(family)
    drafter = tiny_drafter(model, block_size=4)
    runner = TargetRunner(model, drafter.config.target_layer_ids, fuse=fuse)
    engine = SpeculativeEngine(runner, drafter, 4, max_batch=2)
    prompts = [[1, 2, 3, 4, 5], [7, 0, 9]]
    results = engine.generate(prompts, SamplingParams(max_tokens=12))
    for prompt, res in zip(prompts, results, strict=True):
        ids = torch.tensor([prompt])
        want = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
        assert res.output_ids == want


def test_unsupported_models_are_refused() -> None:
    with pytest.raises(UnsupportedTargetError, match="ForCausalLM"):
        TargetRunner(torch.nn.Linear(2, 2))
    model = build("llama")
    with pytest.raises(UnsupportedTargetError, match="tap layers"):
        TargetRunner(model, [7])
