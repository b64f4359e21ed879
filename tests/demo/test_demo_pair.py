"""The shipped demo pair: where the loader finds it, its shape, its size, and lossless decoding on it."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sglang_ext import demo
from sglang_ext.dflare.checkpoint import load_drafter
from sglang_ext.reference.engine import SpeculativeEngine
from sglang_ext.reference.sampling import SamplingParams
from sglang_ext.training.corpus import load_chats
from sglang_ext.training.data import render_prompt


def test_loader_paths_and_cli() -> None:
    assert demo.DEMO_MODEL_NAME == "dflare-demo"
    assert demo.target_path() == demo.demo_dir() / "target"
    assert demo.drafter_path() == demo.drafter_path("dflare") == demo.demo_dir() / "dflare"
    with pytest.raises(ValueError, match="unknown drafter kind"):
        demo.drafter_path("eagle")
    out = subprocess.run(
        [sys.executable, "-m", "sglang_ext.cli", "demo-path", "dflash"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == str(demo.drafter_path("dflash"))


def test_pair_shape_follows_the_paper_ratios_and_fits_24_mb() -> None:
    target = json.loads((demo.target_path() / "config.json").read_text())
    depth = target["num_hidden_layers"]
    assert target["architectures"] == ["Qwen3ForCausalLM"]  # SGLang picks the model class from it
    assert target["model_type"] == "qwen3" and target["head_dim"] == 64 and 12 <= depth <= 16
    dflare, dflash = (load_drafter(demo.drafter_path(k)).config for k in ("dflare", "dflash"))
    assert (dflare.kind, dflash.kind) == ("dflare", "dflash")
    assert dflare.num_hidden_layers == max(2, math.ceil(depth / 5))
    assert dflash.num_hidden_layers == max(2, math.ceil(depth / 7))
    assert dflare.num_taps > dflash.num_taps
    for cfg in (dflare, dflash):
        assert max(cfg.target_layer_ids) <= depth - 2  # SGLang cannot capture the last layer's output
        assert cfg.target_num_hidden_layers == depth and cfg.block_size == 16
    files = [demo.target_path() / "model.safetensors"] + [
        demo.drafter_path(k) / "model.safetensors" for k in ("dflare", "dflash")
    ]
    assert sum(f.stat().st_size for f in files) <= 24_000_000


@pytest.fixture(scope="module")
def pair():
    torch.set_num_threads(2)
    target = AutoModelForCausalLM.from_pretrained(str(demo.target_path()), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(demo.target_path()))
    prompts = [render_prompt(tok, r["messages"][:-1]) for r in load_chats(demo.heldout_prompts_path())[:2]]
    return target, tok, prompts


@pytest.mark.parametrize("kind", ["dflare", "dflash"])
def test_greedy_speculative_output_equals_transformers_greedy(pair, kind: str) -> None:
    target, tok, prompts = pair
    drafter = load_drafter(demo.drafter_path(kind), dtype=torch.float32)
    engine = SpeculativeEngine(target, drafter, tokenizer=tok, max_batch=len(prompts))
    results = engine.generate(prompts, SamplingParams(max_tokens=32, stop_token_ids=(tok.eos_token_id,)))
    accepted = 0
    for prompt, res in zip(prompts, results, strict=True):
        ids = torch.tensor([prompt])
        ref = target.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )[0, len(prompt) :].tolist()
        if tok.eos_token_id in ref:
            ref = ref[: ref.index(tok.eos_token_id)]
        assert res.output_ids == ref
        accepted += res.stats.accepted_tokens
    assert accepted > 0  # the trained drafter really drafts (a random one accepts ~nothing)
